"""Pure layout of Megatron-LM's legacy ``torch`` format: per-rank local tensors -> global tensors.

No I/O. Each (TP rank, PP rank, virtual-pipeline chunk) holds an mcore ``state_dict`` whose layer
indices are local to the chunk and whose tensors are that TP rank's partition. This module knows
how mcore's layers partition each tensor (the legacy format records nothing about it) and
expresses every rank's share as *pieces* of the global tensors ``torch_dist`` would store under
the same keys: stacked ``decoder.layers.<name>`` with a leading layer axis, the other keys as
they are. The pieces then play the role of DCP chunks.

Mixture-of-experts layers (``legacy_experts``): each expert's tensors, spread over the
expert-parallel files and split over the expert-TP ranks, become one global tensor per layer
with a leading expert axis, ``mlp.experts.experts.linear_fc1.weight`` ``[E, 2F, H]`` and
``linear_fc2.weight`` ``[E, H, F]`` (stacked over layers as torch_dist stores them); dense
tensors, repeated in every expert-parallel file of a TP rank, are read from one of them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_megatron_loader.checkpoint import legacy_experts as experts
from sglang_megatron_loader.checkpoint.legacy_experts import RankLayout
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
        (r"(^|\.)_extra_state\d*$", None),
        (_NORM, REPLICATED),
        (r"linear_qkv\.(weight|bias)$", COLUMN),
        (r"linear_fc1\.(weight|bias)$", GATED),  # COLUMN when the MLP is not gated
        (r"(linear_proj|linear_fc2)\.weight$", ROW),
        (r"(linear_proj|linear_fc2)\.bias$", REPLICATED),
        (r"^(embedding\.word_embeddings\.weight|output_layer\.(weight|bias))$", COLUMN),
        (r"^embedding\.position_embeddings\.weight$", REPLICATED),
        (r"(^|\.)mlp\.router\.weight$", REPLICATED),  # every TP and EP rank holds it whole
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
    """One tensor of one model chunk of one rank's file, as stored (``key`` is the stored key;
    ``ep``: the file's expert-parallel rank)."""

    tp: int
    pp: int
    vp: int
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str  # for messages
    ep: int = 0


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
    tensors: list[LocalTensor],
    *,
    tp: int,
    pp: int,
    vpp: int,
    num_layers: int,
    gated: bool,
    ep: int = 1,
    etp: int | None = None,
    num_experts: int = 0,
) -> dict[str, GlobalTensor]:
    """Every model tensor of the training layout as a global tensor made of per-rank pieces
    (``ep``, ``etp``, ``num_experts``: the expert layout, :class:`RankLayout`)."""
    ranks = RankLayout(tp, pp, ep, etp, num_experts)
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
    dense_from = ranks.dense_sources()
    by_name: dict[tuple[str, int | None], dict[int, LocalTensor]] = defaultdict(dict)
    by_expert: dict[tuple[str, int], dict[tuple[int, int], LocalTensor]] = defaultdict(dict)
    stage_of: dict[tuple[str, int | None], tuple[int, int]] = {}
    for t in tensors:
        name = global_name(t, offsets[(t.pp, t.vp)])
        if stage_of.setdefault(name, (t.pp, t.vp)) != (t.pp, t.vp):
            p, v = stage_of[name]
            raise CorruptCheckpointError(
                f"{t.file}: key '{t.key}' (global '{name[0]}') is also held by pipeline rank "
                f"{p} chunk {v}; each tensor must belong to one pipeline stage"
            )
        if not _file_expert(t, name, ranks, by_expert) and dense_from.get((t.tp, t.pp)) == t.ep:
            by_name[name][t.tp] = t
    per_layer: dict[tuple[str, int | None], GlobalTensor] = {}
    for (key, layer), held in by_name.items():
        rule = partition_of(key, gated=gated)
        if rule is not None:
            per_layer[(key, layer)] = _merge_tp(key, held, rule, tp)
    for (key, layer), slots in by_expert.items():
        per_layer[(key, layer)] = _merge_experts(key, layer, slots, ranks, gated)
    return _stack(per_layer, num_layers)


