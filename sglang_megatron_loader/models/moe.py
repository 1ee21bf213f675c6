"""Mixture-of-experts families: Megatron MoE GPT models <-> SGLang ``MixtralForCausalLM`` and
``Qwen3MoeForCausalLM`` (the Llama / Qwen3 tables with the dense MLP replaced by experts).

Megatron (megatron-core 0.19, ``SequentialMLP`` and grouped-GEMM ``TEGroupedMLP`` alike: their
sharded state dicts are interchangeable) stores, per layer stacked like the dense keys:

=========================================  ==============  =====================================
``mlp.router.weight``                      ``[E, H]``      -> ``gate.weight``, replicated
``mlp.experts.experts.linear_fc1.weight``  ``[E, 2F, H]``  -> ``experts.w13_weight``
``mlp.experts.experts.linear_fc2.weight``  ``[E, H, F]``   -> ``experts.w2_weight``
=========================================  ==============  =====================================

whatever expert-parallel / expert-tensor-parallel layout trained it (the expert axis is global).
SGLang's ``FusedMoE`` (``layers/moe/fused_moe_triton/layer.py``, unquantized, standard layout)
holds on each rank the ``E / ep_size`` experts of its ``moe_ep_rank`` with their FFN split over
``moe_tp_size = tp_size / ep_size``: ``w13_weight [E_local, 2 F/moe_tp, H]`` as
``[gate_shard; up_shard]`` per expert, ``w2_weight [E_local, H, F/moe_tp]``.

Pure data plus the three expert rules. ``{}`` stands for the layer index.
"""

from __future__ import annotations

import dataclasses

from sglang_megatron_loader.config import ModelDims
from sglang_megatron_loader.errors import ShardingError
from sglang_megatron_loader.models.llama import LLAMA
from sglang_megatron_loader.models.qwen import QWEN3
from sglang_megatron_loader.models.rules import Block, Rule, RuleResult, Tp, _expect, split
from sglang_megatron_loader.models.table import Mapping, ModelTable

FC1 = "mlp.experts.experts.linear_fc1.weight"
FC2 = "mlp.experts.experts.linear_fc2.weight"
ROUTER = "mlp.router.weight"
DENSE_MLP = ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight")


def local_experts(dims: ModelDims, tp: Tp, what: str) -> range:
    """The global expert indices rank ``tp`` holds: SGLang's contiguous ``E / ep_size`` block."""
    e = dims.num_experts
    if e % tp.ep_size:
        raise ShardingError(
            f"{what}: cannot split {e} experts (num_experts) across {tp.ep_size} expert-parallel "
            f"ranks; choose an --ep-size that divides {e}"
        )
    n = e // tp.ep_size
    return range(tp.ep_rank * n, (tp.ep_rank + 1) * n)


class Router(Rule):
    """Router ``[E, H]``, replicated on every rank (SGLang's ``ReplicatedLinear`` gate)."""

    def apply(self, shape: tuple[int, ...], dims: ModelDims, tp: Tp, what: str) -> RuleResult:
        _expect(shape, (dims.num_experts, dims.hidden_size), what)
        e, h = shape
        return RuleResult((e, h), (Block(((0, e), (0, h)), (0, e)),))


