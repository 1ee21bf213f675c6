"""Shared machinery of the loader and the exporters: open a checkpoint, derive its config and
dims, check its keys against the table, and execute a rank plan into destination tensors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.config import ModelDims, llama_config_from_args
from sglang_megatron_loader.errors import WeightMismatchError
from sglang_megatron_loader.models.llama import LLAMA
from sglang_megatron_loader.models.table import ModelTable
from sglang_megatron_loader.planner import ParamPlan, RankPlan, check_checkpoint_keys

logger = logging.getLogger("sglang_megatron_loader")

EMBEDDING_KEY = "embedding.word_embeddings.weight"


def hf_config_for(path: str | Path, overrides: dict[str, Any] | None = None) -> Any:
    """The transformers config of the checkpoint at ``path`` (metadata and args only)."""
    with MegatronCheckpoint(path) as ckpt:
        return llama_config_from_args(ckpt.args, source=ckpt.source, overrides=overrides)


def dims_for(ckpt: MegatronCheckpoint, hf_config: Any, table: ModelTable = LLAMA) -> ModelDims:
    """Dims from the (possibly overridden) HF config, the stored vocab rows from the tensors."""
    emb = ckpt.tensors.get(EMBEDDING_KEY)
    if emb is None:
        raise WeightMismatchError(f"{ckpt.source}: checkpoint has no '{EMBEDDING_KEY}'")
    dims = ModelDims.from_hf_config(hf_config, padded_vocab_size=emb.shape[0])
    check_checkpoint_keys(table, dims, ckpt.tensors)
    return dims


@dataclass
class LoadReport:
    seconds: float
    bytes_read: int
    params: int

    @property
    def gbps(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9) / 1e9


def execute_plan(
    ckpt: MegatronCheckpoint,
    plan: RankPlan,
    destination: Callable[[ParamPlan], torch.Tensor],
    *,
    progress: bool = True,
) -> LoadReport:
    """Fill each parameter's destination tensor from the checkpoint, one read at a time.

    Host memory holds at most one read block (one layer's slice of one tensor) at a time.
    """
    from tqdm import tqdm

    start, before = time.perf_counter(), ckpt.dcp.stats.bytes_read
    total = sum(
        r.numel() * ckpt.tensors[r.key].dtype.itemsize for p in plan.params for r in p.reads
    )
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="Loading Megatron weights",
        disable=not progress,
        mininterval=1.0,
    )
    for p in plan.params:
        dest = destination(p)
        if tuple(dest.shape) != p.shape:
            raise WeightMismatchError(
                f"SGLang parameter '{p.name}' has shape {tuple(dest.shape)} on TP rank "
                f"{plan.tp.rank}/{plan.tp.size}, the checkpoint plan gives {p.shape}"
            )
        for r in p.reads:
            rows = dest[r.dst[0] : r.dst[1]]
            block = ckpt.dcp.read_slice(r.key, r.region)
            rows.copy_(block.reshape(rows.shape))
            bar.update(block.numel() * block.element_size())
        if p.zero_rows:
            dest[p.zero_rows[0] : p.zero_rows[1]].zero_()
    bar.close()
    return LoadReport(
        time.perf_counter() - start, ckpt.dcp.stats.bytes_read - before, len(plan.params)
    )
