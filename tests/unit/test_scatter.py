"""Boxes of a stored array read straight into destinations of every layout (scatter.read_box)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

from sglang_megatron_loader.checkpoint import scatter
from sglang_megatron_loader.errors import CorruptCheckpointError

_BASE = 24  # bytes before the array in the file (not page aligned on purpose)


def _stored(
    tmp_path: Path, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[Path, torch.Tensor]:
    data = (torch.arange(torch.Size(shape).numel()) % 251).to(dtype).reshape(shape)
    path = tmp_path / "chunk.bin"
    path.write_bytes(b"\x01" * _BASE + data.view(torch.uint8).numpy().tobytes() + b"\x02" * 8)
    return path, data


def _destinations(extents: tuple[int, ...], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A contiguous tensor, columns in the middle of a wider one (a row-parallel shard next to
    its neighbours), and a transposed one (runs of one element)."""
    wide = torch.full((*extents[:-1], extents[-1] + 7), -1, dtype=dtype)
    return {
        "contiguous": torch.full(extents, -1, dtype=dtype),
        "columns": wide[..., 3 : 3 + extents[-1]],
        "transposed": torch.full(extents[::-1], -1, dtype=dtype).permute(
            *reversed(range(len(extents)))
        ),
    }


SHAPES = [(6, 40), (3, 5, 48)]


def _boxes(shape: tuple[int, ...]) -> list[list[tuple[int, int]]]:
    """Whole array, a block of whole rows, one row, a column slice, an inner box."""
    full = [(0, d) for d in shape]
    rows = [(1, shape[0] - 1), *full[1:]]
    one = [(2, 3), *full[1:]]
    cols = [*full[:-1], (8, shape[-1] - 8)]
    inner = [(1, d - 1) for d in shape]
    return [full, rows, one, cols, inner]


