"""The allow-list of what shapes the forward (``arg_policy``), checked against the installed
megatron-core, the args a real Megatron-LM run saves, and the committed golden checkpoints."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sglang_megatron_loader.arg_names import GATED, IRRELEVANT, IRRELEVANT_PREFIXES
from sglang_megatron_loader.arg_policy import (
    REFUSED,
    SERVED,
    classification,
    is_off,
    policy_violations,
)
from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.checkpoint.safe_pickle import _placeholder
from sglang_megatron_loader.config import hf_config_from_args, unsupported_args
from sglang_megatron_loader.errors import UnsupportedCheckpointError

FIXTURES = Path(__file__).parents[1] / "fixtures"
REAL_ARGS = FIXTURES / "megatron_lm_args_defaults.json"
GOLDEN_ROOTS = sorted(
    p.parent for p in FIXTURES.glob("golden/*/*/latest_checkpointed_iteration.txt")
)
EXPLICIT = set(SERVED) | set(REFUSED) | set(GATED) | set(IRRELEVANT)


def decode(value: Any) -> Any:
    """A value of ``megatron_lm_args_defaults.json`` as the checkpoint reader returns it:
    megatron enums become the reader's inert placeholders, dtypes torch dtypes."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value["__type__"]
    if kind == "tuple":
        return tuple(decode(v) for v in value["items"])
    if kind == "float":
        return float(value["repr"])
    if kind == "torch.dtype":
        return getattr(torch, value["name"])
    if kind == "enum" and value["class"].startswith("megatron."):
        return _placeholder(value["class"])(value["value"])
    if kind == "enum" and value["class"] == "signal.Signals":
        return signal.Signals(value["value"])
    raise ValueError(f"unknown encoded value {value!r}")


@pytest.fixture(scope="module")
def real_args() -> argparse.Namespace:
    doc = json.loads(REAL_ARGS.read_text())
    return argparse.Namespace(**{k: decode(v) for k, v in doc["args"].items()})


def _golden_args(root: Path) -> argparse.Namespace:
    with MegatronCheckpoint(root) as ckpt:
        return ckpt.args


@pytest.fixture(scope="module")
def golden_args() -> argparse.Namespace:
    return _golden_args(next(p for p in GOLDEN_ROOTS if p.parent.name == "mcore_0.19.2"))


# -- (a), (b): every name is classified --------------------------------------------------------


def _transformer_config() -> type:
    """The installed megatron-core's ``TransformerConfig`` (skips without megatron-core)."""
    if not torch.cuda.is_available():  # flash_mla (sglang's) raises OSError, not ImportError
        sys.modules.setdefault("flash_mla", None)  # type: ignore[arg-type]
    return pytest.importorskip("megatron.core.transformer.transformer_config").TransformerConfig


def test_every_transformer_config_field_is_classified() -> None:
    names = {f.name for f in dataclasses.fields(_transformer_config())}
    missing = sorted(names - EXPLICIT)
    assert not missing, (
        f"megatron-core TransformerConfig fields no table of arg_policy/arg_names classifies "
        f"(served, refused unless default, gated or irrelevant?): {missing}"
    )


def test_every_real_megatron_lm_arg_is_classified(real_args) -> None:
    missing = sorted(n for n in vars(real_args) if classification(n) is None)
    assert not missing, f"Megatron-LM args no table classifies: {missing}"


# Renamed or removed since megatron-core 0.14 / Megatron-LM core_v0.14.0; ModelOpt arguments;
# Megatron-Bridge GPTModelProvider and Llama/Qwen provider fields (0.2-0.6).
OTHER_NAMES = """
    norm_epsilon apply_layernorm_1p use_legacy_models retro_add_retriever hybrid_attention_ratio
    async_tensor_model_parallel_allreduce moe_extended_tp moe_use_legacy_grouped_gemm
    export_quant_cfg export_kv_cache_quant modelopt_enabled
    share_embeddings_and_output_weights make_vocab_size_divisible_by should_pad_vocab
    position_embedding_type rotary_base rotary_percent rope_scaling rope_scaling_factor
    seq_len_interpolation_factor rotary_scaling_factor yarn_rotary_scaling_factor yarn_mscale
    hf_model_id hf_model_revision vocab_size seq_length mtp_enabled restore_modelopt_state
    transformer_layer_spec generation_config logit_dtype parallel_output attention_chunk_size
    nope_layer_interval _target_
"""


def test_names_of_older_releases_and_bridge_are_classified() -> None:
    assert [n for n in OTHER_NAMES.split() if n not in EXPLICIT] == []


def test_tables_are_disjoint_and_gates_are_judged() -> None:
    tables = {"served": SERVED, "refused": REFUSED, "gated": GATED, "irrelevant": IRRELEVANT}
    for a, ta in tables.items():
        for b, tb in tables.items():
            assert a == b or not set(ta) & set(tb), f"{a} and {b} share {set(ta) & set(tb)}"
    for name, gates in GATED.items():
        assert all(g in SERVED or g in REFUSED for g in gates), (name, gates)
    judged = set(SERVED) | set(REFUSED) | set(GATED)
    assert not [n for n in judged if n.startswith(IRRELEVANT_PREFIXES)]
    for name, rule in REFUSED.items():
        assert all(rule.admits(f) for f in rule.fine), name


