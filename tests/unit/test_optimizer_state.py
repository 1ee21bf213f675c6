"""Checkpoints with optimizer and rng state load without a byte of that state being read.

The checkpoints are written by ``benchmarks/make_bench_checkpoint.py --size tiny`` (megatron-core's
real Adam optimizer, ``rng_state`` included), once per generator version:

* ``adam``: ``optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<model key>`` in the one
  ``.distcp`` file, after the model tensors;
* ``distributed``: ``--distributed-optimizer`` (flat ``optimizer.distributed.*`` buckets) with
  ``--writer-threads 2``, which interleaves optimizer and model chunks inside two files.

Every ``os.pread``/``os.preadv`` on the checkpoint's files is recorded and must lie inside a model
tensor's chunk or the common state; the process's own read counter (``rchar``) must stay far
below the optimizer's size; the loaded weights must equal what torch.distributed.checkpoint reads
for the model keys, converted by the planner tests' independent reference.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_planner import hf_full, sglang_shard

from sglang_megatron_loader.checkpoint import MegatronCheckpoint, scatter
from sglang_megatron_loader.engine import execute_plan
from sglang_megatron_loader.export.stream import HfStream
from sglang_megatron_loader.inspect_ckpt import format_text, inspect
from sglang_megatron_loader.models.llama import LLAMA
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import plan_rank

TESTS = Path(__file__).parents[1]
BENCH = TESTS.parent / "benchmarks" / "make_bench_checkpoint.py"
KINDS = {"adam": [], "distributed": ["--distributed-optimizer", "--writer-threads", "2"]}
COMMON = "common_state/shard_0_1"


@pytest.fixture(scope="session")
def optimizer_ckpt() -> dict[str, Path]:
    """Run roots of both kinds, cached under a key of the generator sources and versions."""
    from make_megatron_checkpoint import _SCRIPT_PATH, _file_lock

    h = hashlib.sha256(BENCH.read_bytes() + _SCRIPT_PATH.read_bytes())
    h.update(f"{importlib.metadata.version('megatron-core')} {torch.__version__}".encode())
    cache = TESTS / ".fixture_cache" / f"optimizer-{h.hexdigest()[:12]}"
    with _file_lock(cache / ".lock"):
        for kind, extra in KINDS.items():
            if (cache / kind).is_dir():
                continue
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
            cmd = [sys.executable, str(BENCH), "--out", str(tmp / kind), "--size", "tiny", *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
            (tmp / kind).rename(cache / kind)
            shutil.rmtree(tmp)
    return {kind: cache / kind for kind in KINDS}


class Reads:
    """``os.pread``/``os.preadv`` calls (and the reader's scattered ``preadv``) on files of one
    folder: (relative path, offset, n, kind)."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder, self.log = os.path.realpath(folder), []
        for name, kind in (("pread", "meta"), ("preadv", "data")):
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name), kind))
        monkeypatch.setattr(scatter, "_preadv_iov", self._wrap(scatter._preadv_iov, "data"))

    def _wrap(self, original, kind: str):
        def wrapped(fd: int, arg, offset: int, *rest):
            result = original(fd, arg, offset, *rest)
            path = os.readlink(f"/proc/self/fd/{fd}")
            if path.startswith(self.folder + os.sep):
                n = len(result) if kind == "meta" else result
                self.log.append((os.path.relpath(path, self.folder), offset, n, kind))
            return result

        return wrapped


def _rchar() -> int:
    """Bytes this process has read through any read syscall (``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _spans(ckpt: MegatronCheckpoint) -> tuple[list[tuple], list[tuple]]:
    """Byte ranges ``(file, start, stop, key)`` the loader may read, and those it must not."""
    allowed, forbidden = [], []
    for key, info in ckpt.tensors.items():
        spans = [(c.relative_path, c.offset, c.offset + c.length, key) for c in info.chunks]
        (forbidden if LLAMA.is_ignored(key) else allowed).extend(spans)
    for key, (rel, offset, length) in ckpt.dcp.bytes_items.items():
        (allowed if key == COMMON else forbidden).append((rel, offset, offset + length, key))
    return allowed, forbidden


def _load(ckpt: MegatronCheckpoint, tp: Tp) -> tuple[dict[str, torch.Tensor], int, int]:
    """One rank's parameters in the stored dtype, bytes the reader counted, bytes planned."""
    plan = plan_rank(LLAMA, HfStream(ckpt).dims, ckpt.tensors, tp)
    out = {
        p.name: torch.empty(p.shape, dtype=ckpt.tensors[p.reads[0].key].dtype) for p in plan.params
    }
    report = execute_plan(ckpt, plan, lambda p: out[p.name], progress=False)
    return out, report.bytes_read, plan.bytes_to_read(ckpt.tensors)


