"""Shared machinery of the loader and the exporters: open a checkpoint, derive its config and
dims, check its keys against the table, and execute a rank plan into destination tensors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sglang_megatron_loader.checkpoint import MegatronCheckpoint, resolve
from sglang_megatron_loader.config import ModelDims, hf_config_from_args
from sglang_megatron_loader.errors import WeightMismatchError
from sglang_megatron_loader.models import table_for
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.models.table import ModelTable
from sglang_megatron_loader.planner import (
    ParamPlan,
    RankPlan,
    Read,
    check_checkpoint_keys,
    plan_rank,
)

logger = logging.getLogger("sglang_megatron_loader")

EMBEDDING_KEY = "embedding.word_embeddings.weight"


_CONFIG_CACHE: dict[tuple[Any, ...], Any] = {}


def hf_config_for(path: str | Path, overrides: dict[str, Any] | None = None) -> Any:
    """The transformers config of the checkpoint at ``path`` (metadata and args only).

    SGLang asks for the config several times per start; the answer is cached per resolved
    iteration folder and ``.metadata`` identity, so a new iteration (hot reload) is re-read.
    A copy is returned: callers may modify it.
    """
    import copy
    import json

    iter_dir = resolve(path).iter_dir
    identity = iter_dir / ".metadata"
    if not identity.exists():  # legacy per-rank files: the first rank's file
        identity = min(iter_dir.glob("mp_rank_00*/model_optim_rng.pt"), default=identity)
    try:
        meta = identity.stat()
    except OSError:  # let the reader raise its own clear error
        meta = None
    key = (
        str(iter_dir.resolve()),
        meta and meta.st_mtime_ns,
        meta and meta.st_size,
        json.dumps(overrides or {}, sort_keys=True, default=str),
    )
    if meta is None or key not in _CONFIG_CACHE:
        with MegatronCheckpoint(iter_dir) as ckpt:
            _CONFIG_CACHE[key] = hf_config_from_args(
                ckpt.args, source=ckpt.source, overrides=overrides
            )
    return copy.deepcopy(_CONFIG_CACHE[key])


def dims_for(
    ckpt: MegatronCheckpoint, hf_config: Any, table: ModelTable | None = None
) -> ModelDims:
    """Dims from the (possibly overridden) HF config, the stored vocab rows from the tensors;
    every stored key and shape is checked against ``table`` (default: the config's own)."""
    table = table or table_for(hf_config)
    emb = ckpt.tensors.get(EMBEDDING_KEY)
    if emb is None:
        raise WeightMismatchError(f"{ckpt.source}: checkpoint has no '{EMBEDDING_KEY}'")
    dims = ModelDims.from_hf_config(hf_config, padded_vocab_size=emb.shape[0])
    try:
        check_checkpoint_keys(table, dims, ckpt.tensors)
        plan_rank(table, dims, ckpt.tensors, Tp(0, 1))  # every stored shape against the args
    except WeightMismatchError as exc:
        raise WeightMismatchError(f"{ckpt.source}: {exc}") from exc
    return dims


@dataclass
class LoadReport:
    seconds: float
    bytes_read: int
    params: int

    @property
    def gbps(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9) / 1e9


STAGING_BYTES = 64 * 2**20  # largest single read; bounds host staging memory per thread


def split_read(read: Read, param_ndim: int, itemsize: int, max_bytes: int) -> list[Read]:
    """Cut ``read`` into row ranges of at most ``max_bytes`` (rows stay whole)."""
    row_dim = len(read.region) - param_ndim  # 1 after a stacked layer axis, else 0
    lo, hi = read.region[row_dim]
    row_bytes = read.numel() // (hi - lo) * itemsize
    step = max(1, max_bytes // max(row_bytes, 1))
    out = []
    for a in range(lo, hi, step):
        b = min(a + step, hi)
        region = (*read.region[:row_dim], (a, b), *read.region[row_dim + 1 :])
        out.append(Read(read.key, region, (read.dst[0] + a - lo, read.dst[0] + b - lo)))
    return out


def execute_plan(
    ckpt: MegatronCheckpoint,
    plan: RankPlan,
    destination: Callable[[ParamPlan], torch.Tensor],
    *,
    progress: bool = True,
    threads: int = 4,
    max_read_bytes: int = STAGING_BYTES,
) -> LoadReport:
    """Fill each parameter's destination tensor from the checkpoint.

    Reads are cut to at most ``max_read_bytes`` and run on ``threads`` threads (file reads and
    copies release the GIL). A read lands directly in the parameter when it is contiguous CPU
    memory of the stored dtype; otherwise it goes through a buffer of at most
    ``max_read_bytes``, so host staging memory is bounded by ``threads * max_read_bytes``
    whatever the model size. A parameter on an accelerator gets each block copied from it.
    """
    from tqdm import tqdm

    start, before = time.perf_counter(), ckpt.dcp.stats.bytes_read
    bar = tqdm(
        total=plan.bytes_to_read(ckpt.tensors),
        unit="B",
        unit_scale=True,
        desc="Loading Megatron weights",
        disable=not progress,
        mininterval=1.0,
    )
    jobs: list[tuple[Read, torch.Tensor]] = []
    for p in plan.params:
        dest = destination(p)
        if tuple(dest.shape) != p.shape:
            raise WeightMismatchError(
                f"SGLang parameter '{p.name}' has shape {tuple(dest.shape)} on TP rank "
                f"{plan.tp.rank}/{plan.tp.size}, the checkpoint plan gives {p.shape}"
            )
        itemsize = ckpt.tensors[p.reads[0].key].dtype.itemsize if p.reads else 1
        for r in p.reads:
            jobs += [(sub, dest) for sub in split_read(r, dest.dim(), itemsize, max_read_bytes)]
        if p.zero_rows:
            dest[p.zero_rows[0] : p.zero_rows[1]].zero_()

    def run(job: tuple[Read, torch.Tensor]) -> None:
        r, dest = job
        rows = dest[r.dst[0] : r.dst[1]]
        extents = tuple(hi - lo for lo, hi in r.region)
        if rows.device.type == "cpu" and rows.is_contiguous():
            ckpt.dcp.read_slice(r.key, r.region, out=rows.view(extents))
        else:
            rows.copy_(ckpt.dcp.read_slice(r.key, r.region).view(rows.shape))
        bar.update(r.numel() * ckpt.tensors[r.key].dtype.itemsize)

    if threads > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="megatron-read") as pool:
            for _ in pool.map(run, jobs):
                pass
    else:
        for job in jobs:
            run(job)
    bar.close()
    return LoadReport(
        time.perf_counter() - start, ckpt.dcp.stats.bytes_read - before, len(plan.params)
    )
