"""Shared machinery of the loader and the exporters: open a checkpoint, derive its config and
dims, check its keys against the table, and execute a rank plan into destination tensors."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from sglang_megatron_loader.arg_policy import SERVED
from sglang_megatron_loader.checkpoint import MegatronCheckpoint, resolve
from sglang_megatron_loader.checkpoint.bridge import RUN_CONFIG
from sglang_megatron_loader.checkpoint.locate import find_tokenizer
from sglang_megatron_loader.checkpoint.scatter import SAME_SIZE_INT
from sglang_megatron_loader.config import ModelDims, hf_config_from_args, unsupported_args
from sglang_megatron_loader.errors import UnsupportedCheckpointError, WeightMismatchError
from sglang_megatron_loader.gcpause import paused_gc
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
from sglang_megatron_loader.prefault import populate
from sglang_megatron_loader.staging import Stager
from sglang_megatron_loader.vocab import resolve_vocab

logger = logging.getLogger("sglang_megatron_loader")

EMBEDDING_KEY = "embedding.word_embeddings.weight"


_CONFIG_CACHE: dict[tuple[Any, ...], Any] = {}


def checkpoint_refusals(ckpt: MegatronCheckpoint, ignore: Collection[str] = ()) -> list[str]:
    """What the checkpoint's config uses that the loader does not serve, each named with its
    value; judged on the config as written (Megatron-LM args or Megatron-Bridge fields).

    ``ignore``: refused or unknown names the user chose to serve anyway (``ignore_args``); a
    name the model is built from cannot be ignored.
    """
    built_from = sorted(set(ignore) & set(SERVED))
    if built_from:
        raise UnsupportedCheckpointError(
            f"ignore_args {built_from}: the served model is built from these; only refused or "
            "unknown args can be ignored"
        )
    if ckpt.run_config is not None:
        return unsupported_args(
            argparse.Namespace(**ckpt.run_config), naming="transformer_config", ignore=ignore
        )
    return unsupported_args(ckpt.args, ignore=ignore)


def checkpoint_hf_config(
    ckpt: MegatronCheckpoint,
    overrides: dict[str, Any] | None = None,
    tokenizer: str | Path | None = None,
    ignore_args: Collection[str] = (),
) -> Any:
    """The transformers config SGLang serves for ``ckpt``.

    The model fields come from the checkpoint's own config (Megatron-LM ``args`` or a
    Megatron-Bridge ``run_config.yaml``), refused by name where it uses what the loader does not
    serve; the vocabulary is the true one (:func:`resolve_vocab`): the override, the config's
    ``vocab_size``, else ``tokenizer`` (default: the checkpoint's own, see ``find_tokenizer``).
    """
    overrides = dict(overrides or {})
    emb = ckpt.tensors.get(EMBEDDING_KEY)
    if emb is None:
        raise WeightMismatchError(f"{ckpt.source}: checkpoint has no '{EMBEDDING_KEY}'")
    if tokenizer is None:
        tokenizer = find_tokenizer(ckpt.location, getattr(ckpt.args, "tokenizer_model", None))
    override = overrides.get("vocab_size")
    vocab = resolve_vocab(
        ckpt.args,
        stored_rows=emb.shape[0],
        tokenizer=tokenizer,
        override=override if isinstance(override, int) and override > 0 else None,
        source=ckpt.source,
        declared_as=f"{RUN_CONFIG} model.vocab_size" if ckpt.run_config else "args.vocab_size",
    )
    return hf_config_from_args(
        ckpt.args,
        source=ckpt.source,
        overrides=overrides,
        vocab=vocab,
        refused=checkpoint_refusals(ckpt, ignore_args),
        honours_rope_factor=ckpt.writer == "megatron-bridge",
    )


def hf_config_for(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    tokenizer: str | None = None,
    ignore_args: Collection[str] = (),
) -> Any:
    """:func:`checkpoint_hf_config` of the checkpoint at ``path`` (metadata and config only).

    SGLang asks for the config several times per start; the answer is cached per resolved
    iteration folder, ``.metadata`` identity and tokenizer, so a new iteration (hot reload) is
    re-read. A copy is returned: callers may modify it.
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
        tokenizer,
        tuple(sorted(ignore_args)),
    )
    if meta is None or key not in _CONFIG_CACHE:
        with paused_gc(), MegatronCheckpoint(iter_dir) as ckpt:
            _CONFIG_CACHE[key] = checkpoint_hf_config(ckpt, overrides, tokenizer, ignore_args)
    return copy.deepcopy(_CONFIG_CACHE[key])


