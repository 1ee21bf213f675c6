"""Pure layout of Megatron-LM's legacy ``torch`` format: per-rank local tensors -> global tensors.

No I/O. Each (TP rank, PP rank, virtual-pipeline chunk) holds an mcore ``state_dict`` whose layer
indices are local to the chunk and whose tensors are that TP rank's partition. This module knows
how mcore's layers partition each tensor (the legacy format records nothing about it) and
expresses every rank's share as *pieces* of the global tensors ``torch_dist`` would store under
the same keys: stacked ``decoder.layers.<name>`` with a leading layer axis, the other keys as
they are. The pieces then play the role of DCP chunks.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from sglang_megatron_loader.errors import CorruptCheckpointError, UnsupportedCheckpointError

LAYER_PREFIX = "decoder.layers."
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# mcore's local spec renames these when it builds the sharded state dict
# (``sharded_state_dict_keys_map`` in ``gpt_layer_specs.py``); the legacy state_dict keeps the
# module names. Renamed here so both formats present the same keys.
KEYS_MAP = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


class Partition:
    """How one tensor is split across TP ranks (a rule per kind of mcore layer)."""

    name = "?"


class Replicated(Partition):
    """Every TP rank holds the whole tensor (norms, row-parallel biases): rank 0's copy is used."""

    name = "replicated"


class Split(Partition):
    """Rank ``t`` holds the ``t``-th equal block along ``dim``. Column-parallel layers (qkv: whole
    query groups per rank; embedding and output: padded-vocab rows) split dim 0, row-parallel
    ``linear_proj``/``linear_fc2`` split dim 1."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.name = f"split dim {dim}"


class GatedSplit(Partition):
    """SwiGLU ``linear_fc1``: rank ``t`` holds ``[gate_t; up_t]``, the global tensor is
    ``[gate_0 .. gate_{tp-1}; up_0 .. up_{tp-1}]``: each half of a rank is its own piece."""

    name = "gated split dim 0"


REPLICATED, COLUMN, ROW, GATED = Replicated(), Split(0), Split(1), GatedSplit()
_NORM = r"(layer_norm_(weight|bias)|(^|\.)(input_layernorm|pre_mlp_layernorm|q_layernorm|k_layernorm|final_layernorm)\.(weight|bias))$"  # noqa: E501

# (pattern over the global key, partition); the first match wins. ``None``: not a tensor to load.
PARTITIONS: tuple[tuple[re.Pattern[str], Partition | None], ...] = tuple(
    (re.compile(p), rule)
    for p, rule in (
        (r"(^|\.)_extra_state$", None),
        (_NORM, REPLICATED),
        (r"linear_qkv\.(weight|bias)$", COLUMN),
        (r"linear_fc1\.(weight|bias)$", GATED),  # COLUMN when the MLP is not gated
        (r"(linear_proj|linear_fc2)\.weight$", ROW),
        (r"(linear_proj|linear_fc2)\.bias$", REPLICATED),
        (r"^(embedding\.word_embeddings\.weight|output_layer\.(weight|bias))$", COLUMN),
        (r"^embedding\.position_embeddings\.weight$", REPLICATED),
    )
)


def partition_of(key: str, *, gated: bool) -> Partition | None:
    """The TP partition of global key ``key``; raises for a key mcore's GPT layers lack."""
    for pattern, rule in PARTITIONS:
        if pattern.search(key):
            return COLUMN if rule is GATED and not gated else rule
    raise UnsupportedCheckpointError(
        f"legacy checkpoint key '{key}': its tensor-parallel layout is unknown (not a layer of "
        "mcore's GPT model this loader knows), so the per-rank files cannot be merged"
    )


@dataclass(frozen=True)
class LocalTensor:
    """One tensor of one model chunk of one rank, as stored (``key`` is the stored key)."""

    tp: int
    pp: int
    vp: int
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str  # for messages


