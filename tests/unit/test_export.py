"""Export (HF folder, .pt) and verify, checked by transformers against Megatron's own logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from make_megatron_checkpoint import VARIANTS as FIXTURE_VARIANTS
from safetensors import safe_open

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.cli import main as cli
from sglang_megatron_loader.export import writers
from sglang_megatron_loader.export.stream import HfStream
from sglang_megatron_loader.export.writers import export_hf, export_pytorch

# transformers runs fp32; a bf16 checkpoint's reference came from Megatron's bf16 forward.
TOLERANCE = {"fp32": 1e-4, "bf16": 0.25, "fp16": 0.05}
ARCHITECTURE = {
    "qkv_bias_fp32_tp2": "Qwen2ForCausalLM",
    "qk_norm_fp32_tp1": "Qwen3ForCausalLM",
    "moe_mixtral_fp32_tp2ep2": "MixtralForCausalLM",
    "moe_qwen3_fp32_ep2": "Qwen3MoeForCausalLM",
    "moe_qwen3_presoftmax_fp32_tp1": "Qwen3MoeForCausalLM",
}
VARIANTS = list(FIXTURE_VARIANTS)  # every fixture variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_export_loads_in_transformers_and_matches_megatron(
    megatron_ckpt, served_tokenizer, tmp_path, variant
):
    from transformers import AutoModelForCausalLM

    root = megatron_ckpt(variant)
    ref = torch.load(f"{root}.reference.pt", weights_only=True)
    out = tmp_path / "hf"
    tok = served_tokenizer(variant)
    given = ["--tokenizer", str(tok)] if tok else []  # else the checkpoint's own tokenizer/
    assert cli(["export", str(root), str(out), "--shard-size", "0.0001", *given]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded as asked
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == ARCHITECTURE.get(variant, "LlamaForCausalLM")
    vocab = ref["variant"]["vocab_size"]
    assert model.config.vocab_size == vocab  # Megatron's padded rows dropped
    worst = 0.0
    for i, (prompt, want) in enumerate(zip(ref["prompts"], ref["last_logits"], strict=True)):
        with torch.no_grad():
            got = model(torch.tensor([prompt])).logits[0, -1]
        assert got.shape == (vocab,)
        diff = (got - want[:vocab].float()).abs().max().item()
        assert diff < TOLERANCE[ref["variant"]["dtype"]], diff
        worst = max(worst, diff)
        if "unscaled_last_logits" in ref:  # Megatron without rope scaling is far from both
            far = (got - ref["unscaled_last_logits"][i][:vocab]).abs().max().item()
            assert far > 100 * TOLERANCE["fp32"], far
    print(f"{variant}: max |logit diff| vs Megatron {worst:.3g}")


def test_hf_export_records_provenance(megatron_ckpt, tmp_path: Path) -> None:
    root = megatron_ckpt("fp32_tp2")
    with MegatronCheckpoint(root) as ckpt:
        export_hf(HfStream(ckpt), tmp_path / "hf", progress=False)
    with safe_open(tmp_path / "hf" / "model-00001-of-00001.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["megatron_iteration"] == "10"
    assert meta["megatron_source"].endswith("iter_0000010")
    assert json.loads(meta["megatron_args"])["tensor_model_parallel_size"] == 2
    assert (tmp_path / "hf" / "generation_config.json").is_file()


def test_pytorch_export_loads_weights_only_and_equals_hf(megatron_ckpt, tmp_path: Path) -> None:
    root = megatron_ckpt("other_dims")
    pt = tmp_path / "model.pt"
    assert cli(["export", str(root), str(pt), "--format", "pytorch"]) == 0
    sd = torch.load(pt, weights_only=True)
    assert set(sd) == {"model_state_dict", "model_config"}
    assert sd["model_config"]["hidden_size"] == 96
    with MegatronCheckpoint(root) as ckpt:
        for spec, tensor in HfStream(ckpt).tensors():
            assert torch.equal(sd["model_state_dict"][spec.name], tensor), spec.name


def test_interrupted_export_leaves_nothing_that_looks_complete(
    megatron_ckpt, tmp_path, monkeypatch
):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(writers, "_write_all", boom)
    with MegatronCheckpoint(megatron_ckpt("fp32_tp1")) as ckpt, pytest.raises(KeyboardInterrupt):
        export_hf(HfStream(ckpt), tmp_path / "hf", progress=False)
    assert list(tmp_path.iterdir()) == []
    with MegatronCheckpoint(megatron_ckpt("fp32_tp1")) as ckpt:
        stream = HfStream(ckpt)
        monkeypatch.setattr(HfStream, "tensors", lambda self: boom())
        with pytest.raises(KeyboardInterrupt):
            export_pytorch(stream, tmp_path / "m.pt", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite(megatron_ckpt, tmp_path: Path, capsys) -> None:
    (tmp_path / "hf").mkdir()
    assert cli(["export", str(megatron_ckpt("fp32_tp1")), str(tmp_path / "hf")]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err


@pytest.mark.parametrize(
    "variant",
    [
        "fp32_tp2",
        "bf16_tp1",
        "rope_scaling_fp32_tp1",
        "qkv_bias_fp32_tp2",
        "qk_norm_fp32_tp1",
        "fp16_tp1",
        "bf16_fp32norms_tp1",
    ],
)
def test_verify_passes_against_megatron_and_fused_forward(megatron_ckpt, variant, capsys):
    root = megatron_ckpt(variant)
    assert cli(["verify", str(root), "--reference", f"{root}.reference.pt"]) == 0
    assert cli(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert "PASS prompt of 5 tokens" in out and "FAIL" not in out
