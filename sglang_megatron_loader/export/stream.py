"""Stream a checkpoint as Hugging Face-named tensors, one parameter at a time.

Uses the same TP=1 rank plan as the loader, then splits SGLang's fused parameters back into HF
names. Host memory holds one parameter at a time (the largest is the embedding).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.config import ModelDims
from sglang_megatron_loader.engine import checkpoint_hf_config, dims_for, execute_plan
from sglang_megatron_loader.models import table_for
from sglang_megatron_loader.models.llama import hf_parts
from sglang_megatron_loader.models.moe import hf_expert_parts
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import ParamPlan, RankPlan, plan_rank


@dataclass(frozen=True)
class TensorSpec:
    """One exported tensor: HF name, shape, dtype, and where it comes from."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str  # SGLang parameter name whose plan produces it
    row_start: int
    lead: tuple[int, ...] = ()  # index into the parameter first (a fused MoE weight's expert)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class HfStream:
    """HF tensors of one checkpoint: specs up front (no data), then data on demand."""

    def __init__(
        self,
        ckpt: MegatronCheckpoint,
        overrides: dict[str, Any] | None = None,
        tokenizer: str | Path | None = None,
    ) -> None:
        self.ckpt = ckpt
        self.config = checkpoint_hf_config(ckpt, overrides, tokenizer)
        self.table = table_for(self.config)
        self.dims: ModelDims = dims_for(ckpt, self.config, self.table)
        self.plan: RankPlan = plan_rank(self.table, self.dims, ckpt.tensors, Tp(0, 1))
        self.specs: list[TensorSpec] = [s for p in self.plan.params for s in self._specs(p)]

    def _dtype(self, p: ParamPlan) -> torch.dtype:
        return self.ckpt.tensors[p.reads[0].key].dtype  # stored dtype, no silent cast

    def _specs(self, p: ParamPlan) -> list[TensorSpec]:
        experts = hf_expert_parts(p.name, self.dims, self.table.architecture)
        if experts is not None:
            out, rows_of = [], {}
            for name, rows, lead in experts:
                start = rows_of.get(lead, 0)
                n = p.shape[len(lead)] if rows < 0 else rows
                shape = (n, *p.shape[len(lead) + 1 :])
                out.append(TensorSpec(name, shape, self._dtype(p), p.name, start, lead))
                rows_of[lead] = start + n
            return out
        out, row = [], 0
        for name, rows in hf_parts(p.name, self.dims):
            n = p.shape[0] if rows < 0 else rows
            out.append(TensorSpec(name, (n, *p.shape[1:]), self._dtype(p), p.name, row))
            row += n
        return out

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def tensors(self) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        """Yield ``(spec, tensor)`` in spec order; each parameter is read once."""
        by_source: dict[str, list[TensorSpec]] = {}
        for s in self.specs:
            by_source.setdefault(s.source, []).append(s)
        for p in self.plan.params:
            full = torch.empty(p.shape, dtype=self._dtype(p))
            execute_plan(
                self.ckpt, RankPlan(self.plan.tp, (p,)), lambda _, t=full: t, progress=False
            )
            for s in by_source[p.name]:
                yield s, full[s.lead][s.row_start : s.row_start + s.shape[0]]