# -- (c): real configs pass --------------------------------------------------------------------


def test_real_megatron_lm_args_have_no_violations(real_args) -> None:
    assert unsupported_args(real_args) == []
    assert hf_config_from_args(real_args, source="x").architectures == ["LlamaForCausalLM"]


@pytest.mark.parametrize("root", GOLDEN_ROOTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_golden_checkpoint_args_have_no_violations(root: Path) -> None:
    assert unsupported_args(_golden_args(root)) == []


BRIDGE_RUN_CONFIGS = sorted(FIXTURES.glob("golden/bridge_*/**/run_config.yaml"))


@pytest.mark.parametrize("path", BRIDGE_RUN_CONFIGS, ids=lambda p: str(p.parent.parent.name))
def test_golden_bridge_run_configs_have_no_violations(path: Path) -> None:
    from sglang_megatron_loader.checkpoint.bridge import read_run_config

    assert policy_violations(read_run_config(path.parent), "transformer_config") == []


def _bridge_fields(**changes: Any) -> dict[str, Any]:
    """A Llama config as Megatron-Bridge's run_config.yaml writes it: every TransformerConfig
    field of a real instance, GPTModelProvider fields, callables as ``_target_`` specs."""
    cfg = _transformer_config()(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        kv_channels=16,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=True,
        params_dtype=torch.bfloat16,
    )
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    fields.update(
        _target_="megatron.bridge.models.gpt_provider.GPTModelProvider",
        activation_func={"_target_": "torch.nn.functional.silu", "_call_": False},
        params_dtype={"_target_": "torch.bfloat16", "_call_": False},
        transformer_layer_spec={
            "_target_": "megatron.bridge.models.gpt_provider.default_layer_spec",
            "_call_": False,
        },
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=500000,
        rotary_percent=1.0,
        rope_scaling=False,
        rope_scaling_factor=1.0,
        seq_len_interpolation_factor=None,
        seq_length=4096,
        vocab_size=128256,
        should_pad_vocab=False,
        make_vocab_size_divisible_by=128,
        hf_model_id="meta-llama/Llama-3.2-1B",
        mtp_enabled=False,
        restore_modelopt_state=False,
    )
    fields.update(changes)
    return fields


def test_a_real_transformer_config_with_bridge_fields_has_no_violations() -> None:
    assert policy_violations(_bridge_fields(), "transformer_config") == []
    live = _bridge_fields(activation_func=torch.nn.functional.silu)  # an in-memory config
    assert policy_violations(live, "transformer_config") == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"activation_func": {"_target_": "torch.nn.functional.gelu", "_call_": False}},
            "activation_func=<torch.nn.functional.gelu>",
        ),
        ({"gated_linear_unit": False}, "gated_linear_unit=False"),
        (
            {"num_moe_experts": 8, "moe_shared_expert_intermediate_size": 64},
            "moe_shared_expert_intermediate_size=64",
        ),
        ({"num_moe_experts": 8, "add_qkv_bias": True}, "num_moe_experts=8 with add_qkv_bias"),
        (
            {"num_moe_experts": 8, "moe_router_pre_softmax": True},
            "num_moe_experts=8 with moe_router_pre_softmax=True with qk_layernorm=False",
        ),
        ({"num_moe_experts": 8, "moe_router_score_function": "sigmoid"}, "moe_router_score"),
        ({"layernorm_zero_centered_gamma": True}, "layernorm_zero_centered_gamma=True"),
        ({"seq_len_interpolation_factor": 4.0}, "seq_len_interpolation_factor=4.0"),
        (
            {"_target_": "megatron.bridge.models.llama.llama_provider.Llama4ModelProvider"},
            "_target_='megatron.bridge.models.llama.llama_provider.Llama4ModelProvider'",
        ),
        (
            {"transformer_layer_spec": {"_target_": "my.spec", "_call_": False}},
            "transformer_layer_spec=<my.spec>",
        ),
    ],
)
def test_bridge_fields_that_change_the_forward_are_refused(changes, expected: str) -> None:
    msgs = policy_violations(_bridge_fields(**changes), "transformer_config")
    assert any(m.startswith(expected) for m in msgs), msgs


def test_a_bridge_qwen3_moe_config_has_no_violations() -> None:
    """What the Qwen3-MoE bridge sets (grouped GEMM, alltoall, permute fusion, aux loss) is
    served or training-only; num_moe_experts is the TransformerConfig name of num_experts."""
    moe = _bridge_fields(
        num_moe_experts=128,
        moe_ffn_hidden_size=768,
        moe_router_topk=8,
        qk_layernorm=True,
        moe_grouped_gemm=True,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-3,
        moe_router_pre_softmax=False,
        moe_token_dispatcher_type="alltoall",
        moe_permute_fusion=True,
        expert_model_parallel_size=8,
    )
    assert policy_violations(moe, "transformer_config") == []
    # norm_topk_prob false in the HF model: the bridge sets moe_router_pre_softmax
    assert policy_violations({**moe, "moe_router_pre_softmax": True}, "transformer_config") == []


