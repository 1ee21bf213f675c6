"""SGLang flags combined with ``--load-format megatron`` that are refused at start, each with why
and what to do; and the loader's rule for ``--quantization`` layouts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from sglang_megatron_loader.errors import UnsupportedCheckpointError
from sglang_megatron_loader.sglang.loader import refuse_prequantized
from sglang_megatron_loader.sglang.server_flags import flag_refusals, model_path_refusal


def _cfg(**changes):
    base = {"model_path": "/ckpt", "revision": None, "modelopt_quant": None}
    return SimpleNamespace(**{**base, "quantize_and_serve": False, **changes})


@pytest.mark.parametrize("url", ["s3://bucket/run", "gs://bucket/run/iter_0000010", "az://c/r"])
def test_remote_urls_are_refused_with_what_to_do(url) -> None:
    message = model_path_refusal(url)
    assert message.startswith(f"--model-path {url}: a {url.split(':')[0]}:// URL")
    assert "local (or mounted) folder" in message


def test_hub_id_that_is_no_local_folder_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    message = model_path_refusal("nvidia/some-megatron-run")
    assert "looks like a Hugging Face Hub id" in message
    assert "huggingface-cli download nvidia/some-megatron-run" in message
    (tmp_path / "nvidia" / "some-megatron-run").mkdir(parents=True)
    assert model_path_refusal("nvidia/some-megatron-run") is None  # a local folder wins


def test_revision_and_modelopt_quant_are_refused() -> None:
    assert flag_refusals(_cfg()) == []
    (revision,) = flag_refusals(_cfg(revision="main"))
    assert revision.startswith("--revision main: selects a Hugging Face Hub revision")
    (modelopt,) = flag_refusals(_cfg(modelopt_quant="fp8"))
    assert modelopt.startswith("--modelopt-quant fp8: ModelOpt quantizes in SGLang's ModelOpt")
    assert "sglang-megatron export" in modelopt


class _Layer(torch.nn.Module):
    def __init__(self, **params: torch.Tensor) -> None:
        super().__init__()
        for name, value in params.items():
            self.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))


def _model(**qkv: torch.Tensor) -> torch.nn.Module:
    model = torch.nn.Module()
    model.config = LlamaConfig(architectures=["LlamaForCausalLM"])
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.model.layers[0].self_attn = torch.nn.Module()
    model.model.layers[0].self_attn.qkv_proj = _Layer(**qkv)
    return model


def test_online_quantization_layout_is_served() -> None:
    refuse_prequantized(_model(weight=torch.zeros(4, 4, dtype=torch.bfloat16)), "fp8")


@pytest.mark.parametrize(
    "qkv",
    [
        {"weight": torch.zeros(4, 4, dtype=torch.int8)},
        {"weight": torch.zeros(4, 4), "weight_scale": torch.ones(4)},
    ],
    ids=["packed-int8", "scales"],
)
def test_prequantized_layout_is_refused(qkv) -> None:
    with pytest.raises(UnsupportedCheckpointError, match="expect pre-quantized tensors"):
        refuse_prequantized(_model(**qkv), "w8a8_int8")


def test_readme_feature_table_names_existing_tests() -> None:
    """The README's "SGLang features with --load-format megatron" table cites a test per row."""
    import re
    from pathlib import Path

    root = Path(__file__).parents[2]
    text = (root / "README.md").read_text()
    section = text.split("## SGLang features with --load-format megatron", 1)[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # no header
    assert len(rows) == 15
    for row in rows:
        cited = re.findall(r"`(tests/[\w/]+\.py)`", row)
        assert cited, row
        for path in cited:
            assert (root / path).is_file(), path