def dims_for(
    ckpt: MegatronCheckpoint, hf_config: Any, table: ModelTable | None = None
) -> ModelDims:
    """Dims from the (possibly overridden) HF config, the stored vocab rows from the tensors;
    every stored key and shape is checked against ``table`` (default: the config's own)."""
    return plan_checkpoint(ckpt, hf_config, Tp(0, 1), table)[0]


def plan_checkpoint(
    ckpt: MegatronCheckpoint, hf_config: Any, tp: Tp, table: ModelTable | None = None
) -> tuple[ModelDims, RankPlan]:
    """:func:`dims_for` and the plan of rank ``tp`` of the whole (single-stage) model, made by
    the same pass that checks every stored shape: a load plans once. A TP size that cannot
    split the model is refused here, naming the dimension."""
    table = table or table_for(hf_config)
    emb = ckpt.tensors.get(EMBEDDING_KEY)
    if emb is None:
        raise WeightMismatchError(f"{ckpt.source}: checkpoint has no '{EMBEDDING_KEY}'")
    dims = ModelDims.from_hf_config(hf_config, padded_vocab_size=emb.shape[0])
    refuse_padded_ffn(hf_config, ckpt.source)
    try:
        check_checkpoint_keys(table, dims, ckpt.tensors)
        plan = plan_rank(table, dims, ckpt.tensors, tp)  # every stored shape against the args
    except WeightMismatchError as exc:
        raise WeightMismatchError(f"{ckpt.source}: {exc}") from exc
    return dims, plan


def refuse_padded_ffn(hf_config: Any, source: str) -> None:
    """SGLang on a CPU pads FFN sizes that ``32 * tp`` does not divide (its
    ``adjust_config_with_unaligned_cpu_tp`` keeps the stored size as ``original_<name>``); the
    plan fills the stored size only, so such a layout is refused by name."""
    for name in ("intermediate_size", "moe_intermediate_size"):
        original = getattr(hf_config, f"original_{name}", None)
        if original is not None and original != getattr(hf_config, name, None):
            raise UnsupportedCheckpointError(
                f"{source}: SGLang padded {name} from {original} to {getattr(hf_config, name)} "
                "for its CPU kernels; --load-format megatron does not fill padded FFNs. Serve "
                "on a GPU, or at a --tp-size for which 32 * tp divides the FFN size"
            )


@dataclass
class LoadReport:
    seconds: float
    bytes_read: int
    params: int

    @property
    def gbps(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9) / 1e9


STAGING_BYTES = 64 * 2**20  # largest single read; bounds host staging memory per buffer
THREADS = 4  # default reader threads (file reads and copies release the GIL)


def default_threads(device: torch.device) -> int:
    """Reader threads when none are asked for: :data:`THREADS`, but for CPU parameters no more
    than this process's intra-op threads (SGLang's CPU backend gives each rank cores / TP): the
    reads then fault in and fill memory on the same cores. On 2 cores, 0.5 GB into fresh
    memory from saves at TP1/TP2/TP4: 0.155/0.170/0.181 s on 2 threads, 0.161/0.186/0.210 s on
    4. A GPU target keeps :data:`THREADS` (reads overlap the host-to-device copies)."""
    if device.type != "cpu":
        return THREADS
    return max(1, min(THREADS, torch.get_num_threads()))


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
        dst = (read.dst[0] + a - lo, read.dst[0] + b - lo)
        out.append(Read(read.key, region, dst, read.dst_lead))
    return out


