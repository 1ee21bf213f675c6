"""Qwen2 / Qwen3 tables: the qkv bias and q/k norms, planned per TP rank from shapes alone."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from sglang_megatron_loader.config import ModelDims
from sglang_megatron_loader.errors import UnsupportedCheckpointError, WeightMismatchError
from sglang_megatron_loader.models import TABLES, table_for
from sglang_megatron_loader.models.llama import LLAMA, hf_parts
from sglang_megatron_loader.models.qwen import QWEN2, QWEN3
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import check_checkpoint_keys, plan_parameter

_L, _H, _HD = 2, 64, 16
PRE = "decoder.layers.self_attention."


@dataclass(frozen=True)
class Meta:
    shape: tuple[int, ...]


def dims(heads: int, groups: int) -> ModelDims:
    return ModelDims(_L, _H, 128, heads, groups, _HD, 256, 250, False)


def shapes(d: ModelDims) -> dict[str, Meta]:
    rows = (d.num_heads + 2 * d.num_kv_heads) * d.head_dim
    return {
        PRE + "linear_qkv.weight": Meta((_L, rows, _H)),
        PRE + "linear_qkv.bias": Meta((_L, rows)),
        PRE + "q_layernorm.weight": Meta((_L, _HD)),
        PRE + "k_layernorm.weight": Meta((_L, _HD)),
    }


@pytest.mark.parametrize(("heads", "groups"), [(4, 2), (4, 1), (4, 4), (6, 2)])
@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_qkv_bias_is_regrouped_and_sharded_like_the_weight(heads, groups, tp_size) -> None:
    if heads % tp_size:
        pytest.skip("heads not divisible by tp")
    d, t = dims(heads, groups), shapes(dims(heads, groups))
    for rank in range(tp_size):
        tp = Tp(rank, tp_size)
        w = plan_parameter(QWEN2, "model.layers.1.self_attn.qkv_proj.weight", d, t, tp)
        b = plan_parameter(QWEN2, "model.layers.1.self_attn.qkv_proj.bias", d, t, tp)
        assert b.shape == w.shape[:1]
        assert [(r.region[:2], r.dst) for r in b.reads] == [(r.region[:2], r.dst) for r in w.reads]
        assert all(r.key == PRE + "linear_qkv.bias" for r in b.reads)


def test_qkv_bias_at_tp1_is_q_then_k_then_v() -> None:
    """Values, not only regions: the classic converter's reorder of a per-group bias."""
    d = dims(4, 2)
    bias = torch.arange(_L * (4 + 4) * _HD, dtype=torch.float64).reshape(_L, -1)
    grouped = bias[1].reshape(2, 4, _HD)  # 2 groups of [q, q, k, v]
    want = torch.cat(
        [grouped[:, :2].reshape(-1), grouped[:, 2].reshape(-1), grouped[:, 3].reshape(-1)]
    )
    plan = plan_parameter(QWEN2, "model.layers.1.self_attn.qkv_proj.bias", d, shapes(d), Tp(0, 1))
    got = torch.empty(plan.shape, dtype=torch.float64)
    for r in plan.reads:
        got[r.dst[0] : r.dst[1]] = bias[tuple(slice(lo, hi) for lo, hi in r.region)].reshape(-1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["q_norm", "k_norm"])
@pytest.mark.parametrize("tp", [Tp(0, 1), Tp(1, 2), Tp(3, 4)])
def test_qk_norms_are_replicated_over_the_head_dim(name: str, tp: Tp) -> None:
    d = dims(4, 2)
    plan = plan_parameter(QWEN3, f"model.layers.0.self_attn.{name}.weight", d, shapes(d), tp)
    key = PRE + ("q" if name == "q_norm" else "k") + "_layernorm.weight"
    assert plan.shape == (_HD,)
    assert [(r.key, r.region, r.dst) for r in plan.reads] == [(key, ((0, 1), (0, _HD)), (0, _HD))]


def test_qk_norm_of_the_wrong_size_names_the_key() -> None:
    d, t = dims(4, 2), shapes(dims(4, 2))
    t[PRE + "q_layernorm.weight"] = Meta((_L, _H))  # a norm over the hidden size
    with pytest.raises(WeightMismatchError, match=r"q_layernorm.weight.*\(64,\).*\(16,\)"):
        plan_parameter(QWEN3, "model.layers.0.self_attn.q_norm.weight", d, t, Tp(0, 1))


def test_llama_table_does_not_silently_drop_a_bias_or_qk_norm() -> None:
    d = dims(4, 2)
    for key in (PRE + "linear_qkv.bias", PRE + "q_layernorm.weight"):
        with pytest.raises(WeightMismatchError, match="neither maps nor ignores"):
            check_checkpoint_keys(LLAMA, d, [key])


def test_singleton_local_shards_keys_are_refused_with_the_layout_named() -> None:
    d = dims(4, 2)
    for key in (
        "decoder.layers.mlp.linear_fc1.weight_w",
        "decoder.layers.mlp.experts.experts.3.linear_fc1.weight",
        "decoder.layers.mlp.experts.experts.linear_fc1.weight0_v",
    ):
        with pytest.raises(WeightMismatchError, match="singleton_local_shards=False"):
            check_checkpoint_keys(LLAMA, d, [key])
    with pytest.raises(WeightMismatchError) as plain:
        check_checkpoint_keys(LLAMA, d, [PRE + "linear_qkv.bias"])
    assert "singleton" not in str(plain.value)


def test_hf_parts_split_the_fused_bias() -> None:
    d = dims(4, 2)
    assert hf_parts("model.layers.3.self_attn.qkv_proj.bias", d) == (
        ("model.layers.3.self_attn.q_proj.bias", 64),
        ("model.layers.3.self_attn.k_proj.bias", 32),
        ("model.layers.3.self_attn.v_proj.bias", 32),
    )
    assert hf_parts("model.layers.0.self_attn.q_norm.weight", d) == (
        ("model.layers.0.self_attn.q_norm.weight", -1),
    )


def test_tables_by_architecture() -> None:
    assert set(TABLES) == {
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "MixtralForCausalLM",
        "Qwen3MoeForCausalLM",
    }
    assert QWEN2.per_layer[: len(LLAMA.per_layer)] == LLAMA.per_layer
    with pytest.raises(UnsupportedCheckpointError, match="'DeepseekV3ForCausalLM' has no Megatron"):
        table_for(type("C", (), {"architectures": ["DeepseekV3ForCausalLM"]})())
