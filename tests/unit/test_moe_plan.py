"""MoE planning and config, from shapes alone: the expert rules against plain torch slicing of
SGLang's ``FusedMoE`` layout, EP x expert-TP positions, the completeness check over fused
expert weights, and Megatron MoE args -> Mixtral / Qwen3-MoE configs or refusals by name."""

from __future__ import annotations

import argparse
import itertools

import pytest
import torch

from sglang_megatron_loader.config import ModelDims, hf_config_from_args, unsupported_args
from sglang_megatron_loader.errors import (
    ShardingError,
    UnsupportedCheckpointError,
    WeightMismatchError,
)
from sglang_megatron_loader.models import table_for
from sglang_megatron_loader.models.moe import FC1, FC2, MIXTRAL, QWEN3_MOE, ROUTER
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import ParamPlan, Read, check_checkpoint_keys, plan_parameter

_L, _E, _F, _H = 2, 4, 12, 8
DIMS = ModelDims(
    num_layers=_L,
    hidden_size=_H,
    ffn_hidden_size=32,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    padded_vocab_size=128,
    vocab_size=100,
    tied_embeddings=False,
    num_experts=_E,
    moe_ffn_hidden_size=_F,
)
PREFIX = "decoder.layers."


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        PREFIX + FC1: torch.randn(_L, _E, 2 * _F, _H, generator=gen),
        PREFIX + FC2: torch.randn(_L, _E, _H, _F, generator=gen),
        PREFIX + ROUTER: torch.randn(_L, _E, _H, generator=gen),
    }


