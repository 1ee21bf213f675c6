"""Checkpoints written by NVIDIA Megatron-Bridge 0.6.2 (committed golden copies, see
``tests/fixtures/golden/bridge_0.6.2/README.md``): config from ``run_config.yaml``, the save's
own tokenizer, export equal to the Hugging Face model the save was imported from, refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.cli import main as cli
from sglang_megatron_loader.engine import hf_config_for
from sglang_megatron_loader.errors import CorruptCheckpointError, UnsupportedCheckpointError
from sglang_megatron_loader.inspect_ckpt import inspect

GOLDEN = Path(__file__).parents[1] / "fixtures" / "golden" / "bridge_0.6.2"
SAVES = sorted(p for p in GOLDEN.iterdir() if (p / "latest_checkpointed_iteration.txt").is_file())
ARCH = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# the experts as the served Qwen3MoeConfig and the source HF config both name them
MOE_FIELDS = (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
)
TOLERANCE = {"fp32": 1e-4, "bf16": 0.25}  # transformers runs fp32; the references ran bf16


def _ref(root: Path) -> dict:
    return torch.load(f"{root}.reference.pt", weights_only=True)


def _ids(root: Path) -> str:
    return root.name


def test_golden_copies_cover_the_layouts_the_issue_names() -> None:
    variants = {p.name: _ref(p)["variant"] for p in SAVES}
    assert {v["tp"] for v in variants.values()} == {1, 2}
    assert {v["tied_embeddings"] for v in variants.values()} == {True, False}
    assert {v["arch"] for v in variants.values()} >= {"llama", "qwen3", "qwen3_moe"}
    assert any(v.get("ep", 1) == 2 for v in variants.values())  # an expert-parallel save
    assert all(v["iteration"] == 0 for v in variants.values())  # import_ckpt's save


@pytest.mark.parametrize("root", SAVES, ids=_ids)
def test_config_comes_from_run_config_yaml(root: Path) -> None:
    v = _ref(root)["variant"]
    with MegatronCheckpoint(root) as ckpt:
        assert ckpt.writer == "megatron-bridge" and "args" not in ckpt.common
        assert ckpt.config_source.endswith("iter_0000000/run_config.yaml")
    cfg = hf_config_for(root)
    hf = _hf_config(root)
    assert cfg.architectures == [ARCH[v["arch"]]]
    assert cfg.tie_word_embeddings == v["tied_embeddings"] == hf.tie_word_embeddings
    for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"):
        assert getattr(cfg, name) == getattr(hf, name), name
    assert cfg.num_key_value_heads == hf.num_key_value_heads
    assert cfg.rms_norm_eps == hf.rms_norm_eps
    assert cfg.rope_parameters["rope_theta"] == hf.rope_parameters["rope_theta"]
    assert cfg.rope_parameters["rope_type"] == hf.rope_parameters["rope_type"]
    assert cfg.rope_parameters.get("factor") == hf.rope_parameters.get("factor")
    assert cfg.vocab_size == v["vocab_size"] == len(_tokenizer(root))
    assert cfg.megatron_vocab_origin == "run_config.yaml model.vocab_size"
    for name in MOE_FIELDS if v.get("num_experts") else ():
        assert getattr(cfg, name) == getattr(hf, name), name


def _hf_config(root: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(f"{root}.hf")


def _tokenizer(root: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root / "iter_0000000" / "tokenizer")


@pytest.mark.parametrize("root", SAVES, ids=_ids)
def test_export_equals_the_hf_model_the_save_was_imported_from(root: Path, tmp_path) -> None:
    """Megatron-Bridge's import is a copy; our export is its inverse: every tensor equal."""
    out = tmp_path / "hf"
    assert cli(["export", str(root), str(out)]) == 0
    want = load_file(f"{root}.hf/model.safetensors")
    got = {}
    for shard in out.glob("*.safetensors"):
        got.update(load_file(shard))
    if _ref(root)["variant"]["tied_embeddings"]:
        want.pop("lm_head.weight", None)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    # the save's own tokenizer and chat template travel with the export
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()