def _file_expert(
    t: LocalTensor,
    name: tuple[str, int | None],
    ranks: RankLayout,
    by_expert: dict[tuple[str, int], dict[tuple[int, int], LocalTensor]],
) -> bool:
    """File a per-expert tensor under its (global key, layer) at (global expert, expert-TP
    rank); False for a key that is no expert's. Refuses expert layouts that are not served."""
    key, layer = name
    rest = key[len(LAYER_PREFIX) :] if layer is not None else ""
    hit = experts.expert_key(rest)
    if hit is None or layer is None:
        why = experts.refusal(rest)
        if why is not None:
            raise UnsupportedCheckpointError(f"{t.file}: key '{t.key}': {why}")
        return False
    gkey, j = LAYER_PREFIX + hit[0], hit[1]
    if j >= ranks.local_experts:
        raise CorruptCheckpointError(
            f"{t.file}: key '{t.key}' is local expert {j}, but args give {ranks.local_experts} "
            f"experts per rank (num_experts={ranks.num_experts} over "
            f"expert_model_parallel_size={ranks.ep})"
        )
    slot = (t.ep * ranks.local_experts + j, ranks.files[(t.tp, t.pp, t.ep)])
    other = by_expert[(gkey, layer)].setdefault(slot, t)
    if other is not t:
        raise CorruptCheckpointError(
            f"{t.file}: key '{t.key}' holds expert {slot[0]} of layer {layer} (expert TP rank "
            f"{slot[1]}), which {other.file} also holds as '{other.key}'; each expert is "
            "stored once"
        )
    return True


def _merge_experts(
    key: str,
    layer: int,
    slots: dict[tuple[int, int], LocalTensor],
    ranks: RankLayout,
    gated: bool,
) -> GlobalTensor:
    """One layer's per-expert tensors -> ``[E, ...]``: expert ``e``'s expert-TP shards are
    merged as a dense layer's TP shards (fc1 ``[gate_r; up_r]`` halves, fc2 by columns), then
    placed at ``e`` on a leading expert axis."""
    rule = partition_of(key, gated=gated)
    if rule is None:  # unreachable: per-expert weights are column- or row-parallel
        raise UnsupportedCheckpointError(f"'{key}': no tensor-parallel layout")
    first: tuple[GlobalTensor, LocalTensor] | None = None
    pieces: list[Piece] = []
    for e in range(ranks.num_experts):
        shards = {r: slots[(e, r)] for r in range(ranks.expert_tp) if (e, r) in slots}
        if len(shards) < ranks.expert_tp:
            raise _missing_expert(e, layer, shards, slots, ranks)
        g = _merge_tp(key, shards, rule, ranks.expert_tp, "expert TP rank")
        if first is None:
            first = (g, shards[0])
        elif (g.dtype, g.shape) != (first[0].dtype, first[0].shape):
            t, f = shards[0], first[1]
            raise CorruptCheckpointError(
                f"{t.file}: key '{t.key}' (expert {e} of layer {layer}) makes {g.dtype} "
                f"{list(g.shape)}, but expert 0 ('{f.key}' in {f.file}) makes "
                f"{first[0].dtype} {list(first[0].shape)}; every expert has the same shape"
            )
        pieces += [Piece(p.source, p.row0, (e, *p.offsets), (1, *p.sizes)) for p in g.pieces]
    if first is None:
        raise CorruptCheckpointError(f"'{key}' of layer {layer}: args give num_experts=0")
    g = first[0]
    return GlobalTensor(key, g.dtype, (ranks.num_experts, *g.shape), tuple(pieces))


def _missing_expert(
    e: int,
    layer: int,
    shards: dict[int, LocalTensor],
    slots: dict[tuple[int, int], LocalTensor],
    ranks: RankLayout,
) -> CorruptCheckpointError:
    """The error for expert ``e``'s shards that no file holds: names the file and key."""
    sibling = next(iter(slots.values()))
    r = next(r for r in range(ranks.expert_tp) if r not in shards)
    t, p, ep = ranks.holder(sibling.pp, e, r)
    path = Path(sibling.file)
    where = path.parent.parent / ranks.folder(t, p, ep) / path.name
    key = experts.with_local_index(sibling.key, e % ranks.local_experts)
    return CorruptCheckpointError(
        f"{where}: key '{key}' is missing (expert {e} of layer {layer}, expert-parallel rank "
        f"{ep}, expert TP rank {r}); other ranks hold this layer's experts, e.g. "
        f"'{sibling.key}' in {sibling.file}. The save is incomplete or the copy partial"
    )


def _merge_tp(
    key: str, ranks: dict[int, LocalTensor], rule: Partition, tp: int, what: str = "TP rank"
) -> GlobalTensor:
    """One key's TP partitions -> a global tensor with one piece per rank (two when gated)."""
    first = ranks.get(0)
    needed = [0] if isinstance(rule, Replicated) else list(range(tp))
    missing = [r for r in needed if r not in ranks]
    if first is None or missing:
        holder = next(iter(ranks.values()))
        raise CorruptCheckpointError(
            f"{holder.file}: key '{holder.key}' is missing on {what}(s) {missing or [0]} of the "
            f"same pipeline stage ({rule.name} across {tp} ranks)"
        )
    for r in needed:
        t = ranks[r]
        if t.shape != first.shape or t.dtype != first.dtype:
            raise CorruptCheckpointError(
                f"{t.file}: key '{t.key}' is {t.dtype} {list(t.shape)} on {what} {r} but "
                f"{first.dtype} {list(first.shape)} on {what} 0 ({first.file}); the ranks of a "
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