class ExpertsGatedMLP(Rule):
    """Experts' fc1 ``[E, 2F, H]`` (each ``[gate_all; up_all]``) -> ``w13_weight``
    ``[E_local, 2 F_shard, H]``: this EP rank's experts, each ``[gate_shard; up_shard]`` split
    over the expert-TP position (:attr:`Tp.expert_tp`)."""

    def apply(self, shape: tuple[int, ...], dims: ModelDims, tp: Tp, what: str) -> RuleResult:
        f, h = dims.moe_ffn_hidden_size, dims.hidden_size
        _expect(shape, (dims.num_experts, 2 * f, h), what)
        lo, hi = split(f, tp.expert_tp, f"{what}: moe_ffn_hidden_size")
        n = hi - lo
        blocks = []
        for j, e in enumerate(local_experts(dims, tp, what)):
            blocks.append(Block(((e, e + 1), (lo, hi), (0, h)), (0, n), (j,), 1))
            blocks.append(Block(((e, e + 1), (f + lo, f + hi), (0, h)), (n, 2 * n), (j,), 1))
        return RuleResult((len(blocks) // 2, 2 * n, h), tuple(blocks))


class ExpertsRowParallel(Rule):
    """Experts' fc2 ``[E, H, F]`` -> ``w2_weight`` ``[E_local, H, F_shard]``: this EP rank's
    experts, split on the input dim over the expert-TP position."""

    def apply(self, shape: tuple[int, ...], dims: ModelDims, tp: Tp, what: str) -> RuleResult:
        f, h = dims.moe_ffn_hidden_size, dims.hidden_size
        _expect(shape, (dims.num_experts, h, f), what)
        lo, hi = split(f, tp.expert_tp, f"{what}: moe_ffn_hidden_size")
        experts = local_experts(dims, tp, what)
        blocks = tuple(
            Block(((e, e + 1), (0, h), (lo, hi)), (0, h), (j,), 1) for j, e in enumerate(experts)
        )
        return RuleResult((len(experts), h, hi - lo), blocks)


def _moe_table(base: ModelTable, name: str, architecture: str, block: str) -> ModelTable:
    """``base`` with its dense MLP replaced by router + experts under SGLang's ``block``."""
    dense = [m for m in base.per_layer if not set(m.sources) & set(DENSE_MLP)]
    experts = (
        Mapping(f"model.layers.{{}}.{block}.gate.weight", (ROUTER,), Router()),
        Mapping(f"model.layers.{{}}.{block}.experts.w13_weight", (FC1,), ExpertsGatedMLP()),
        Mapping(f"model.layers.{{}}.{block}.experts.w2_weight", (FC2,), ExpertsRowParallel()),
    )
    return dataclasses.replace(
        base, name=name, architecture=architecture, per_layer=(*dense, *experts)
    )


MIXTRAL = _moe_table(LLAMA, "mixtral", "MixtralForCausalLM", "block_sparse_moe")
QWEN3_MOE = _moe_table(QWEN3, "qwen3_moe", "Qwen3MoeForCausalLM", "mlp")


# HF per-expert names (gate, up, down) of each family: what HF checkpoints hold and SGLang's
# default loader reads (``experts.{e}.<name>.weight``).
HF_EXPERT_NAMES = {
    "MixtralForCausalLM": ("w1", "w3", "w2"),
    "Qwen3MoeForCausalLM": ("gate_proj", "up_proj", "down_proj"),
}


def hf_expert_parts(
    name: str, dims: ModelDims, architecture: str
) -> tuple[tuple[str, int, tuple[int, ...]], ...] | None:
    """A fused expert parameter (TP 1, EP 1) -> its HF tensors as ``(hf_name, rows, lead)``:
    ``w13_weight[e]`` rows ``[0, F)`` gate, ``[F, 2F)`` up; ``w2_weight[e]`` down. None for
    any other parameter."""
    stem, _, leaf = name.rpartition(".")
    if not stem.endswith(".experts") or leaf not in ("w13_weight", "w2_weight"):
        return None
    gate, up, down = HF_EXPERT_NAMES[architecture]
    f = dims.moe_ffn_hidden_size
    out: list[tuple[str, int, tuple[int, ...]]] = []
    for e in range(dims.num_experts):
        if leaf == "w13_weight":
            out += [(f"{stem}.{e}.{gate}.weight", f, (e,)), (f"{stem}.{e}.{up}.weight", f, (e,))]
        else:
            out.append((f"{stem}.{e}.{down}.weight", -1, (e,)))
    return tuple(out)
