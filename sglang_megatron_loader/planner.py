"""Pure planning: (tensor metadata, dims, target TP rank) -> which global slices fill which rows.

No I/O and no torch.distributed: a plan can be built, printed and tested from metadata alone.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from sglang_megatron_loader.config import ModelDims
from sglang_megatron_loader.errors import WeightMismatchError
from sglang_megatron_loader.models.rules import Region, Tp
from sglang_megatron_loader.models.table import HasShape, ModelTable


class HasDtype(Protocol):
    dtype: torch.dtype


@dataclass(frozen=True)
class Read:
    """Global ``region`` of checkpoint tensor ``key`` -> target rows ``dst`` of the parameter,
    or of ``parameter[dst_lead]`` (a fused MoE weight's local expert)."""

    key: str
    region: Region
    dst: tuple[int, int]
    dst_lead: tuple[int, ...] = ()

    def numel(self) -> int:
        n = 1
        for lo, hi in self.region:
            n *= hi - lo
        return n

    def __str__(self) -> str:
        region = ", ".join(f"{lo}:{hi}" for lo, hi in self.region)
        lead = "".join(f"[{i}]" for i in self.dst_lead)
        return f"{lead}rows {self.dst[0]}:{self.dst[1]} <- {self.key}[{region}]"


@dataclass(frozen=True)
class ParamPlan:
    """How one SGLang parameter on one rank is filled."""

    name: str
    shape: tuple[int, ...]
    reads: tuple[Read, ...]
    zero_rows: tuple[int, int] | None

    def __post_init__(self) -> None:
        by_lead: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for r in self.reads:
            by_lead.setdefault(r.dst_lead, []).append(r.dst)
        if self.zero_rows:
            by_lead.setdefault((), []).append(self.zero_rows)
        depth = {len(lead) for lead in by_lead} or {0}
        if len(depth) != 1:
            raise WeightMismatchError(f"plan for {self.name}: mixed destination depths {depth}")
        (k,) = depth
        expected = set(itertools.product(*(range(n) for n in self.shape[:k])))
        if set(by_lead) != expected and not (k == 0 and not by_lead and self.shape[0] == 0):
            missing = sorted(expected - set(by_lead))[:4]
            raise WeightMismatchError(
                f"plan for {self.name}: destinations {missing} not filled (shape {self.shape})"
            )
        for lead, covered in by_lead.items():
            pos, where = 0, "".join(f"[{i}]" for i in lead)
            for lo, hi in sorted(covered):
                if lo != pos:
                    raise WeightMismatchError(
                        f"plan for {self.name}{where}: rows {pos}..{lo} not filled exactly once"
                    )
                pos = hi
            if pos != self.shape[k]:
                raise WeightMismatchError(
                    f"plan for {self.name}{where}: fills {pos} of {self.shape[k]} rows"
                )

    def __str__(self) -> str:
        lines = [f"{self.name} {list(self.shape)}"]
        lines += [f"    {r}" for r in self.reads]
        if self.zero_rows:
            lines.append(
                f"    rows {self.zero_rows[0]}:{self.zero_rows[1]} <- zeros (vocab padding)"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class RankPlan:
    """All parameters of one TP rank."""

    tp: Tp
    params: tuple[ParamPlan, ...]

    def elements_to_read(self) -> int:
        return sum(r.numel() for p in self.params for r in p.reads)

    def bytes_to_read(self, tensors: dict[str, HasDtype]) -> int:
        """Bytes this rank reads from the checkpoint (each read once, at its stored dtype)."""
        return sum(r.numel() * tensors[r.key].dtype.itemsize for p in self.params for r in p.reads)

    def keys(self) -> set[str]:
        return {r.key for p in self.params for r in p.reads}

    def __str__(self) -> str:
        head = f"TP rank {self.tp.rank}/{self.tp.size}: {len(self.params)} parameters"
        return "\n".join([head, *(str(p) for p in self.params)])


def plan_parameter(
    table: ModelTable, name: str, dims: ModelDims, tensors: dict[str, HasShape], tp: Tp
) -> ParamPlan:
    """The plan for SGLang parameter ``name`` on rank ``tp``."""
    hit = table.match_target(name)
    if hit is None:
        raise WeightMismatchError(
            f"SGLang parameter '{name}' has no source in the {table.name} mapping table"
        )
    mapping, layer = hit
    ref = table.source(mapping, layer, tensors)
    shape = tuple(tensors[ref.key].shape)
    if ref.layer_index is not None:
        if shape[0] != dims.num_layers:
            raise WeightMismatchError(
                f"checkpoint tensor '{ref.key}': stacked layer axis is {shape[0]}, "
                f"expected num_layers={dims.num_layers} from args"
            )
        shape = shape[1:]
    result = mapping.rule.apply(shape, dims, tp, f"checkpoint tensor '{ref.key}'")
    lead = ((ref.layer_index, ref.layer_index + 1),) if ref.layer_index is not None else ()
    reads = tuple(Read(ref.key, lead + b.region, b.dst, b.lead) for b in result.blocks)
    return ParamPlan(name, result.shape, reads, result.zero_rows)


def plan_rank(
    table: ModelTable,
    dims: ModelDims,
    tensors: dict[str, HasShape],
    tp: Tp,
    param_names: Iterable[str] | None = None,
) -> RankPlan:
    """Plans for ``param_names`` (default: every parameter of a single-stage model)."""
    names = (
        list(param_names)
        if param_names is not None
        else table.target_names(dims.num_layers, dims.tied_embeddings)
    )
    return RankPlan(tp, tuple(plan_parameter(table, n, dims, tensors, tp) for n in names))


def check_checkpoint_keys(table: ModelTable, dims: ModelDims, keys: Iterable[str]) -> list[str]:
    """Every checkpoint tensor must be mapped or deliberately ignored; returns the ignored ones."""
    _, ignored, unknown = table.classify(keys, dims.num_layers, dims.tied_embeddings)
    if unknown:
        raise WeightMismatchError(
            f"checkpoint holds {len(unknown)} model tensor(s) the {table.name} table neither maps "
            f"nor ignores: {', '.join(sorted(unknown)[:8])}. The checkpoint has parts this "
            "loader would silently drop (a different architecture?)." + _layout_hint(unknown)
        )
    return ignored


_SINGLETON = re.compile(r"\.linear_fc1\.(weight|bias)\d*_[wv]$|\.experts\.experts\.")


def _layout_hint(unknown: Iterable[str]) -> str:
    """Name the save option behind keys megatron-core writes only with
    ``singleton_local_shards=True`` (SwiGLU halves as ``..._w``/``..._v``, one key per expert)."""
    if not any(_SINGLETON.search(k) for k in unknown):
        return ""
    return (
        " These keys are what megatron-core writes with singleton_local_shards=True (one key "
        "per SwiGLU half or per expert), a layout this loader does not serve: re-save with "
        "singleton_local_shards=False, Megatron-LM's and Megatron-Bridge's default."
    )
