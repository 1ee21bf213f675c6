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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_box_lands_in_every_layout(tmp_path: Path, shape, dtype) -> None:
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


@pytest.mark.parametrize("box", [[(0, 4096), (16, 32)], [(0, 4096), (0, 64)]], ids=["cols", "all"])
def test_columns_and_strided_destinations_are_one_mapped_copy(
    tmp_path: Path, monkeypatch, box
) -> None:
    """A column slice of a chunk (TP4 from a TP1 save), or a whole chunk into the columns of a
    parameter (TP1 from TP2): no syscall per row, no staging buffer."""
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
