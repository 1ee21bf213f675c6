"""The declarative mapping table type, checked when built and queried by the planner."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from sglang_megatron_loader.errors import WeightMismatchError
from sglang_megatron_loader.models.rules import Rule


class HasShape(Protocol):
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Mapping:
    """One SGLang parameter (``{}`` = layer index) filled from one Megatron tensor by ``rule``."""

    target: str
    sources: tuple[str, ...]  # alternative key names, relative to the layer prefix if per-layer
    rule: Rule
    untied_only: bool = False  # present only when embeddings are untied


@dataclass(frozen=True)
class SourceRef:
    """Where a mapping's tensor is for one layer: the key and, if stacked, the layer index."""

    key: str
    layer_index: int | None


@dataclass(frozen=True)
class ModelTable:
    name: str
    architecture: str
    layer_prefix: str
    per_layer: tuple[Mapping, ...]
    global_: tuple[Mapping, ...]
    ignored: tuple[str, ...]
    _targets: tuple[tuple[re.Pattern[str], Mapping], ...] = field(init=False, repr=False)
    _ignored: tuple[re.Pattern[str], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        targets = [m.target for m in self.mappings]
        sources = [self._abs(m, s) for m in self.mappings for s in m.sources]
        for what, names in (("target", targets), ("source", sources)):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"table {self.name}: {what} named twice: {dupes}")
        compiled = tuple(
            (re.compile("^" + re.escape(m.target).replace(r"\{\}", r"(\d+)") + "$"), m)
            for m in self.mappings
        )
        object.__setattr__(self, "_targets", compiled)
        object.__setattr__(self, "_ignored", tuple(re.compile(p) for p in self.ignored))

    @property
    def mappings(self) -> tuple[Mapping, ...]:
        return self.per_layer + self.global_

    def _abs(self, m: Mapping, source: str) -> str:
        return self.layer_prefix + source if m in self.per_layer else source

    def is_ignored(self, key: str) -> bool:
        return any(p.search(key) for p in self._ignored)

    def match_target(self, name: str) -> tuple[Mapping, int | None] | None:
        for pattern, m in self._targets:
            hit = pattern.match(name)
            if hit:
                return m, int(hit.group(1)) if hit.groups() else None
        return None

    def target_names(self, num_layers: int, tied: bool) -> list[str]:
        """Every SGLang parameter name the table fills for a whole (single-stage) model."""
        names = [m.target.format(i) for i in range(num_layers) for m in self.per_layer]
        return names + [m.target for m in self.global_ if not (tied and m.untied_only)]

    def source(self, m: Mapping, layer: int | None, tensors: dict[str, HasShape]) -> SourceRef:
        """Resolve the checkpoint key of mapping ``m`` at ``layer`` (stacked or per-layer keys)."""
        for s in m.sources:
            if layer is None:
                if s in tensors:
                    return SourceRef(s, None)
                continue
            per_layer = f"{self.layer_prefix}{layer}.{s}"
            if per_layer in tensors:
                return SourceRef(per_layer, None)
            stacked = self.layer_prefix + s
            if stacked in tensors:
                return SourceRef(stacked, layer)
        tried = [self._abs(m, s) for s in m.sources]
        raise WeightMismatchError(
            f"checkpoint has no tensor for SGLang parameter '{m.target.format(layer)}' "
            f"(looked for {', '.join(repr(t) for t in tried)})"
        )

    def classify(
        self, keys: Iterable[str], num_layers: int, tied: bool
    ) -> tuple[dict[str, Mapping], list[str], list[str]]:
        """Split checkpoint tensor keys into (used -> mapping, ignored, unknown)."""
        by_source: dict[str, Mapping] = {}
        for m in self.mappings:
            for s in m.sources:
                if m in self.per_layer:
                    by_source[self.layer_prefix + s] = m
                    for i in range(num_layers):
                        by_source[f"{self.layer_prefix}{i}.{s}"] = m
                else:
                    by_source[s] = m
        used, ignored, unknown = {}, [], []
        for key in keys:
            m = by_source.get(key)
            if m is not None and not (tied and m.untied_only):
                used[key] = m
            elif m is not None or self.is_ignored(key):
                ignored.append(key)  # tied output_layer copies are deliberately ignored too
            else:
                unknown.append(key)
        return used, ignored, unknown
