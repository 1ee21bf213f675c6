"""SGLang flags combined with ``--load-format megatron`` on the real CPU server: each works, or is
refused at start with why and what to do, as the README table ("SGLang features with
--load-format megatron") says. Where SGLang itself cannot run a feature on a CPU (speculative
decoding's draft attention, LoRA's CUDA-only layers), the server must get past everything this
package does and stop in SGLang's own code.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "cpu_stub"))
import serve_helpers as sh  # noqa: E402
from make_megatron_checkpoint import VARIANTS, generate  # noqa: E402

from sglang_megatron_loader.cli import main as cli  # noqa: E402

pytestmark = pytest.mark.e2e

SOURCE = "fp32_tp1"


def _start_fails(path, extra: list[str], log: Path, **kw) -> str:
    kw.setdefault("timeout", 480)
    with pytest.raises(RuntimeError) as err:  # exited before healthy
        sh.start_server(path, extra_args=["--load-format", "megatron", *extra], log_path=log, **kw)
    assert "exited with code" in str(err.value), err.value
    return log.read_text(errors="replace")


@pytest.mark.parametrize(
    ("path", "extra", "expected"),
    [
        ("s3://bucket/run", [], "--model-path s3://bucket/run: a s3:// URL"),
        ("nvidia/megatron-run", [], "looks like a Hugging Face Hub id"),
        (None, ["--revision", "main"], "--revision main: selects a Hugging Face Hub revision"),
        (None, ["--modelopt-quant", "fp8"], "--modelopt-quant fp8: ModelOpt quantizes in"),
    ],
    ids=["s3", "hub-id", "revision", "modelopt-quant"],
)
def test_refused_at_start_with_why(megatron_ckpt, tmp_path, path, extra, expected) -> None:
    text = _start_fails(path or megatron_ckpt(SOURCE), extra, tmp_path / "server.log", cwd=tmp_path)
    assert "sglang-megatron-loader: --" in text and expected in text, text[-3000:]
    assert "Load weight begin" not in text  # refused in the launcher, before any scheduler


SPECULATIVE = ["--speculative-algorithm", "STANDALONE", "--speculative-num-steps", "2"]
SPECULATIVE += ["--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "3"]


@pytest.mark.parametrize("draft_format", ["hf", "megatron"])
def test_speculative_draft_of_either_format_loads(ckpt_copy, megatron_ckpt, tmp_path, draft_format):
    """The target from the Megatron checkpoint, the draft in its own format (an HF export read by
    SGLang's default loader, or another Megatron checkpoint read by this loader); both load, then
    SGLang stops: its CPU attention backend has no speculative decoding."""
    target = megatron_ckpt(SOURCE)
    if draft_format == "hf":
        draft = tmp_path / "draft_hf"
        assert cli(["export", str(target), str(draft)]) == 0
    else:
        draft = ckpt_copy(SOURCE)
    extra = [*SPECULATIVE, "--speculative-draft-model-path", str(draft)]
    text = _start_fails(target, extra, tmp_path / "server.log")
    assert "EAGLE is not supported in decode attention backend torch_native" in text, text[-3000:]
    assert f"Megatron checkpoint {target}/iter_0000010 (iteration 10" in text
    assert text.count("Load weight end") == 2, "target and draft both loaded"
    if draft_format == "hf":
        assert "Using draft model load_format: 'auto'" in text
    else:
        assert f"Megatron checkpoint {draft}/iter_0000010 (iteration 10" in text
    assert "sglang-megatron-loader:" not in text


def test_lora_adapter_on_a_megatron_base_loads(megatron_ckpt, tmp_path) -> None:
    """The adapter (a PEFT folder) is read in SGLang's own format on a Megatron base; SGLang
    then stops in its LoRA layers, which need CUDA (pinned memory) on any base model."""
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    rows = {"q_proj": 64, "v_proj": 32}
    save_file(
        {
            f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight": torch.ones(
                (4, 64) if ab == "A" else (rows[m], 4)
            )
            for i in range(4)
            for m in rows
            for ab in "AB"
        },
        str(adapter / "adapter_model.safetensors"),
    )
    (adapter / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}'
    )
    extra = ["--enable-lora", "--lora-paths", f"a={adapter}", "--lora-backend", "torch_native"]
    extra += ["--max-lora-rank", "4", "--lora-target-modules", "q_proj", "v_proj"]
    text = _start_fails(megatron_ckpt(SOURCE), extra, tmp_path / "server.log")
    assert "Unknown load_format" not in text
    assert "sglang/srt/lora/layers.py" in text and "NVIDIA driver" in text, text[-3000:]


def test_dp_replicas_serve_and_reload_one_iteration(ckpt_copy, tmp_path) -> None:
    """--dp-size 2: two replicas of the model, each its own scheduler. Both serve the pinned
    iteration, a reload from the run root moves both to the next one, and a reload that fails
    (a data file cut short) leaves both on it."""
    run = ckpt_copy(SOURCE)
    nxt = dataclasses.replace(VARIANTS[SOURCE], name="next", seed=777, iteration=20)
    generate(tmp_path / "next", nxt)
    old = torch.load(f"{run}.reference.pt", weights_only=True)
    new = torch.load(tmp_path / "next.reference.pt", weights_only=True)
    prompt = old["prompts"][0]
    proc = sh.start_server(
        run,
        extra_args=["--load-format", "megatron", "--dp-size", "2"],
        extra_env={"SGLANG_CPU_OMP_THREADS_BIND": "0|1"},
        log_path=tmp_path / "server.log",
        timeout=480,  # two schedulers start on two cores
    )
    try:
        for _ in range(2):  # round robin: both replicas answer
            assert sh.generate(proc.port, prompt, 8)["output_ids"] == old["greedy"][0]
        shutil.copytree(tmp_path / "next" / "iter_0000020", run / "iter_0000020")
        (run / "latest_checkpointed_iteration.txt").write_text("20")
        out = sh.post(proc.port, "/update_weights_from_disk", {"model_path": str(run)})
        assert out["success"], out
        assert out["message"].count(f"now serving iteration 20 ({run}/iter_0000020)") == 2, out
        for _ in range(2):
            assert sh.generate(proc.port, prompt, 8)["output_ids"] == new["greedy"][0]

        shutil.copytree(run / "iter_0000020", run / "iter_0000030")
        data = run / "iter_0000030" / "__0_0.distcp"
        os.truncate(data, data.stat().st_size // 2)
        (run / "latest_checkpointed_iteration.txt").write_text("30")
        out = sh.post(
            proc.port, "/update_weights_from_disk", {"model_path": str(run)}, ok_codes=(200, 400)
        )
        assert not out["success"], out
        assert out["message"].count("still serving iteration 20") == 2, out
        for _ in range(2):
            assert sh.generate(proc.port, prompt, 8)["output_ids"] == new["greedy"][0]
    finally:
        sh.stop_server(proc)