@dataclass(frozen=True)
class Piece:
    """Rows ``[row0, row0 + rows)`` of ``source`` (all of its other dims) placed at ``offsets``
    of the global tensor with extents ``sizes`` (a stacked key has a leading layer axis of 1)."""

    source: LocalTensor
    row0: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class GlobalTensor:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]


def global_name(local: LocalTensor, layer_offset: int) -> tuple[str, int | None]:
    """(key without the layer index, global layer) of a layer key, else (key, None)."""
    hit = _LAYER_KEY.match(local.key)
    if hit is None:
        return local.key, None
    rest = hit.group(2)
    for old, new in KEYS_MAP.items():
        if rest.startswith(old):
            rest = new + rest[len(old) :]
    return LAYER_PREFIX + rest, layer_offset + int(hit.group(1))


def layer_offsets(
    counts: dict[tuple[int, int], int], pp: int, vpp: int
) -> dict[tuple[int, int], int]:
    """First global layer of each (pp rank, vp chunk): chunks hold consecutive layers in
    virtual-stage order ``vp * pp + pp_rank`` (Megatron's interleaved schedule). Counts come from
    the files, so uneven first/last stages need no formula."""
    out, first = {}, 0
    for vp in range(vpp):
        for p in range(pp):
            out[(p, vp)] = first
            first += counts.get((p, vp), 0)
    return out


def layer_count(tensors: list[LocalTensor]) -> int:
    """Layers of one model chunk: its local indices must be exactly ``0..n-1``."""
    indices = {int(m.group(1)) for t in tensors if (m := _LAYER_KEY.match(t.key))}
    if indices and indices != set(range(len(indices))):
        where = tensors[0].file
        raise CorruptCheckpointError(
            f"{where}: model chunk has layer indices {sorted(indices)}; expected 0..n-1 (the "
            "legacy format stores stage-local indices)"
        )
    return len(indices)


def merge(
    tensors: list[LocalTensor], *, tp: int, pp: int, vpp: int, num_layers: int, gated: bool
) -> dict[str, GlobalTensor]:
    """Every model tensor of the training layout as a global tensor made of per-rank pieces."""
    chunks: dict[tuple[int, int], list[LocalTensor]] = defaultdict(list)
    for t in tensors:
        if t.tp == 0:
            chunks[(t.pp, t.vp)].append(t)
    counts = {pv: layer_count(ts) for pv, ts in chunks.items()}
    offsets = layer_offsets(counts, pp, vpp)
    if sum(counts.values()) != num_layers:
        raise CorruptCheckpointError(
            f"the per-rank files hold {sum(counts.values())} transformer layers in all "
            f"({ {f'pp{p}/vp{v}': n for (p, v), n in sorted(counts.items())} }); args say "
            f"num_layers={num_layers}"
        )
    by_name: dict[tuple[str, int | None], dict[int, LocalTensor]] = defaultdict(dict)
    stage_of: dict[tuple[str, int | None], tuple[int, int]] = {}
    for t in tensors:
        name = global_name(t, offsets[(t.pp, t.vp)])
        if stage_of.setdefault(name, (t.pp, t.vp)) != (t.pp, t.vp):
            p, v = stage_of[name]
            raise CorruptCheckpointError(
                f"{t.file}: key '{t.key}' (global '{name[0]}') is also held by pipeline rank "
                f"{p} chunk {v}; each tensor must belong to one pipeline stage"
            )
        by_name[name][t.tp] = t
    per_layer: dict[tuple[str, int | None], GlobalTensor] = {}
    for (key, layer), ranks in by_name.items():
        rule = partition_of(key, gated=gated)
        if rule is not None:
            per_layer[(key, layer)] = _merge_tp(key, ranks, rule, tp)
    return _stack(per_layer, num_layers)


