"""Host staging for reads that cannot land in their destination directly.

A read lands straight in a CPU parameter of the stored dtype (see ``checkpoint/scatter.py``).
Any other destination (a GPU parameter, or another dtype) is filled through a small pool of
host buffers reused across reads: pinned when the destination is on a CUDA device, copied to
it asynchronously on a side stream (one per device) so the next reads overlap the copy, and
cast on the device. Each buffer remembers the event of its last copy and waits for it before
it is filled again; :meth:`Stager.finish` waits for every copy.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Slot:
    buffer: torch.Tensor | None = None
    event: Any = None  # torch.cuda.Event of the last copy out of ``buffer``


class Stager:
    """At most ``count`` reused host buffers of at least ``nbytes`` each, and the copies out to
    ``devices``. Made on the thread that owns the destinations: each device's side stream
    first waits for the work that thread has queued (the parameters may still be written)."""

    def __init__(self, count: int, nbytes: int, devices: Iterable[torch.device] = ()) -> None:
        self.nbytes = nbytes
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(_Slot())
        self._streams: dict[torch.device, Any] = {}
        for device in {d for d in devices if d.type == "cuda"}:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))

    def stage(
        self,
        rows: torch.Tensor,
        dtype: torch.dtype,
        extents: tuple[int, ...],
        fill: Callable[[torch.Tensor], object],
    ) -> None:
        """``fill`` a buffer viewed as ``dtype`` of shape ``extents``, then copy it into
        ``rows`` (same number of elements), casting where the dtypes differ."""
        numel = 1
        for e in extents:
            numel *= e
        nbytes = numel * dtype.itemsize
        pin = rows.device.type == "cuda"
        slot = self._free.get()
        try:
            if slot.event is not None:
                slot.event.synchronize()  # its previous copy has left the buffer
                slot.event = None
            buf = slot.buffer
            if buf is None or buf.numel() < nbytes or (pin and not buf.is_pinned()):
                buf = slot.buffer = torch.empty(max(nbytes, self.nbytes), dtype=torch.uint8,
                                                pin_memory=pin)  # fmt: skip
            staged = buf[:nbytes].view(dtype).view(extents)
            fill(staged)
            slot.event = self._copy(rows, staged.view(rows.shape))
        finally:
            self._free.put(slot)

    def _copy(self, rows: torch.Tensor, staged: torch.Tensor) -> Any:
        if rows.device.type != "cuda":
            rows.copy_(staged)
            return None
        stream = self._streams[rows.device]
        with torch.cuda.stream(stream):
            if staged.dtype != rows.dtype:  # the stored dtype crosses, the cast runs there
                staged = staged.to(rows.device, non_blocking=True)
            rows.copy_(staged, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def finish(self) -> None:
        """Wait for every copy to its destination."""
        for stream in self._streams.values():
            stream.synchronize()
