"""The chunk tiling check: overlapping chunks named, in time linear in the chunks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from sglang_megatron_loader.checkpoint import dcp
from sglang_megatron_loader.checkpoint.dcp import Chunk, TensorInfo
from sglang_megatron_loader.errors import CorruptCheckpointError

SOURCE = Path("ckpt/.metadata")


def _info(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], shape) -> TensorInfo:
    chunks = tuple(Chunk(o, s, "__0_0.distcp", 0, 0) for o, s in boxes)
    return TensorInfo("w", torch.float32, shape, chunks)


def _grid(layers: int, rows: int, cols: int, size=(1, 4, 4)) -> list:
    return [
        ((layer, r * size[1], c * size[2]), size)
        for layer in range(layers)
        for r in range(rows)
        for c in range(cols)
    ]


def test_a_grid_of_many_chunks_is_checked_in_linear_time() -> None:
    """80 layers x TP8 x 32 DP shards: 20480 chunks, checked in well under a second."""
    info = _info(_grid(80, 32, 8), (80, 128, 32))
    start = time.perf_counter()
    dcp._check_tiling(info, SOURCE)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("cells", [dcp.GRID_CELLS, 0], ids=["grid", "pairwise"])
def test_overlapping_chunks_are_named(monkeypatch, cells: int) -> None:
    """One-cell chunks (a dict of cells), chunks spanning several cells (an array of owners),
    and, past ``GRID_CELLS``, the pairwise comparison: each names both chunks."""
    monkeypatch.setattr(dcp, "GRID_CELLS", cells)
    one_cell = _grid(2, 2, 2) + [((1, 4, 4), (1, 4, 4))]
    wide = [((0, 0, 0), (2, 8, 4)), ((0, 0, 4), (2, 4, 4)), ((1, 2, 2), (1, 4, 4))]
    for boxes, offsets in ((one_cell, r"\(1, 4, 4\) and \(1, 4, 4\)"), (wide, r"\(0, 0, 0\)")):
        with pytest.raises(CorruptCheckpointError, match=rf"'w' at offsets .*{offsets}.* overlap"):
            dcp._check_tiling(_info(boxes, (2, 8, 8)), SOURCE)


def test_uneven_chunks_that_tile_pass() -> None:
    """Row ranges that differ per column block (a DP split inside each TP shard) tile; a hole is
    found by the element count of the read that meets it."""
    boxes = [((0, 0), (3, 4)), ((3, 0), (5, 4)), ((0, 4), (1, 4)), ((1, 4), (7, 4))]
    dcp._check_tiling(_info(boxes, (8, 8)), SOURCE)
    holed = _info(boxes[:-1], (8, 8))  # no overlap; the per-read count finds the hole
    dcp._check_tiling(holed, SOURCE)
    region = ((0, 8), (0, 8))
    parts = [(c, ov) for c in holed.chunks if (ov := c.overlap(region))]
    with pytest.raises(CorruptCheckpointError, match=r"cover 36 of the 64 elements"):
        dcp._check_cover(holed, region, parts, SOURCE)


@pytest.mark.parametrize(
    "boxes",
    [
        _grid(3, 2, 2),
        [((0, 0), (3, 4)), ((3, 0), (5, 4)), ((0, 4), (1, 4)), ((1, 4), (7, 4))],
    ],
    ids=["grid", "uneven"],
)
def test_lookups_find_the_chunks_a_scan_finds(boxes) -> None:
    """The grid's cell lookup (one-cell chunks) and the scan (others) agree for every region."""
    shape = (3, 8, 8) if len(boxes[0][0]) == 3 else (8, 8)
    info = _info(boxes, shape)
    grid = dcp._check_tiling(info, SOURCE)
    assert (grid.cells is None) == (len(shape) == 2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        region = []
        for d in shape:
            lo = int(torch.randint(0, d, (1,), generator=gen))
            region.append((lo, int(torch.randint(lo + 1, d + 1, (1,), generator=gen))))
        region = tuple(region)
        scan = {(c, ov) for c in info.chunks if (ov := c.overlap(region)) is not None}
        assert set(grid.parts(region)) == scan, region