def _execute(plan: ParamPlan, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    out = torch.full(plan.shape, float("nan"))
    for r in plan.reads:
        src = tensors[r.key][tuple(slice(lo, hi) for lo, hi in r.region)]
        rows = out[r.dst_lead][r.dst[0] : r.dst[1]]
        rows.copy_(src.reshape(rows.shape))
    return out


POSITIONS = [Tp(r, t, e, ep) for t, ep in ((1, 1), (2, 1), (2, 2), (4, 2), (4, 4)) for r, e in
             [(r, r // (t // ep)) for r in range(t)]]  # fmt: skip


@pytest.mark.parametrize(
    "tp", POSITIONS, ids=lambda t: f"tp{t.rank}of{t.size}-ep{t.ep_rank}of{t.ep_size}"
)
@pytest.mark.parametrize("table", [MIXTRAL, QWEN3_MOE], ids=lambda t: t.name)
def test_fused_experts_equal_sglang_layout(table, tp: Tp) -> None:
    """w13[j] = [gate_e[shard]; up_e[shard]], w2[j] = down_e[:, shard] for the rank's experts
    e = ep_rank * E/ep + j, shard = moe_tp_rank's slice of F (FusedMoE.weight_loader's layout)."""
    tensors = _tensors()
    block = "block_sparse_moe" if table is MIXTRAL else "mlp"
    moe_tp = tp.size // tp.ep_size
    n, lo = _F // moe_tp, (tp.rank % moe_tp) * (_F // moe_tp)
    experts = range(tp.ep_rank * _E // tp.ep_size, (tp.ep_rank + 1) * _E // tp.ep_size)
    for layer in range(_L):
        fc1, fc2 = tensors[PREFIX + FC1][layer], tensors[PREFIX + FC2][layer]
        w13 = torch.stack(
            [torch.cat([fc1[e, lo : lo + n], fc1[e, _F + lo : _F + lo + n]]) for e in experts]
        )
        w2 = torch.stack([fc2[e, :, lo : lo + n] for e in experts])
        name = f"model.layers.{layer}.{block}.experts."
        got13 = _execute(plan_parameter(table, name + "w13_weight", DIMS, tensors, tp), tensors)
        got2 = _execute(plan_parameter(table, name + "w2_weight", DIMS, tensors, tp), tensors)
        assert torch.equal(got13, w13) and torch.equal(got2, w2)
        gate = f"model.layers.{layer}.{block}.gate.weight"
        got = _execute(plan_parameter(table, gate, DIMS, tensors, tp), tensors)
        assert torch.equal(got, tensors[PREFIX + ROUTER][layer])


def test_expert_parallel_reads_only_the_ranks_experts() -> None:
    tensors = _tensors()
    name = "model.layers.1.mlp.experts.w13_weight"
    for ep_rank in range(2):
        plan = plan_parameter(QWEN3_MOE, name, DIMS, tensors, Tp(ep_rank, 2, ep_rank, 2))
        first = 2 * ep_rank
        assert {r.region[1] for r in plan.reads} == {(first, first + 1), (first + 1, first + 2)}
        assert sum(r.numel() for r in plan.reads) == 2 * 2 * _F * _H


def test_ep_size_that_does_not_divide_the_experts_is_refused_by_name() -> None:
    dims = ModelDims(**{**DIMS.__dict__, "num_experts": 6})
    tensors = {PREFIX + FC1: torch.empty(_L, 6, 2 * _F, _H)}
    with pytest.raises(ShardingError, match=r"6 experts .* 4 expert-parallel ranks.*--ep-size"):
        plan_parameter(MIXTRAL, "model.layers.0.block_sparse_moe.experts.w13_weight", dims,
                       tensors, Tp(0, 4, 0, 4))  # fmt: skip


def test_stored_expert_shape_is_checked() -> None:
    tensors = {PREFIX + FC2: torch.empty(_L, _E, _H, _F + 1)}
    with pytest.raises(WeightMismatchError, match=r"linear_fc2.*\(4, 8, 13\).*\(4, 8, 12\)"):
        plan_parameter(MIXTRAL, "model.layers.0.block_sparse_moe.experts.w2_weight", DIMS,
                       tensors, Tp(0, 1))  # fmt: skip


def test_completeness_check_covers_every_expert() -> None:
    key = PREFIX + FC2
    good = [Read(key, ((0, 1), (e, e + 1), (0, _H), (0, _F)), (0, _H), (e,)) for e in range(2)]
    ParamPlan("w2", (2, _H, _F), tuple(good), None)
    with pytest.raises(WeightMismatchError, match=r"destinations \[\(1,\)\] not filled"):
        ParamPlan("w2", (2, _H, _F), tuple(good[:1]), None)
    with pytest.raises(WeightMismatchError, match=r"w2\[0\]: fills 4 of 8 rows"):
        half = Read(key, ((0, 1), (0, 1), (0, 4), (0, _F)), (0, 4), (0,))
        ParamPlan("w2", (2, _H, _F), (half, good[1]), None)


def test_dense_mlp_keys_are_unknown_to_moe_tables() -> None:
    keys = [PREFIX + FC1, PREFIX + FC2, PREFIX + ROUTER, PREFIX + "mlp.linear_fc1.weight"]
    with pytest.raises(WeightMismatchError, match="mlp.linear_fc1.weight"):
        check_checkpoint_keys(MIXTRAL, DIMS, keys)
    assert check_checkpoint_keys(MIXTRAL, DIMS, keys[:3]) == []


# -- config ------------------------------------------------------------------------------------


def _moe_args(**changes) -> argparse.Namespace:
    args = dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
        group_query_attention=True, num_query_groups=2, kv_channels=16, padded_vocab_size=256,
        vocab_size=250, normalization="RMSNorm", swiglu=True, num_experts=8,
        moe_ffn_hidden_size=96, moe_router_topk=2, moe_router_pre_softmax=False,
        moe_router_score_function="softmax", moe_router_topk_scaling_factor=None,
        moe_layer_freq=1, moe_grouped_gemm=True, moe_router_load_balancing_type="aux_loss",
        moe_expert_capacity_factor=None, moe_aux_loss_coeff=1e-2, qk_layernorm=False,
        add_qkv_bias=False,
    )  # fmt: skip
    args.update(changes)
    return argparse.Namespace(**args)


def test_moe_args_become_mixtral() -> None:
    cfg = hf_config_from_args(_moe_args(), source="x")
    assert cfg.architectures == ["MixtralForCausalLM"] and table_for(cfg) is MIXTRAL
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (8, 2, 96)
    dims = ModelDims.from_hf_config(cfg, 256)
    assert (dims.num_experts, dims.moe_ffn_hidden_size) == (8, 96)


@pytest.mark.parametrize("pre_softmax", [False, True])
def test_moe_args_with_qk_layernorm_become_qwen3_moe(pre_softmax: bool) -> None:
    args = _moe_args(qk_layernorm=True, moe_router_pre_softmax=pre_softmax, moe_router_topk=3)
    cfg = hf_config_from_args(args, source="x")
    assert cfg.architectures == ["Qwen3MoeForCausalLM"] and table_for(cfg) is QWEN3_MOE
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 3, 96)
    assert cfg.norm_topk_prob is not pre_softmax
    assert cfg.decoder_sparse_step == 1 and cfg.mlp_only_layers == []
    assert ModelDims.from_hf_config(cfg, 256).moe_ffn_hidden_size == 96


REFUSED_MOE = [
    ({"moe_router_score_function": "sigmoid"}, "moe_router_score_function='sigmoid'"),
    ({"moe_router_topk_scaling_factor": 2.5}, "moe_router_topk_scaling_factor=2.5"),
    ({"moe_layer_freq": [1, 0]}, "moe_layer_freq=[1, 0]"),
    ({"moe_shared_expert_intermediate_size": 64}, "moe_shared_expert_intermediate_size=64"),
    ({"moe_router_enable_expert_bias": True}, "moe_router_enable_expert_bias=True"),
    ({"moe_router_num_groups": 4, "moe_router_group_topk": 2}, "moe_router_group_topk=2"),
    ({"moe_router_load_balancing_type": "sinkhorn"}, "moe_router_load_balancing_type='sinkhorn'"),
    ({"moe_latent_size": 32}, "moe_latent_size=32"),
    ({"moe_router_pre_softmax": True}, "moe_router_pre_softmax=True"),  # Mixtral renormalises
    ({"add_qkv_bias": True}, "num_experts=8 with add_qkv_bias=True"),
]


@pytest.mark.parametrize(("changes", "named"), REFUSED_MOE, ids=[n for _, n in REFUSED_MOE])
def test_moe_routing_options_not_served_are_refused_by_name(changes, named: str) -> None:
    assert any(named in m for m in unsupported_args(_moe_args(**changes)))
    with pytest.raises(UnsupportedCheckpointError, match=r"does not serve"):
        hf_config_from_args(_moe_args(**changes), source="x")


@pytest.mark.parametrize("freq", [1, [1, 1], "([1]*2)"])
def test_every_layer_moe_patterns_are_served(freq) -> None:
    assert unsupported_args(_moe_args(moe_layer_freq=freq)) == []


def test_positions_cover_sglang_ranks() -> None:
    """moe_tp_rank = tp_rank % (tp / ep), as SGLang's runtime context computes it."""
    for t, ep in itertools.product((2, 4), (1, 2)):
        got = [Tp(r, t, r // (t // ep), ep).expert_tp for r in range(t)]
        assert [(x.rank, x.size) for x in got] == [(r % (t // ep), t // ep) for r in range(t)]


# -- inspect, on a real megatron-core MoE checkpoint -------------------------------------------


def test_inspect_shows_experts_and_their_ranks(megatron_ckpt) -> None:
    from sglang_megatron_loader.inspect_ckpt import format_text, inspect

    info, plans = inspect(str(megatron_ckpt("moe_mixtral_fp32_tp2ep2")), tp=4, ep=2)
    e = info["experts"]
    assert (e["num_experts"], e["top_k"], e["moe_ffn_hidden_size"]) == (4, 2, 96)
    assert e["bytes_per_expert_per_layer"] == 3 * 96 * 64 * 4
    assert e["experts_bytes"] == 2 * 4 * e["bytes_per_expert_per_layer"]
    assert e["per_rank"] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [p.tp.ep_rank for p in plans] == [0, 0, 1, 1]
    text = format_text(info)
    assert "experts      4 per layer, top-2, ffn 96" in text
    assert "experts/rank 0: 0-1, 1: 0-1, 2: 2-3, 3: 2-3" in text
