"""Test-only: what one ``--load-format megatron`` build reads from the checkpoint folder.

Used inside the rank processes of ``harness.py``. Everything is observed from outside the
package: ``os.pread``/``os.preadv`` on the folder's files (and the scattered ``preadv`` calls,
``scatter._preadv_iov``, and the runs of the mapped copies that read column slices,
``scatter.read_mapped``), the ``.metadata`` parses behind the reader's
per-process cache (``dcp.read_dcp_metadata``), and wrappers around the loader's
``load_model``/``load_weights_into``/``execute_plan`` and the reader's ``read_slice``.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import threading
from collections.abc import Iterator
from typing import Any


class ReadRecorder:
    """Everything one ``--load-format megatron`` build reads from the checkpoint folder.

    ``os.pread``/``os.preadv`` calls on files under the folder are logged with the phase they
    happen in (``config``: resolving the model config, ``load``: inside the loader's
    ``load_model``); ``.metadata`` parses are counted per phase; the plan the loader executes
    and the reader's own ``bytes_read`` counter for the weights are captured around the load.
    """

    def __init__(self, folder: str) -> None:
        self.folder = os.path.realpath(folder)
        self.phase = "config"
        self.reads: list[tuple[str, str, str, int, int]] = []  # phase, kind, file, offset, n
        self.metadata_parses: dict[str, int] = {}
        self.plan: Any = None
        self.weight_bytes = 0  # the reader's stats.bytes_read delta over load_weights_into
        self.needed: dict[str, int] = {}  # key -> bytes requested through read_slice
        self.dcp: Any = None  # the reader the load used (its chunk map attributes reads)
        self.lock = threading.Lock()

    def _path(self, fd: int) -> str | None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        return path if path.startswith(self.folder + os.sep) else None

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.folder)

    @contextlib.contextmanager
    def active(self) -> Iterator[ReadRecorder]:
        from sglang_megatron_loader.checkpoint import dcp, scatter
        from sglang_megatron_loader.sglang import loader

        rec = self
        patches: list[tuple[Any, str, Any]] = []

        def patch(owner: Any, name: str, make: Any) -> None:
            original = getattr(owner, name)
            patches.append((owner, name, original))
            setattr(owner, name, make(original))

        def pread(original: Any) -> Any:
            def wrapped(fd: int, n: int, offset: int) -> bytes:
                data = original(fd, n, offset)
                path = rec._path(fd)
                if path:
                    rec.reads.append((rec.phase, "meta", rec._rel(path), offset, len(data)))
                return data

            return wrapped

        def preadv(original: Any) -> Any:
            def wrapped(fd: int, buffers: Any, offset: int, *flags: Any) -> int:
                n = original(fd, buffers, offset, *flags)
                path = rec._path(fd)
                if path:
                    rec.reads.append((rec.phase, "data", rec._rel(path), offset, n))
                return n

            return wrapped

        def preadv_iov(original: Any) -> Any:  # scattered preadv (one buffer per dest run)
            def wrapped(fd: int, iov: Any, offset: int) -> int:
                n = original(fd, iov, offset)
                path = rec._path(fd)
                if path:
                    rec.reads.append((rec.phase, "data", rec._rel(path), offset, n))
                return n

            return wrapped

        def read_mapped(original: Any) -> Any:
            def wrapped(f: Any, base: int, sizes: Any, box: Any, dest: Any, **kw: Any) -> None:
                original(f, base, sizes, box, dest, **kw)  # a column slice: no preadv
                path = rec._path(f.fileno())
                if path:
                    size = dest.element_size()
                    for first, n in scatter.file_runs(sizes, box):
                        rec.reads.append(
                            (rec.phase, "data", rec._rel(path), base + first * size, n * size)
                        )

            return wrapped

        def parse(original: Any) -> Any:
            def wrapped(path: Any) -> Any:
                rec.metadata_parses[rec.phase] = rec.metadata_parses.get(rec.phase, 0) + 1
                return original(path)

            return wrapped

        def load_model(original: Any) -> Any:
            def wrapped(self: Any, **kwargs: Any) -> Any:
                rec.phase = "load"
                try:
                    return original(self, **kwargs)
                finally:
                    rec.phase = "after"

            return wrapped

        def load_weights_into(original: Any) -> Any:
            def wrapped(self: Any, model: Any, ckpt: Any, dims: Any, *args: Any) -> None:
                before = ckpt.dcp.stats.bytes_read
                original(self, model, ckpt, dims, *args)
                rec.weight_bytes = ckpt.dcp.stats.bytes_read - before

            return wrapped

        def read_slice(original: Any) -> Any:
            def wrapped(self: Any, key: str, region: Any, *args: Any, **kwargs: Any) -> Any:
                need = math.prod(hi - lo for lo, hi in region) * self.tensors[key].dtype.itemsize
                with rec.lock:  # the loader may read from several threads
                    rec.dcp = self
                    rec.needed[key] = rec.needed.get(key, 0) + need
                return original(self, key, region, *args, **kwargs)

            return wrapped

        def execute_plan(original: Any) -> Any:
            def wrapped(ckpt: Any, plan: Any, *args: Any, **kwargs: Any) -> Any:
                rec.plan = plan  # the plan the load executes
                return original(ckpt, plan, *args, **kwargs)

            return wrapped

        patch(os, "pread", pread)
        patch(os, "preadv", preadv)
        patch(scatter, "read_mapped", read_mapped)
        patch(scatter, "_preadv_iov", preadv_iov)
        patch(dcp, "read_dcp_metadata", parse)  # the parse behind the per-process cache
        patch(dcp.DcpCheckpoint, "read_slice", read_slice)
        patch(loader.MegatronModelLoader, "load_model", load_model)
        patch(loader.MegatronModelLoader, "load_weights_into", load_weights_into)
        patch(loader, "execute_plan", execute_plan)  # the name the loader calls
        try:
            yield self
        finally:
            for owner, name, original in reversed(patches):
                setattr(owner, name, original)

    def summary(self) -> dict[str, Any]:
        by_phase: dict[str, int] = {}
        for phase, _, _, _, n in self.reads:
            by_phase[phase] = by_phase.get(phase, 0) + n
        return {
            "bytes_by_phase": by_phase,
            "weight_bytes": self.weight_bytes,
            "by_key": self._by_key(),
            "metadata_parses": self.metadata_parses,
            "twice": twice_read(self.reads),
            "plan_elements": self._plan_elements(),
            "plan_layers": self._plan_layers(),
        }

    def _by_key(self) -> dict[str, list[int]]:
        """``key -> [bytes read, bytes requested]``: each tensor-data read of the load is
        attributed to the stored chunk whose byte range holds it (thread-safe by construction)."""
        if self.dcp is None:
            return {}
        chunks = sorted(
            (
                self._rel(os.path.realpath(self.dcp.folder / c.relative_path)),
                c.offset,
                c.offset + c.length,
                key,
            )
            for key, info in self.dcp.tensors.items()
            for c in info.chunks
        )
        out = {key: [0, need] for key, need in self.needed.items()}
        for phase, kind, path, offset, n in self.reads:
            if phase != "load" or kind != "data":
                continue
            i = bisect.bisect_right(chunks, (path, offset, float("inf"), "")) - 1
            hit = chunks[i] if i >= 0 else None
            inside = hit is not None and hit[0] == path and hit[1] <= offset < hit[2]
            key = hit[3] if inside else f"? {path}@{offset}"
            out.setdefault(key, [0, 0])[0] += n
        return out

    def _plan_elements(self) -> int | None:
        return None if self.plan is None else self.plan.elements_to_read()

    def _plan_layers(self) -> list[int]:
        """Layer indices the plan reads from stacked per-layer tensors."""
        if self.plan is None:
            return []
        layers = set()
        for p in self.plan.params:
            for r in p.reads:
                if r.key.startswith("decoder.layers.") and len(r.region) == 3:
                    layers.add(r.region[0][0])
        return sorted(layers)


def twice_read(reads: list[tuple[str, str, str, int, int]]) -> list[dict[str, Any]]:
    """Byte ranges read more than once, per file, with the phase and kind of each read
    (``data``: tensor bytes via ``preadv``; ``meta``: zip headers, pickles, bytes items)."""
    out: list[dict[str, Any]] = []
    by_file: dict[str, list[tuple[int, int, str]]] = {}
    for phase, kind, path, offset, n in reads:
        by_file.setdefault(path, []).append((offset, offset + n, f"{phase}:{kind}"))
    for path, spans in sorted(by_file.items()):
        events = sorted({b for s in spans for b in s[:2]})
        for lo, hi in zip(events, events[1:]):
            hits = sorted(tag for a, b, tag in spans if a <= lo and hi <= b)
            if len(hits) < 2:
                continue
            last = out[-1] if out else None
            if last and last["file"] == path and last["end"] == lo and last["reads"] == hits:
                last["end"] = hi
            else:
                out.append({"file": path, "start": lo, "end": hi, "reads": hits})
    return out