def _merge_tp(key: str, ranks: dict[int, LocalTensor], rule: Partition, tp: int) -> GlobalTensor:
    """One key's TP partitions -> a global tensor with one piece per rank (two when gated)."""
    first = ranks.get(0)
    needed = [0] if isinstance(rule, Replicated) else list(range(tp))
    missing = [r for r in needed if r not in ranks]
    if first is None or missing:
        holder = next(iter(ranks.values()))
        raise CorruptCheckpointError(
            f"{holder.file}: key '{holder.key}' is missing on TP rank(s) {missing or [0]} of the "
            f"same pipeline stage ({rule.name} across {tp} ranks)"
        )
    for r in needed:
        t = ranks[r]
        if t.shape != first.shape or t.dtype != first.dtype:
            raise CorruptCheckpointError(
                f"{t.file}: key '{t.key}' is {t.dtype} {list(t.shape)} on TP rank {r} but "
                f"{first.dtype} {list(first.shape)} on TP rank 0 ({first.file}); the ranks of a "
                "legacy checkpoint hold equal partitions"
            )
    shape = first.shape
    if isinstance(rule, Replicated) or tp == 1:
        return GlobalTensor(key, first.dtype, shape, (Piece(first, 0, (0,) * len(shape), shape),))
    if isinstance(rule, Split):
        if rule.dim >= len(shape):
            raise CorruptCheckpointError(
                f"{first.file}: key '{first.key}' has shape {list(shape)}, expected a dim "
                f"{rule.dim} to split across TP ranks"
            )
        n = shape[rule.dim]
        at = [tuple(r * n if d == rule.dim else 0 for d in range(len(shape))) for r in range(tp)]
        pieces = tuple(Piece(ranks[r], 0, at[r], shape) for r in range(tp))
        glob = tuple(n * tp if d == rule.dim else s for d, s in enumerate(shape))
        return GlobalTensor(key, first.dtype, glob, pieces)
    if not shape or shape[0] % 2:
        raise CorruptCheckpointError(
            f"{first.file}: key '{first.key}' has {shape[0] if shape else 0} rows; a gated "
            "linear_fc1 holds [gate; up] rows, an even number"
        )
    half = shape[0] // 2
    rest = shape[1:]
    zeros = (0,) * len(rest)
    pieces = tuple(
        Piece(ranks[r], w * half, (w * half * tp + r * half, *zeros), (half, *rest))
        for w in (0, 1)  # gate rows, then up rows
        for r in range(tp)
    )
    return GlobalTensor(key, first.dtype, (shape[0] * tp, *rest), pieces)


def _stack(
    per_layer: dict[tuple[str, int | None], GlobalTensor], num_layers: int
) -> dict[str, GlobalTensor]:
    """Layer keys present in every layer with one shape and dtype become a stacked key
    ``decoder.layers.<name>`` of shape ``[num_layers, ...]`` (as torch_dist stores them);
    the others stay per layer as ``decoder.layers.<i>.<name>``."""
    out: dict[str, GlobalTensor] = {}
    layers: dict[str, dict[int, GlobalTensor]] = defaultdict(dict)
    for (key, layer), g in per_layer.items():
        if layer is None:
            out[key] = g
        else:
            layers[key][layer] = g
    for key, by_layer in layers.items():
        kinds = {(g.dtype, g.shape) for g in by_layer.values()}
        if set(by_layer) == set(range(num_layers)) and len(kinds) == 1:
            ((dtype, shape),) = kinds
            pieces = tuple(
                Piece(p.source, p.row0, (i, *p.offsets), (1, *p.sizes))
                for i in range(num_layers)
                for p in by_layer[i].pieces
            )
            out[key] = GlobalTensor(key, dtype, (num_layers, *shape), pieces)
        else:
            for i, g in by_layer.items():
                name = f"{LAYER_PREFIX}{i}.{key[len(LAYER_PREFIX) :]}"
                out[name] = GlobalTensor(name, g.dtype, g.shape, g.pieces)
    return out
