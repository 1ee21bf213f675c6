"""Planner: pure shape logic, checked against an independent HF-layout reference."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_megatron_loader.config import ModelDims
from sglang_megatron_loader.errors import ShardingError, WeightMismatchError
from sglang_megatron_loader.models.llama import LLAMA
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import check_checkpoint_keys, plan_rank

_L = 2


@dataclass(frozen=True)
class Meta:
    shape: tuple[int, ...]


def megatron_tensors(d: ModelDims) -> dict[str, torch.Tensor]:
    """Distinct values everywhere so any misplaced row shows."""
    h, hd = d.hidden_size, d.head_dim
    shapes = {
        "embedding.word_embeddings.weight": (d.padded_vocab_size, h),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (_L, h),
        "decoder.layers.self_attention.linear_qkv.weight": (
            _L,
            (d.num_heads + 2 * d.num_kv_heads) * hd,
            h,
        ),
        "decoder.layers.self_attention.linear_proj.weight": (_L, h, d.num_heads * hd),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (_L, h),
        "decoder.layers.mlp.linear_fc1.weight": (_L, 2 * d.ffn_hidden_size, h),
        "decoder.layers.mlp.linear_fc2.weight": (_L, h, d.ffn_hidden_size),
        "decoder.final_layernorm.weight": (h,),
    }
    if not d.tied_embeddings:
        shapes["output_layer.weight"] = (d.padded_vocab_size, h)
    out, base = {}, 0
    for key, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        out[key] = torch.arange(base, base + n, dtype=torch.float64).reshape(shape)
        base += n
    return out


def hf_full(d: ModelDims, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent reference: Megatron -> HF names, unsharded (the classic converter math)."""
    qpg, hd = d.num_heads // d.num_kv_heads, d.head_dim
    out = {
        "model.embed_tokens.weight": t["embedding.word_embeddings.weight"][: d.vocab_size],
        "model.norm.weight": t["decoder.final_layernorm.weight"],
    }
    if not d.tied_embeddings:
        out["lm_head.weight"] = t["output_layer.weight"][: d.vocab_size]
    for i in range(_L):
        qkv = t["decoder.layers.self_attention.linear_qkv.weight"][i]
        grouped = qkv.reshape(d.num_kv_heads, qpg + 2, hd, d.hidden_size)
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = grouped[:, :qpg].reshape(-1, d.hidden_size)
        out[p + "self_attn.k_proj.weight"] = grouped[:, qpg].reshape(-1, d.hidden_size)
        out[p + "self_attn.v_proj.weight"] = grouped[:, qpg + 1].reshape(-1, d.hidden_size)
        gate, up = t["decoder.layers.mlp.linear_fc1.weight"][i].chunk(2)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "self_attn.o_proj.weight"] = t["decoder.layers.self_attention.linear_proj.weight"][
            i
        ]
        out[p + "mlp.down_proj.weight"] = t["decoder.layers.mlp.linear_fc2.weight"][i]
        out[p + "input_layernorm.weight"] = t[
            "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
        ][i]
        out[p + "post_attention_layernorm.weight"] = t[
            "decoder.layers.mlp.linear_fc1.layer_norm_weight"
        ][i]
    return out


