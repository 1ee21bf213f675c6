"""Typed sharding rules: how one Megatron tensor fills one SGLang parameter on one TP rank.

A rule sees the source tensor's shape *without* the stacked layer axis and returns the target
shape on the rank plus a list of :class:`Block` copies (source region -> destination rows).
Rows of the target that no block covers are listed as ``zero_rows`` (vocab padding only).
Format changes (qkv regrouping, gate/up) and TP distribution are both expressed as row blocks,
so every rule is a pure function of shapes that can be printed and tested without data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sglang_megatron_loader.config import ModelDims
from sglang_megatron_loader.errors import ShardingError, WeightMismatchError

Region = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Tp:
    """Target tensor-parallel position; ``ep_rank``/``ep_size``: SGLang's MoE expert-parallel
    position (``--ep-size``), which only expert weights use (not part of equality)."""

    rank: int
    size: int
    ep_rank: int = field(default=0, compare=False)
    ep_size: int = field(default=1, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ShardingError(f"tp_rank {self.rank} is outside tp_size {self.size}")
        if self.size % self.ep_size or not 0 <= self.ep_rank < self.ep_size:
            raise ShardingError(
                f"ep_rank {self.ep_rank} / ep_size {self.ep_size} does not fit tp_size {self.size}"
                " (--ep-size must divide --tp-size)"
            )

    @property
    def expert_tp(self) -> Tp:
        """The position that splits each expert's FFN: SGLang's ``moe_tp_rank``/``moe_tp_size``
        (``tp_size / ep_size`` ranks, ``moe_tp_rank = tp_rank % moe_tp_size``)."""
        n = self.size // self.ep_size
        return Tp(self.rank % n, n)


@dataclass(frozen=True)
class Block:
    """Copy source ``region`` (layer axis excluded) into target rows ``[dst[0], dst[1])`` of
    ``target[lead]`` (``lead``: leading indices, e.g. the local expert of a fused MoE weight);
    the region's dim ``row_dim`` holds the rows (1 after a stored expert axis)."""

    region: Region
    dst: tuple[int, int]
    lead: tuple[int, ...] = ()
    row_dim: int = 0

    def __post_init__(self) -> None:
        rows = self.region[self.row_dim][1] - self.region[self.row_dim][0]
        if rows != self.dst[1] - self.dst[0] or rows <= 0:
            raise ValueError(f"block {self.region} -> rows {self.dst}: row counts differ")


@dataclass(frozen=True)
class RuleResult:
    shape: tuple[int, ...]
    blocks: tuple[Block, ...]
    zero_rows: tuple[int, int] | None = None


def split(size: int, tp: Tp, what: str) -> tuple[int, int]:
    """``[start, stop)`` of rank ``tp.rank`` when ``size`` is split evenly across ``tp.size``."""
    if size % tp.size:
        raise ShardingError(
            f"cannot evenly split {what} (size {size}) across {tp.size} TP ranks; "
            f"choose a --tp-size that divides {size}"
        )
    n = size // tp.size
    return tp.rank * n, (tp.rank + 1) * n


def _full(shape: tuple[int, ...], rows: tuple[int, int]) -> Region:
    return (rows, *((0, d) for d in shape[1:]))


def _expect(shape: tuple[int, ...], expected: tuple[int, ...], what: str) -> None:
    if tuple(shape) != tuple(expected):
        raise WeightMismatchError(
            f"{what}: stored shape {tuple(shape)} does not match the config, expected {expected}"
        )


class Rule:
    """Base class; subclasses implement :meth:`apply`."""

    def apply(self, shape: tuple[int, ...], dims: ModelDims, tp: Tp, what: str) -> RuleResult:
        raise NotImplementedError


class Replicated(Rule):
    """Every rank holds the whole 1-D tensor of ``size`` (a ``ModelDims`` field): norm weights
    over the hidden size, qk-layernorm weights over the head dim."""

    def __init__(self, size: str = "hidden_size") -> None:
        self.size = size

    def apply(self, shape: tuple[int, ...], dims: ModelDims, tp: Tp, what: str) -> RuleResult:
        _expect(shape, (getattr(dims, self.size),), what)
        return RuleResult(tuple(shape), (Block(_full(shape, (0, shape[0])), (0, shape[0])),))


class RowParallel(Rule):
    """Split on the input dim (dim 1): ``o_proj`` from ``linear_proj``, ``down_proj`` from fc2."""

    def __init__(self, input_dim: str) -> None:
        self.input_dim = input_dim

    def apply(self, shape: tuple[int, ...], dims: ModelDims, tp: Tp, what: str) -> RuleResult:
        inner = {"attention": dims.num_heads * dims.head_dim, "ffn": dims.ffn_hidden_size}
        _expect(shape, (dims.hidden_size, inner[self.input_dim]), what)
        lo, hi = split(shape[1], tp, f"{what} input dim")
        block = Block(((0, shape[0]), (lo, hi)), (0, shape[0]))
        return RuleResult((shape[0], hi - lo), (block,))


