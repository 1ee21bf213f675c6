"""Fault in a CPU destination's pages with one system call before a read fills them.

SGLang builds a CPU model's parameters with ``torch.empty``: large ones are fresh anonymous
mappings whose pages the kernel allocates and zeroes at their first write. A ``preadv`` into
such memory takes one page fault per 4 KiB page inside the copy, which costs more than the
copy itself. ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+) allocates the same pages in one
call, without a fault per page. The loader populates every CPU parameter before its first read,
not read by read: a column-slice read maps the file (``mmap`` takes the address-space lock for
writing) and stalls behind a populate running on another thread.

Measured on this project's 2-core machine, 512 MB from the page cache into fresh memory on 2
threads (medians of 7-9): contiguous reads, ``preadv`` alone 0.164-0.167 s, populate then
``preadv`` 0.137-0.151 s, torch's ``copy_`` from a mapping of the file (what SGLang's default
loader does) 0.142-0.146 s; column slices (a quarter of each row from each of 4 chunks, one
strided copy from a mapping per chunk), 0.196 s as they come, 0.167 s populated first (0.086 s
populating, 0.081 s copying), 0.226 s populating and copying side by side.

Where the call is missing (another OS, an older kernel) or fails, nothing changes: the read
faults the pages in as before.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading

import torch

MADV_POPULATE_WRITE = 23
PAGE = mmap.PAGESIZE
MIN_BYTES = 1 << 20  # below this the faults cost less than the call

_lock = threading.Lock()
_madvise: object = None  # the libc function, False once known to be unavailable


def _function() -> object:
    global _madvise
    if _madvise is None:
        with _lock:
            if _madvise is None:
                try:
                    if not sys.platform.startswith("linux"):
                        raise OSError("not Linux")
                    fn = ctypes.CDLL(None, use_errno=True).madvise
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                    fn.restype = ctypes.c_int
                    _madvise = fn
                except (OSError, AttributeError):
                    _madvise = False
    return _madvise


def populate(dest: torch.Tensor) -> bool:
    """Fault in the whole pages of ``dest`` (a contiguous CPU tensor) for writing; True when
    the kernel did. Partial pages at either end are left to the read."""
    if dest.device.type != "cpu" or not dest.is_contiguous():
        return False
    nbytes = dest.numel() * dest.element_size()
    if nbytes < MIN_BYTES:
        return False
    fn = _function()
    if not fn:
        return False
    start = dest.data_ptr()
    lo = -(-start // PAGE) * PAGE
    hi = (start + nbytes) // PAGE * PAGE
    if hi <= lo:
        return False
    if fn(lo, hi - lo, MADV_POPULATE_WRITE) == 0:  # type: ignore[operator]
        return True
    if ctypes.get_errno() == 22:  # EINVAL: a kernel without MADV_POPULATE_WRITE
        global _madvise
        _madvise = False
    return False