@pytest.mark.parametrize("root", SAVES, ids=_ids)
def test_export_in_transformers_matches_megatrons_logits(root: Path, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    ref = _ref(root)
    out = tmp_path / "hf"
    assert cli(["export", str(root), str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for prompt, megatron, hf in zip(
        ref["prompts"], ref["last_logits"], ref["hf"]["last_logits"], strict=True
    ):
        with torch.no_grad():
            got = model(torch.tensor([prompt])).logits[0, -1]
        tol = TOLERANCE[ref["variant"]["dtype"]]
        assert (got - megatron.float()).abs().max() < tol
        assert (got - hf.float()).abs().max() < tol


def test_inspect_names_the_writer_and_the_config_file() -> None:
    info, plans = inspect(str(GOLDEN / "qwen3_tp2"), tp=2)
    assert info["writer"].startswith("Megatron-Bridge on megatron-core")
    assert info["config_source"].endswith("run_config.yaml") and not info["refused"]
    assert info["config"]["architectures"] == ["Qwen3ForCausalLM"]
    assert info["vocab"]["served"] == info["vocab"]["stored_rows"] == 250
    assert len(plans) == 2


def _copy(name: str, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / name
    shutil.copytree(GOLDEN / name, root)
    return root, root / "iter_0000000" / "run_config.yaml"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_an_unknown_provider_is_refused_by_name(tmp_path) -> None:
    root, cfg = _copy("llama_tp1_untied", tmp_path)
    target = "megatron.bridge.models.gpt_provider.GPTModelProvider"
    _edit(cfg, target, "megatron.bridge.models.gemma.gemma_provider.GemmaModelProvider")
    with pytest.raises(
        UnsupportedCheckpointError, match=r"model\._target_ is .*GemmaModelProvider"
    ):
        hf_config_for(root)


def test_a_yaml_tag_that_builds_an_object_is_refused(tmp_path) -> None:
    root, cfg = _copy("llama_tp1_untied", tmp_path)
    _edit(
        cfg, "  add_bias_linear: false", "  add_bias_linear: !!python/object/apply:os.system [id]"
    )
    with pytest.raises(UnsupportedCheckpointError, match=r"run_config\.yaml: refusing a YAML tag"):
        hf_config_for(root)


def test_broken_yaml_is_named(tmp_path) -> None:
    root, cfg = _copy("llama_tp1_untied", tmp_path)
    cfg.write_text("model: [unclosed\n")
    with pytest.raises(CorruptCheckpointError, match=r"run_config\.yaml: not valid YAML"):
        hf_config_for(root)


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ("  qk_l2_norm: false", "  qk_l2_norm: true", "qk_l2_norm=True"),
        (
            "    _target_: torch.nn.functional.silu",
            "    _target_: torch.nn.functional.gelu",
            "gelu",
        ),
        ("  layernorm_zero_centered_gamma: false", "  layernorm_zero_centered_gamma: true", "zero"),
    ],
)
def test_a_field_that_changes_the_math_is_refused_by_name(tmp_path, old, new, named) -> None:
    root, cfg = _copy("llama_tp1_untied", tmp_path)
    _edit(cfg, old, new)
    with pytest.raises(UnsupportedCheckpointError, match=named):
        hf_config_for(root)


MOE = "qwen3_moe_ep2"


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        (
            "  moe_shared_expert_intermediate_size: null",
            "  moe_shared_expert_intermediate_size: 64",
            "moe_shared_expert_intermediate_size=64",
        ),
        (
            "  moe_router_score_function: softmax",
            "  moe_router_score_function: sigmoid",
            "moe_router_score_function='sigmoid'",
        ),
        (
            "  moe_router_topk_scaling_factor: null",
            "  moe_router_topk_scaling_factor: 2.5",
            "moe_router_topk_scaling_factor=2.5",
        ),
        ("  moe_layer_freq: 1", "  moe_layer_freq: [0, 1]", r"moe_layer_freq=\[0, 1\]"),
        (
            "  moe_router_enable_expert_bias: false",
            "  moe_router_enable_expert_bias: true",
            "moe_router_enable_expert_bias=True",
        ),
        (
            "  moe_router_load_balancing_type: aux_loss",
            "  moe_router_load_balancing_type: sinkhorn",
            "moe_router_load_balancing_type='sinkhorn'",
        ),
        (
            "  moe_router_num_groups: null",
            "  moe_router_num_groups: 2",
            "moe_router_num_groups=2",
        ),
        ("  add_qkv_bias: false", "  add_qkv_bias: true", "num_moe_experts=4 with add_qkv_bias"),
    ],
)
def test_a_bridge_moe_field_that_changes_the_routing_is_refused_by_name(
    tmp_path, old, new, named
) -> None:
    root, cfg = _copy(MOE, tmp_path)
    _edit(cfg, old, new)
    with pytest.raises(UnsupportedCheckpointError, match=named):
        hf_config_for(root)


def test_bridge_moe_softmax_before_top_k_is_served_without_renormalising(tmp_path) -> None:
    """Qwen3-MoE with ``norm_topk_prob: false`` is imported as ``moe_router_pre_softmax``."""
    root, cfg = _copy(MOE, tmp_path)
    _edit(cfg, "  moe_router_pre_softmax: false", "  moe_router_pre_softmax: true")
    assert hf_config_for(root).norm_topk_prob is False
    assert hf_config_for(GOLDEN / MOE).norm_topk_prob is True


def test_bridge_moe_training_only_fields_are_not_judged(tmp_path) -> None:
    """Dispatcher, capacity (served dropless), aux/z losses and fusions do not change what a
    dropless forward computes; the save already says alltoall, grouped GEMM, aux loss."""
    root, cfg = _copy(MOE, tmp_path)
    _edit(cfg, "  moe_token_dispatcher_type: alltoall", "  moe_token_dispatcher_type: flex")
    _edit(cfg, "  moe_expert_capacity_factor: null", "  moe_expert_capacity_factor: 1.25")
    _edit(cfg, "  moe_z_loss_coeff: null", "  moe_z_loss_coeff: 0.001")
    _edit(cfg, "  moe_permute_fusion: false", "  moe_permute_fusion: true")
    _edit(cfg, "  moe_grouped_gemm: true", "  moe_grouped_gemm: false")
    assert hf_config_for(root).architectures == ["Qwen3MoeForCausalLM"]
