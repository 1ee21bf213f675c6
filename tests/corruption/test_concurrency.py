"""Several readers of the same checkpoint files at once - as the TP ranks of one server are - get
the same bytes as one reader alone: separate processes, and threads sharing one reader."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import queue
import threading
from pathlib import Path

import ckpt_damage as dmg
import torch

from sglang_megatron_loader import engine
from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.config import hf_config_from_args
from sglang_megatron_loader.models.llama import LLAMA
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import plan_rank

TP = 4
REPEATS = 10
VARIANT = "fp32_tp2"  # TP=4 ranks read halves of the training TP=2 chunks


def _rank_worker(path: str, rank: int, barrier, results) -> None:
    """One process: wait for the others, then load rank ``rank`` REPEATS times."""
    try:
        barrier.wait(timeout=300)
        loads = [digests(dmg.load(Path(path), Tp(rank, TP))) for _ in range(REPEATS)]
        results.put((rank, loads, None))
    except BaseException as exc:  # report, never hang the parent
        results.put((rank, None, repr(exc)))


def digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """SHA-256 of each tensor's bytes (tensors themselves would cross as shared-memory handles
    that die with the worker)."""
    return {
        k: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for k, t in tensors.items()
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        assert torch.equal(got[name], want[name]), f"{what}: {name} differs"


def test_processes_reading_one_checkpoint_at_once_agree_with_one_reader(megatron_ckpt) -> None:
    path = megatron_ckpt(VARIANT)
    alone = {rank: dmg.load(path, Tp(rank, TP)) for rank in range(TP)}
    ctx = mp.get_context("spawn")  # no fork of a process with torch's thread pools
    barrier, results = ctx.Barrier(TP), ctx.Queue()
    procs = [
        ctx.Process(target=_rank_worker, args=(str(path), r, barrier, results)) for r in range(TP)
    ]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in range(TP):
            rank, loads, error = results.get(timeout=300)
            assert error is None, f"rank {rank}: {error}"
            got[rank] = loads
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for rank in range(TP):
        for i, loaded in enumerate(got[rank]):
            assert loaded == digests(alone[rank]), f"rank {rank}, load {i} differs"
    # the ranks really read different slices (the comparison is not vacuous)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert not torch.equal(alone[0][qkv], alone[1][qkv])


def test_threads_sharing_one_reader_agree_with_one_reader(megatron_ckpt) -> None:
    """One ``MegatronCheckpoint`` (shared file handles and chunk cache), four threads at once."""
    path = megatron_ckpt(VARIANT)
    alone = {rank: dmg.load(path, Tp(rank, TP)) for rank in range(TP)}
    with MegatronCheckpoint(path) as ckpt:
        config = hf_config_from_args(ckpt.args, source=ckpt.source)
        dims = engine.dims_for(ckpt, config)
        start, errors = threading.Barrier(TP), queue.Queue()
        outs: dict[int, dict[str, torch.Tensor]] = {}

        def work(rank: int) -> None:
            try:
                plan = plan_rank(LLAMA, dims, ckpt.tensors, Tp(rank, TP))
                out = {p.name: torch.empty(p.shape) for p in plan.params}
                start.wait(timeout=60)
                for _ in range(REPEATS):
                    engine.execute_plan(ckpt, plan, lambda p: out[p.name], progress=False)
                    _assert_same(out, alone[rank], f"thread of rank {rank}")
                outs[rank] = out
            except BaseException as exc:
                errors.put(f"rank {rank}: {exc!r}")

        threads = [threading.Thread(target=work, args=(r,)) for r in range(TP)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert errors.empty(), errors.get()
    assert sorted(outs) == list(range(TP))