def sglang_shard(d: ModelDims, hf: dict[str, torch.Tensor], tp: Tp) -> dict[str, torch.Tensor]:
    """What SGLang's weight loaders put on rank ``tp`` (reference written from linear.py)."""
    hd, r, n = d.head_dim, tp.rank, tp.size

    def rows(x: torch.Tensor, k: int, i: int) -> torch.Tensor:
        step = x.shape[0] // k
        return x[i * step : (i + 1) * step]

    out = {}
    for name, x in hf.items():
        if name.endswith(
            (
                "q_proj.weight",
                "k_proj.weight",
                "v_proj.weight",
                "gate_proj.weight",
                "up_proj.weight",
            )
        ):
            continue
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            out[name] = rows(x.T, n, r).T
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            pad = 64 if (-(-d.vocab_size // 64) * 64) % n == 0 else 64 * n
            per = -(-d.vocab_size // pad) * pad // n
            shard = torch.zeros(per, d.hidden_size, dtype=x.dtype)
            valid = x[r * per : (r + 1) * per]
            shard[: valid.shape[0]] = valid
            out[name] = shard
        else:
            out[name] = x
    for i in range(_L):
        p = f"model.layers.{i}."
        q = rows(hf[p + "self_attn.q_proj.weight"], n, r)
        if n >= d.num_kv_heads:
            kv_rank, kv_n = r // (n // d.num_kv_heads), d.num_kv_heads
        else:
            kv_rank, kv_n = r, n
        k = rows(hf[p + "self_attn.k_proj.weight"], kv_n, kv_rank)
        v = rows(hf[p + "self_attn.v_proj.weight"], kv_n, kv_rank)
        out[p + "self_attn.qkv_proj.weight"] = torch.cat([q, k, v])
        out[p + "mlp.gate_up_proj.weight"] = torch.cat(
            [rows(hf[p + "mlp.gate_proj.weight"], n, r), rows(hf[p + "mlp.up_proj.weight"], n, r)]
        )
    assert hd  # keeps the reference explicit about head_dim usage
    return out


def run_plan(d: ModelDims, t: dict[str, torch.Tensor], tp: Tp) -> dict[str, torch.Tensor]:
    plan = plan_rank(LLAMA, d, {k: Meta(tuple(v.shape)) for k, v in t.items()}, tp)
    out = {}
    for p in plan.params:
        dest = torch.full(p.shape, float("nan"), dtype=torch.float64)
        for r in p.reads:
            block = t[r.key][tuple(slice(lo, hi) for lo, hi in r.region)]
            dest[r.dst[0] : r.dst[1]] = block.reshape(dest[r.dst[0] : r.dst[1]].shape)
        if p.zero_rows:
            dest[p.zero_rows[0] : p.zero_rows[1]] = 0
        out[p.name] = dest
    return out


def dims(
    heads: int, groups: int, hd: int, ffn: int, vocab: int, padded: int, tied: bool = False
) -> ModelDims:
    return ModelDims(_L, heads * hd, ffn, heads, groups, hd, padded, vocab, tied)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[ModelDims, int]:
    tp = draw(st.sampled_from([1, 2, 4, 8]))
    groups = draw(st.sampled_from([g for g in (1, 2, 4, 8) if g % tp == 0 or tp % g == 0]))
    heads = groups * draw(st.integers(1, 4))
    heads = heads if heads % tp == 0 else heads * tp
    hd = draw(st.sampled_from([2, 4, 8]))
    ffn = tp * draw(st.integers(1, 6))
    vocab = draw(st.integers(1, 300))
    padded = vocab + draw(st.integers(0, 130))
    return dims(heads, groups, hd, ffn, vocab, padded, draw(st.booleans())), tp


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_every_rank_matches_sglang_reference(layout: tuple[ModelDims, int]) -> None:
    d, n = layout
    t = megatron_tensors(d)
    hf = hf_full(d, t)
    for r in range(n):
        got, want = run_plan(d, t, Tp(r, n)), sglang_shard(d, hf, Tp(r, n))
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), (name, r, n)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_union_of_ranks_rebuilds_full_hf_tensors(tp: int) -> None:
    d = dims(heads=4, groups=2, hd=8, ffn=48, vocab=250, padded=256)
    t = megatron_tensors(d)
    hf = hf_full(d, t)
    shards = [run_plan(d, t, Tp(r, tp)) for r in range(tp)]
    o_proj = torch.cat([s["model.layers.1.self_attn.o_proj.weight"] for s in shards], dim=1)
    assert torch.equal(o_proj, hf["model.layers.1.self_attn.o_proj.weight"])
    q_rows = d.num_heads * d.head_dim // tp
    q = torch.cat([s["model.layers.0.self_attn.qkv_proj.weight"][:q_rows] for s in shards])
    assert torch.equal(q, hf["model.layers.0.self_attn.q_proj.weight"])
    emb = torch.cat([s["model.embed_tokens.weight"] for s in shards])[: d.vocab_size]
    assert torch.equal(emb, hf["model.embed_tokens.weight"])


def test_indivisible_sizes_name_the_dimension() -> None:
    d = dims(heads=6, groups=3, hd=4, ffn=30, vocab=100, padded=128)
    t = {k: Meta(tuple(v.shape)) for k, v in megatron_tensors(d).items()}
    with pytest.raises(ShardingError, match=r"num_attention_heads \(size 6\) across 4 TP ranks"):
        plan_rank(LLAMA, d, t, Tp(0, 4))
    d2 = dims(heads=4, groups=4, hd=4, ffn=30, vocab=100, padded=128)
    t2 = {k: Meta(tuple(v.shape)) for k, v in megatron_tensors(d2).items()}
    with pytest.raises(ShardingError, match=r"ffn_hidden_size \(size 30\) across 4"):
        plan_rank(LLAMA, d2, t2, Tp(0, 4))
    d3 = dims(heads=12, groups=3, hd=4, ffn=24, vocab=9, padded=16)
    t3 = {k: Meta(tuple(v.shape)) for k, v in megatron_tensors(d3).items()}
    with pytest.raises(ShardingError, match="replicate 3 KV heads .* across 4 TP ranks"):
        plan_rank(LLAMA, d3, t3, Tp(0, 4))


def test_plan_prints_readably() -> None:
    d = dims(heads=4, groups=2, hd=8, ffn=48, vocab=250, padded=256)
    t = {k: Meta(tuple(v.shape)) for k, v in megatron_tensors(d).items()}
    text = str(plan_rank(LLAMA, d, t, Tp(1, 2)))
    assert "TP rank 1/2" in text
    assert "model.layers.0.self_attn.qkv_proj.weight [32, 32]" in text
    # rank 1 holds query group 1 whole: its [q; k; v] rows are one contiguous read
    assert "rows 0:32 <- decoder.layers.self_attention.linear_qkv.weight[0:1, 32:64, 0:32]" in text
    assert "rows 24:48 <- decoder.layers.mlp.linear_fc1.weight[0:1, 72:96, 0:32]" in text
    assert "zeros (vocab padding)" in text


def test_unknown_checkpoint_tensor_is_an_error_ignored_ones_are_not() -> None:
    d = dims(heads=4, groups=2, hd=8, ffn=48, vocab=250, padded=256)
    keys = list(megatron_tensors(d)) + [
        "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight",
        "decoder.layers.self_attention.linear_qkv._extra_state/shard_0_2",
        "chained_0.optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.float32).param",
    ]
    assert len(check_checkpoint_keys(LLAMA, d, keys)) == 3
    with pytest.raises(WeightMismatchError, match="decoder.layers.mlp.router.weight"):
        check_checkpoint_keys(LLAMA, d, keys + ["decoder.layers.mlp.router.weight"])


def test_table_rejects_a_key_mapped_twice() -> None:
    from sglang_megatron_loader.models.table import Mapping, ModelTable

    m = LLAMA.per_layer[0]
    with pytest.raises(ValueError, match="named twice"):
        ModelTable(
            "bad", "X", "decoder.layers.", (m, Mapping("other.{}", m.sources, m.rule)), (), ()
        )