def test_a_bridge_config_without_a_field_is_judged_at_its_default() -> None:
    fields = _bridge_fields()
    del fields["normalization"], fields["activation_func"]
    msgs = policy_violations(fields, "transformer_config")
    assert any(m.startswith("normalization='LayerNorm'") for m in msgs), msgs
    assert any(m.startswith("activation_func=<torch.nn.functional.gelu>") for m in msgs), msgs


# -- (d): math changes without new tensors are refused -----------------------------------------

MATH_CHANGES = [
    ("qk_l2_norm", True),
    ("softmax_type", "learnable"),
    ("glu_linear_offset", 1.0),
    ("activation_func_clamp_value", 7.0),
    ("no_rope_freq", 4),
    ("use_mup", True),
    ("rotary_seq_len_interpolation_factor", 2),
    ("layernorm_zero_centered_gamma", True),  # --apply-layernorm-1p since Megatron-LM 0.16
    ("attention_output_gate", True),
    ("spec", "my_models.layer_spec"),
]


@pytest.mark.parametrize(("name", "value"), MATH_CHANGES, ids=[n for n, _ in MATH_CHANGES])
@pytest.mark.parametrize("source", ["real_megatron_lm_args", "golden_0.19.2"])
def test_a_math_change_is_refused_by_name_and_value(
    real_args, golden_args, source, name, value
) -> None:
    a = copy.copy(real_args if source == "real_megatron_lm_args" else golden_args)
    setattr(a, name, value)
    with pytest.raises(UnsupportedCheckpointError) as err:
        hf_config_from_args(a, source="ckpt/iter_0000010")
    assert f"{name}={value!r}" in str(err.value)


def test_no_rope_freq_pattern_without_a_no_rope_layer_is_fine(real_args) -> None:
    a = copy.copy(real_args)
    a.no_rope_freq = [0, 0]
    assert unsupported_args(a) == []


# -- (e), (f): names the loader does not know --------------------------------------------------


def test_an_unknown_arg_with_a_value_is_refused_unless_ignored(real_args) -> None:
    a = copy.copy(real_args)
    a.attention_temperature_from_megatron_0_99 = 0.7
    msgs = unsupported_args(a)
    assert len(msgs) == 1
    assert msgs[0].startswith("attention_temperature_from_megatron_0_99=0.7 (unknown")
    assert unsupported_args(a, ignore=["attention_temperature_from_megatron_0_99"]) == []


@pytest.mark.parametrize("value", [None, False, 0, 0.0, "", "none", [], {}])
def test_an_unknown_arg_left_off_passes(real_args, value) -> None:
    a = copy.copy(real_args)
    a.some_future_feature = value
    assert is_off(value) and unsupported_args(a) == []


def test_ignore_also_overrides_a_known_refusal(real_args) -> None:
    a = copy.copy(real_args)
    a.qk_l2_norm = True
    assert [m.split("=")[0] for m in unsupported_args(a)] == ["qk_l2_norm"]
    assert unsupported_args(a, ignore=("qk_l2_norm",)) == []


def test_a_placeholder_enum_in_an_unknown_arg_is_not_off(real_args) -> None:
    a = copy.copy(real_args)
    a.future_backend = _placeholder("megatron.core.transformer.enums.FutureBackend")(2)
    (msg,) = unsupported_args(a)
    assert msg.startswith(
        "future_backend=<megatron.core.transformer.enums.FutureBackend(2)> (unknown"
    )


def test_naming_is_checked() -> None:
    with pytest.raises(ValueError, match="naming"):
        policy_violations({}, "hf")  # type: ignore[arg-type]


def test_ignore_args_reaches_the_config_and_never_a_served_name(megatron_ckpt, tmp_path) -> None:
    """``--model-loader-extra-config '{"ignore_args": [...]}'``: what the server passes on."""
    from sglang_megatron_loader.engine import checkpoint_hf_config
    from sglang_megatron_loader.errors import UnsupportedCheckpointError
    from sglang_megatron_loader.sglang.plugin import _ignore_args

    assert _ignore_args('{"ignore_args": ["qk_l2_norm"], "progress": false}') == ("qk_l2_norm",)
    assert _ignore_args({"ignore_args": ["a", "b"]}) == ("a", "b")
    assert _ignore_args("{}") == () and _ignore_args(None) == ()
    with MegatronCheckpoint(megatron_ckpt("fp32_tp1")) as ckpt:
        ckpt.args.qk_l2_norm = True
        with pytest.raises(UnsupportedCheckpointError, match="qk_l2_norm=True"):
            checkpoint_hf_config(ckpt)
        assert checkpoint_hf_config(ckpt, ignore_args=["qk_l2_norm"]).vocab_size == 250
        with pytest.raises(UnsupportedCheckpointError, match=r"ignore_args \['normalization'\]"):
            checkpoint_hf_config(ckpt, ignore_args=["qk_l2_norm", "normalization"])