@pytest.mark.parametrize("min_run", [scatter.MIN_RUN_BYTES, 1], ids=["default", "scattered"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_box_lands_in_every_layout(
    tmp_path: Path, monkeypatch, shape, dtype, min_run: int
) -> None:
    """``scattered``: every run worth a buffer, so strided destinations take scattered preadv."""
    monkeypatch.setattr(scatter, "MIN_RUN_BYTES", min_run)
    path, data = _stored(tmp_path, shape, dtype)
    with open(path, "rb") as f:
        for box, name in itertools.product(_boxes(shape), ("contiguous", "columns", "transposed")):
            extents = tuple(hi - lo for lo, hi in box)
            dest = _destinations(extents, dtype)[name]
            n = scatter.read_box(f, _BASE, shape, box, dest, source="chunk.bin")
            want = data[tuple(slice(lo, hi) for lo, hi in box)]
            assert torch.equal(dest, want), (box, name)
            assert n == want.numel() * want.element_size()


def test_one_span_into_contiguous_memory_is_one_preadv(tmp_path: Path, monkeypatch) -> None:
    path, data = _stored(tmp_path, (64, 256), torch.bfloat16)
    calls: list[tuple[int, int]] = []
    real = os.preadv

    def spy(fd, buffers, offset, *flags):
        n = real(fd, buffers, offset, *flags)
        calls.append((offset, n))
        return n

    monkeypatch.setattr(os, "preadv", spy)
    dest = torch.zeros(32, 256, dtype=torch.bfloat16)
    with open(path, "rb") as f:
        scatter.read_box(f, _BASE, (64, 256), [(16, 48), (0, 256)], dest, source="x")
    assert torch.equal(dest, data[16:48])
    assert calls == [(_BASE + 16 * 256 * 2, 32 * 256 * 2)]


def _spy_iov(monkeypatch, cap: int | None = None) -> list[tuple[int, int, int]]:
    """Records each scattered ``preadv`` (offset, buffers, bytes); ``cap``: at most that many
    bytes a call (a short read, as a signal or a network file system may give)."""
    calls: list[tuple[int, int, int]] = []
    real = scatter._preadv_iov

    def spy(fd: int, iov, offset: int) -> int:
        if cap is not None:
            ends = iov[:, 1].cumsum()
            keep = min(int((ends < cap).sum()) + 1, len(iov))
            iov = iov[:keep].copy()
            iov[-1, 1] -= max(0, int(ends[keep - 1]) - cap)
        n = real(fd, iov, offset)
        calls.append((offset, len(iov), n))
        return n

    monkeypatch.setattr(scatter, "_preadv_iov", spy)
    monkeypatch.setattr(os, "preadv", lambda *a: pytest.fail("read row by row"))
    monkeypatch.setattr(scatter, "read_mapped", lambda *a, **k: pytest.fail("mapped"))
    return calls


def test_a_chunk_into_columns_is_scattered_preadv_iov_max_rows_a_call(
    tmp_path: Path, monkeypatch
) -> None:
    """A whole chunk into the columns of a parameter (o_proj served at TP1 from a TP4 save):
    one contiguous file span, ``preadv`` with a buffer per destination row, IOV_MAX rows a
    call; the columns beside it untouched."""
    path, data = _stored(tmp_path, (2500, 128), torch.bfloat16)
    calls = _spy_iov(monkeypatch)
    wide = torch.zeros(2500, 128 * 3, dtype=torch.bfloat16)
    with open(path, "rb") as f:
        n = scatter.read_box(f, _BASE, (2500, 128), [(0, 2500), (0, 128)], wide[:, 128:256],
                             source="x")  # fmt: skip
    assert n == 2500 * 256 and torch.equal(wide[:, 128:256], data)
    assert not wide[:, :128].any() and not wide[:, 256:].any()
    iov_max = scatter._libc_preadv()[1]
    offsets = [_BASE + i * 256 for i in range(0, 2500, iov_max)]
    assert [c[0] for c in calls] == offsets
    assert sum(c[2] for c in calls) == 2500 * 256


@pytest.mark.parametrize("cap", [1000, 256 * 7, 5])
def test_short_scattered_reads_resume_inside_a_run(tmp_path: Path, monkeypatch, cap) -> None:
    path, data = _stored(tmp_path, (64, 128), torch.bfloat16)
    calls = _spy_iov(monkeypatch, cap=cap)
    wide = torch.zeros(64, 300, dtype=torch.bfloat16)
    with open(path, "rb") as f:
        scatter.read_box(f, _BASE, (64, 128), [(0, 64), (0, 128)], wide[:, 7:135], source="x")
    assert torch.equal(wide[:, 7:135], data) and not wide[:, :7].any() and not wide[:, 135:].any()
    assert all(n == min(cap, 64 * 256 - (off - _BASE)) for off, _, n in calls)
    assert sum(n for *_, n in calls) == 64 * 256


def test_a_truncated_file_under_a_scattered_read_is_a_clear_error(tmp_path: Path) -> None:
    path, _ = _stored(tmp_path, (64, 128), torch.bfloat16)
    os.truncate(path, _BASE + 10 * 256 + 100)
    wide = torch.zeros(64, 300, dtype=torch.bfloat16)
    with (
        open(path, "rb") as f,
        pytest.raises(CorruptCheckpointError, match=r"chunk\.bin: file ends at byte 2684, "),
    ):
        scatter.read_box(f, _BASE, (64, 128), [(0, 64), (0, 128)], wide[:, 7:135],
                         source=str(path))  # fmt: skip


@pytest.mark.parametrize("box", [[(0, 4096), (16, 32)], [(0, 4096), (0, 64)]], ids=["cols", "all"])
def test_columns_and_strided_destinations_are_one_mapped_copy(
    tmp_path: Path, monkeypatch, box
) -> None:
    """A column slice of a chunk (TP4 from a TP1 save), or a whole chunk into the columns of a
    parameter whose runs are too short for a buffer each (128 bytes): no syscall per row, no
    staging buffer."""
    path, data = _stored(tmp_path, (4096, 64), torch.bfloat16)
    monkeypatch.setattr(os, "preadv", lambda *a: pytest.fail("read row by row"))
    cols = box[1][1] - box[1][0]
    wide = torch.zeros(4096, cols + 8, dtype=torch.bfloat16)
    with open(path, "rb") as f:
        scatter.read_box(f, _BASE, (4096, 64), box, wide[:, 8:], source="x")
    assert torch.equal(wide[:, 8:], data[:, box[1][0] : box[1][1]]) and not wide[:, :8].any()


def test_file_runs_are_the_rows_of_a_column_slice() -> None:
    runs = scatter.file_runs((4096, 64), [(0, 4096), (16, 32)])
    assert len(runs) == 4096 and runs[:2] == [(16, 16), (64 + 16, 16)]
    assert scatter.file_runs((4, 8, 64), [(1, 3), (0, 8), (0, 64)]) == [(512, 1024)]


@pytest.mark.parametrize("box", [[(0, 6), (0, 40)], [(0, 6), (8, 16)]], ids=["span", "columns"])
def test_truncated_file_is_a_clear_error(tmp_path: Path, box) -> None:
    path, _ = _stored(tmp_path, (6, 40), torch.float32)
    os.truncate(path, _BASE + 3 * 40 * 4)
    dest = torch.empty([hi - lo for lo, hi in box], dtype=torch.float32)
    with (
        open(path, "rb") as f,
        pytest.raises(CorruptCheckpointError, match=r"chunk\.bin: .*the file is truncated"),
    ):
        scatter.read_box(f, _BASE, (6, 40), box, dest, source=str(path))