def zero(t: torch.Tensor) -> None:
    """``t.zero_()``; on the CPU by numpy on the calling thread: torch wakes its intra-op
    threads for a few padding rows (56 rows of 1024 bf16: 5-9 ms a call while the 2-core
    machine ran a test suite, 0.05 ms this way; on an idle machine both ~0.04 ms)."""
    bits = SAME_SIZE_INT.get(t.element_size())
    if t.device.type != "cpu" or bits is None or t.is_complex():
        t.zero_()
    elif t.numel():
        t.detach().view(bits.torch).numpy().fill(0)


def execute_plan(
    ckpt: MegatronCheckpoint,
    plan: RankPlan,
    destination: Callable[[ParamPlan], torch.Tensor],
    *,
    progress: bool = True,
    threads: int = THREADS,
    max_read_bytes: int = STAGING_BYTES,
    staging: bool = False,
    prefault: bool = True,
) -> LoadReport:
    """Fill each parameter's destination tensor from the checkpoint.

    Reads are cut to at most ``max_read_bytes`` and run on ``threads`` threads. A read lands
    directly in a CPU parameter of the stored dtype, whatever its layout (no host copy). Any
    other parameter (on a GPU, or of another dtype) is filled through ``threads + 2`` reused
    host buffers of ``max_read_bytes`` (pinned for a GPU; asynchronous copies overlapped with
    the next reads; casts on the device): see :class:`Stager`. ``staging=True`` sends every
    read through the buffers (tests of that path on a CPU). CPU parameters are faulted in
    whole before the first read (:func:`prefault.populate`) unless ``prefault`` is False: a
    reload into parameters already in memory, where the call only walks their page tables
    (0.015 s per 0.5 GB, summed over the threads, in a served-TP1 reload).
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
    devices: set[torch.device] = set()
    fresh: dict[int, torch.Tensor] = {}  # CPU destinations, by address
    for p in plan.params:
        dest = destination(p)
        if tuple(dest.shape) != p.shape:
            raise WeightMismatchError(
                f"SGLang parameter '{p.name}' has shape {tuple(dest.shape)} on TP rank "
                f"{plan.tp.rank}/{plan.tp.size}, the checkpoint plan gives {p.shape}"
            )
        itemsize = ckpt.tensors[p.reads[0].key].dtype.itemsize if p.reads else 1
        devices.add(dest.device)
        if prefault and dest.device.type == "cpu" and p.reads:
            fresh.setdefault(dest.data_ptr(), dest)
        for r in p.reads:
            ndim = dest.dim() - len(r.dst_lead)  # a fused expert weight: rows of one expert
            jobs += [(sub, dest) for sub in split_read(r, ndim, itemsize, max_read_bytes)]
        if p.zero_rows:
            zero(dest[p.zero_rows[0] : p.zero_rows[1]])
    stager = Stager(threads + 2, max_read_bytes, devices)

    def run(job: tuple[Read, torch.Tensor]) -> None:
        r, dest = job
        rows = dest[r.dst_lead][r.dst[0] : r.dst[1]]
        extents = tuple(hi - lo for lo, hi in r.region)
        dtype = ckpt.tensors[r.key].dtype
        if not staging and rows.device.type == "cpu" and rows.dtype == dtype:
            ckpt.dcp.read_slice(r.key, r.region, out=rows.view(extents))
        else:
            stager.stage(rows, dtype, extents, partial(ckpt.dcp.read_slice, r.key, r.region))
        bar.update(r.numel() * dtype.itemsize)

    try:
        if threads > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(threads, thread_name_prefix="megatron-read") as pool:
                # every CPU parameter's pages first, then the reads (see prefault.py)
                for _ in pool.map(populate, fresh.values()):
                    pass
                for _ in pool.map(run, jobs):
                    pass
        else:
            for dest in fresh.values():
                populate(dest)
            for job in jobs:
                run(job)
    finally:
        stager.finish()
    bar.close()
    return LoadReport(
        time.perf_counter() - start, ckpt.dcp.stats.bytes_read - before, len(plan.params)
    )
