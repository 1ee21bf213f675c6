"""Megatron-LM ``--ckpt-format torch_dcp`` checkpoints: detected, read and equal to torch_dist.

The checkpoint is written by ``tests/fixtures/make_torch_dcp_checkpoint.py``: a real megatron-core
``GPTModel`` (the ``fp32_tp1`` fixture's weights) saved the way Megatron-LM's torch_dcp path
saves it (``torch.distributed.checkpoint.save`` of ``generate_state_dict``'s dict).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.checkpoint.torch_dcp import _refuse_rank_local_layouts
from sglang_megatron_loader.cli import main as cli
from sglang_megatron_loader.errors import IncompleteCheckpointError, UnsupportedCheckpointError
from sglang_megatron_loader.export.stream import HfStream

SCRIPT = Path(__file__).parents[1] / "fixtures" / "make_torch_dcp_checkpoint.py"


@pytest.fixture(scope="module")
def torch_dcp_root(tmp_path_factory, megatron_ckpt) -> Path:
    root = tmp_path_factory.mktemp("torch_dcp") / "run"
    subprocess.run([sys.executable, str(SCRIPT), str(root)], check=True, capture_output=True)
    ref = megatron_ckpt("fp32_tp1")  # same variant, same seed: the same weights
    shutil.copy(f"{ref}.reference.pt", f"{root}.reference.pt")
    return root


def hf_tensors(root: Path) -> dict[str, torch.Tensor]:
    with MegatronCheckpoint(root) as ckpt:
        return {spec.name: t.clone() for spec, t in HfStream(ckpt).tensors()}


def test_format_detected_with_args_from_the_dcp_items(torch_dcp_root: Path) -> None:
    with MegatronCheckpoint(torch_dcp_root) as ckpt:
        assert ckpt.location.format == "torch_dcp"
        assert ckpt.args.ckpt_format == "torch_dcp" and ckpt.common["iteration"] == 10
        assert "decoder.layers.0.self_attention.linear_qkv.weight" in ckpt.tensors
        assert not any(k.startswith("model.") for k in ckpt.tensors)


def test_weights_equal_the_torch_dist_save_of_the_same_model(torch_dcp_root, megatron_ckpt):
    got, want = hf_tensors(torch_dcp_root), hf_tensors(megatron_ckpt("fp32_tp1"))
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_verify_against_megatron_logits_and_inspect(torch_dcp_root: Path, capsys) -> None:
    root = str(torch_dcp_root)
    assert cli(["verify", root, "--reference", f"{root}.reference.pt"]) == 0
    assert cli(["inspect", str(torch_dcp_root), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "torch_dcp" in out and "TP=2 plan" in out


def test_mid_save_torch_dist_is_still_reported_incomplete(ckpt_copy) -> None:
    root = ckpt_copy("fp32_tp1")
    (root / "iter_0000010" / "metadata.json").unlink()
    with pytest.raises(IncompleteCheckpointError, match="no metadata.json"):
        MegatronCheckpoint(root)


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"ckpt_format": "fsdp_dtensor"}, r"ckpt_format='fsdp_dtensor' \(Megatron-FSDP\)"),
        ({"tensor_model_parallel_size": 2}, r"saved with tensor_model_parallel_size=2"),
        ({"pipeline_model_parallel_size": 4}, r"saved with pipeline_model_parallel_size=4"),
    ],
)
def test_layouts_with_rank_local_keys_are_refused(fields: dict, pattern: str) -> None:
    args = argparse.Namespace(
        ckpt_format="torch_dcp", tensor_model_parallel_size=1, pipeline_model_parallel_size=1
    )
    vars(args).update(fields)
    with pytest.raises(UnsupportedCheckpointError, match=pattern):
        _refuse_rank_local_layouts(args, Path("/ckpt/iter_0000010"))