class GatedMLP(Rule):
    """Megatron fc1 ``[gate_all; up_all]`` -> SGLang ``gate_up_proj`` ``[gate_rank; up_rank]``."""

    def apply(self, shape: tuple[int, ...], dims: ModelDims, tp: Tp, what: str) -> RuleResult:
        f = dims.ffn_hidden_size
        _expect(shape, (2 * f, dims.hidden_size), what)
        lo, hi = split(f, tp, "ffn_hidden_size")
        n = hi - lo
        gate = Block(_full(shape, (lo, hi)), (0, n))
        up = Block(_full(shape, (f + lo, f + hi)), (n, 2 * n))
        return RuleResult((2 * n, shape[1]), (gate, up))


class QKV(Rule):
    """Megatron per-group ``[q_g; k_g; v_g]`` rows -> SGLang ``[q_rank; k_rank; v_rank]``.

    Query heads split evenly across ranks; KV heads split when ``tp <= groups``, otherwise each
    rank holds the one KV head ``rank // (tp / groups)`` (SGLang's replication). The weight is
    ``[rows, hidden]``; with ``bias=True`` the 1-D ``linear_qkv.bias``, whose rows are grouped
    the same way, is regrouped and sharded alike.
    """

    def __init__(self, bias: bool = False) -> None:
        self.bias = bias

    def apply(self, shape: tuple[int, ...], dims: ModelDims, tp: Tp, what: str) -> RuleResult:
        nq, ng, h = dims.num_heads, dims.num_kv_heads, dims.head_dim
        _expect(shape, ((nq + 2 * ng) * h, *(() if self.bias else (dims.hidden_size,))), what)
        if nq % ng:
            raise ShardingError(f"{what}: {nq} query heads are not a multiple of {ng} query groups")
        q_lo, q_hi = split(nq, tp, "num_attention_heads")
        kv_heads = self.kv_heads(ng, tp)
        per_group, group_rows = nq // ng, (nq // ng + 2) * h
        blocks, row = [], 0
        for head in range(q_lo, q_hi):  # coalesced below
            g, j = divmod(head, per_group)
            start = g * group_rows + j * h
            blocks.append(Block(_full(shape, (start, start + h)), (row, row + h)))
            row += h
        for offset in (per_group * h, (per_group + 1) * h):  # k then v
            for g in kv_heads:
                start = g * group_rows + offset
                blocks.append(Block(_full(shape, (start, start + h)), (row, row + h)))
                row += h
        return RuleResult((row, *shape[1:]), coalesce(blocks))

    @staticmethod
    def kv_heads(ng: int, tp: Tp) -> range:
        if tp.size >= ng:
            if tp.size % ng:
                raise ShardingError(
                    f"cannot replicate {ng} KV heads (num_query_groups) across {tp.size} TP "
                    f"ranks: {tp.size} is not a multiple of {ng}"
                )
            g = tp.rank // (tp.size // ng)
            return range(g, g + 1)
        lo, hi = split(ng, tp, "num_query_groups (KV heads)")
        return range(lo, hi)


class VocabParallel(Rule):
    """Rows of the padded vocab as SGLang's ``VocabParallelEmbedding`` shards them.

    Megatron's padded rows (>= true vocab) are dropped; SGLang's own padding rows are zeroed.
    """

    def __init__(self, pad_to: int = 64) -> None:
        self.pad_to = pad_to

    def apply(self, shape: tuple[int, ...], dims: ModelDims, tp: Tp, what: str) -> RuleResult:
        vocab = dims.vocab_size
        if len(shape) != 2 or shape[1] != dims.hidden_size:
            _expect(shape, (dims.padded_vocab_size, dims.hidden_size), what)
        if vocab > shape[0]:
            raise WeightMismatchError(
                f"{what}: config vocab_size {vocab} exceeds the {shape[0]} stored rows; lower the "
                "vocab_size override to at most the stored (padded) vocabulary"
            )
        start, stop = sglang_vocab_shard(vocab, tp, self.pad_to)
        valid_stop = min(stop, vocab)
        rows = stop - start
        blocks: tuple[Block, ...] = ()
        if valid_stop > start:
            blocks = (Block(_full(shape, (start, valid_stop)), (0, valid_stop - start)),)
        n_valid = max(0, valid_stop - start)
        zero = (n_valid, rows) if n_valid < rows else None
        return RuleResult((rows, shape[1]), blocks, zero)


def sglang_vocab_shard(vocab: int, tp: Tp, pad_to: int = 64) -> tuple[int, int]:
    """Padded-vocab row range of a rank, mirroring ``VocabParallelEmbedding.__init__``."""
    if _pad(vocab, pad_to) % tp.size:
        pad_to *= tp.size
    per = _pad(vocab, pad_to) // tp.size
    return tp.rank * per, (tp.rank + 1) * per


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def coalesce(blocks: list[Block]) -> tuple[Block, ...]:
    """Merge neighbours whose source rows and destination rows both continue."""
    out: list[Block] = []
    for b in blocks:
        if out:
            last = out[-1]
            (s0, s1), rest = last.region[0], last.region[1:]
            if s1 == b.region[0][0] and last.dst[1] == b.dst[0] and rest == b.region[1:]:
                out[-1] = Block(((s0, b.region[0][1]), *rest), (last.dst[0], b.dst[1]))
                continue
        out.append(b)
    return tuple(out)
