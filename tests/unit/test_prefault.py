"""Pre-faulting a CPU destination: its pages come in, its contents stay, and nothing is done
where the call cannot apply."""

from __future__ import annotations

import sys

import pytest
import torch

from sglang_megatron_loader import prefault

LINUX = sys.platform.startswith("linux")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_populate_keeps_what_is_written() -> None:
    t = torch.arange(3 * 2**20, dtype=torch.int32)  # 12 MiB, written
    want = t.clone()
    prefault.populate(t[5:])  # an unaligned start: the partial first page is left alone
    assert torch.equal(t, want)


@pytest.mark.skipif(not LINUX, reason="MADV_POPULATE_WRITE is Linux's")
def test_populate_brings_fresh_pages_in() -> None:
    if not prefault._function():
        pytest.skip("no madvise in this libc")
    t = torch.empty(64 * 2**20, dtype=torch.uint8)  # a fresh mapping, not yet faulted in
    before = _rss_bytes()
    done = prefault.populate(t)
    grown = _rss_bytes() - before
    if not done:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
    assert grown >= 48 * 2**20, f"RSS grew by {grown} bytes"


def test_populate_skips_small_strided_and_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert prefault.populate(torch.empty(16)) is False  # under MIN_BYTES: faults are cheaper
    assert prefault.populate(torch.empty(2048, 2048)[:, :1024]) is False  # not contiguous
    monkeypatch.setattr(prefault, "_madvise", False)  # another OS, or a libc without it
    assert prefault.populate(torch.empty(4 * 2**20, dtype=torch.uint8)) is False