@pytest.mark.parametrize("kind", list(KINDS))
def test_load_reads_model_bytes_only(optimizer_ckpt, kind: str, monkeypatch) -> None:
    root = optimizer_ckpt[kind]
    with MegatronCheckpoint(root) as ckpt:  # warm-up: imports and caches outside the count
        _load(ckpt, Tp(0, 1))
    reads = Reads(root / "iter_0000100", monkeypatch)
    before = _rchar()
    with MegatronCheckpoint(root) as ckpt:
        _, bytes_read, planned = _load(ckpt, Tp(0, 1))
        rchar = _rchar() - before
        model = [k for k in ckpt.tensors if not LLAMA.is_ignored(k)]
        optimizer = [k for k in ckpt.tensors if k.startswith("optimizer.")]
        assert optimizer and set(model) | set(optimizer) == set(ckpt.tensors)
        assert any(k.startswith("rng_state") for k in ckpt.dcp.bytes_items)
        prefix = "optimizer.distributed." if kind == "distributed" else "optimizer.state."
        assert all(k.startswith(prefix) for k in optimizer)
        model_bytes = sum(ckpt.tensors[k].nbytes for k in model)
        optimizer_bytes = sum(ckpt.tensors[k].nbytes for k in optimizer)
        emb = ckpt.tensors["embedding.word_embeddings.weight"]
        heads = 2 if "output_layer.weight" in ckpt.tensors else 1  # untied: two vocab tensors
        vocab = HfStream(ckpt).dims.vocab_size  # from the save's tokenizer/
        pad = (emb.shape[0] - vocab) * emb.shape[1] * emb.dtype.itemsize * heads
        allowed, forbidden = _spans(ckpt)
        files = sum(ckpt.dcp.file_sizes().values())
    # what was read: exactly the model tensors (less Megatron's vocab padding rows, never read)
    assert bytes_read == planned == model_bytes - pad
    assert sum(n for *_, n, kind_ in reads.log if kind_ == "data") == bytes_read
    for rel, offset, n, _ in reads.log:
        inside = any(f == rel and a <= offset and offset + n <= b for f, a, b, _ in allowed)
        assert inside, (rel, offset, n)
        hit = [k for f, a, b, k in forbidden if f == rel and offset < b and a < offset + n]
        assert not hit, (rel, offset, n, hit)
    meta_size = (root / "iter_0000100" / ".metadata").stat().st_size
    assert rchar < bytes_read + meta_size + 256 * 1024 < optimizer_bytes, rchar
    print(
        f"{kind}: read {bytes_read:,} B of model tensors ({model_bytes:,} B stored, {pad:,} B "
        f"vocab padding); optimizer {optimizer_bytes:,} B never touched; files {files:,} B; "
        f"rchar {rchar:,} B; {len(reads.log)} reads"
    )


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", list(KINDS))
def test_loaded_weights_equal_torch_dcp_model_keys(optimizer_ckpt, kind: str, tp: int) -> None:
    root = optimizer_ckpt[kind]
    with MegatronCheckpoint(root) as ckpt:
        model = {k: v for k, v in ckpt.tensors.items() if not LLAMA.is_ignored(k)}
        theirs = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.items()}
        dcp.load(theirs, storage_reader=dcp.FileSystemReader(ckpt.source), no_dist=True)
        dims = HfStream(ckpt).dims
        assert dims.num_layers == 2  # test_planner's reference converts two layers
        for r in range(tp):
            ours, _, _ = _load(ckpt, Tp(r, tp))
            want = sglang_shard(dims, hf_full(dims, theirs), Tp(r, tp))
            assert set(ours) == set(want)
            for name, tensor in want.items():
                assert torch.equal(ours[name], tensor), (name, r, tp)


@pytest.mark.parametrize("kind", list(KINDS))
def test_inspect_reports_optimizer_bytes_as_skipped(optimizer_ckpt, kind: str) -> None:
    root = optimizer_ckpt[kind]
    info, plans = inspect(str(root), tp=2)
    with MegatronCheckpoint(root) as ckpt:
        optimizer = sum(t.nbytes for k, t in ckpt.tensors.items() if k.startswith("optimizer."))
        model = sum(t.nbytes for k, t in ckpt.tensors.items() if not LLAMA.is_ignored(k))
    assert info["optimizer_and_other_bytes"] == optimizer > 5 * model == 5 * info["model_bytes"]
    assert info["training_layout"]["use_distributed_optimizer"] == (kind == "distributed")
    assert sum(info["bytes_per_rank"]) < model
    assert "(optimizer and other state, never read)" in format_text(info)
