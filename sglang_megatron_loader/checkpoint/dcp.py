"""Read torch.distributed.checkpoint (DCP) data as Megatron's ``torch_dist`` writes it.

Only the metadata is parsed up front (once per process, :func:`cached_dcp_metadata`). A caller
asks for one global slice of one tensor; only the chunks overlapping it are touched, and of each
chunk only the bytes of the overlap are read, straight into the destination whatever its layout
(``scatter.py``). That the chunks tile each tensor is checked once per tensor, in time linear in
its chunks.
"""

from __future__ import annotations

import bisect
import itertools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from sglang_megatron_loader.checkpoint import scatter
from sglang_megatron_loader.checkpoint.dcp_metadata import DcpMetadata, read_dcp_metadata
from sglang_megatron_loader.checkpoint.torchzip import TensorRef, locate_tensor
from sglang_megatron_loader.errors import CorruptCheckpointError, IncompleteCheckpointError

Slice = tuple[tuple[int, int], ...]  # (start, stop) per dimension


@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a global tensor and the byte range holding it."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    relative_path: str
    offset: int
    length: int

    def overlap(self, region: Slice) -> Slice | None:
        """The part of ``region`` (global coordinates) inside this chunk, or None."""
        out = []
        for (start, stop), off, size in zip(region, self.offsets, self.sizes):
            lo, hi = max(start, off), min(stop, off + size)
            if lo >= hi:
                return None
            out.append((lo, hi))
        return tuple(out)


@dataclass(frozen=True)
class TensorInfo:
    """A global tensor as recorded in ``.metadata``."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class ReadStats:
    """Bytes and chunk reads performed, for reports and tests (thread-safe counters)."""

    bytes_read: int = 0
    reads: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.reads += 1


class DcpCheckpoint:
    """The tensors and bytes items of one DCP folder, read lazily by global slice."""

    def __init__(self, folder: Path, metadata: DcpMetadata | None = None) -> None:
        """``metadata``: the folder's ``.metadata`` already parsed (read here when None)."""
        self.folder = folder
        if metadata is None:
            metadata = cached_dcp_metadata(folder / ".metadata")
        self.metadata = metadata
        self.tensors, self.bytes_items = _index(metadata)
        self.stats = ReadStats()
        self._files: dict[str, BinaryIO] = {}
        self._zips: dict[tuple[str, int], TensorRef] = {}
        self._lock = threading.Lock()

    # -- files ---------------------------------------------------------------------------
    def _file(self, rel: str) -> BinaryIO:
        with self._lock:
            f = self._files.get(rel)
            if f is None:
                path = self.folder / rel
                try:
                    f = open(path, "rb")  # noqa: SIM115 - kept open for the reader's lifetime
                except FileNotFoundError as exc:
                    raise IncompleteCheckpointError(
                        f"{path}: data file named in {self.folder / '.metadata'} is missing"
                    ) from exc
                self._files[rel] = f
            return f

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def __enter__(self) -> DcpCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def file_sizes(self) -> dict[str, int]:
        """Size on disk of every data file the metadata references."""
        rels = {c.relative_path for t in self.tensors.values() for c in t.chunks}
        rels |= {rel for rel, _, _ in self.bytes_items.values()}
        return {rel: (self.folder / rel).stat().st_size for rel in sorted(rels)}

    # -- chunks --------------------------------------------------------------------------
    def _locate(self, info: TensorInfo, chunk: Chunk) -> TensorRef:
        key = (chunk.relative_path, chunk.offset)
        with self._lock:
            ref = self._zips.get(key)
        if ref is not None:
            return ref
        f = self._file(chunk.relative_path)
        source = f"{f.name} (key '{info.key}', chunk at {chunk.offsets})"
        if os.fstat(f.fileno()).st_size < chunk.offset + chunk.length:
            raise CorruptCheckpointError(
                f"{source}: file has {os.fstat(f.fileno()).st_size} bytes, the metadata places "
                f"the chunk at bytes {chunk.offset}..{chunk.offset + chunk.length}; truncated"
            )
        ref = locate_tensor(f, chunk.offset, chunk.length, source=source)
        if ref.size != chunk.sizes or ref.storage.dtype != info.dtype or not ref.is_contiguous():
            raise CorruptCheckpointError(
                f"{source}: expected a contiguous {info.dtype} tensor of shape {chunk.sizes}, "
                f"found {ref.storage.dtype} of shape {ref.size} (stride {ref.stride})"
            )
        if ref.storage_offset < 0 or ref.storage_offset + _numel(ref.size) > ref.storage.numel:
            raise CorruptCheckpointError(
                f"{source}: tensor view at element {ref.storage_offset} of {_numel(ref.size)} "
                f"elements exceeds its storage of {ref.storage.numel}"
            )
        with self._lock:
            self._zips[key] = ref
        return ref

    def read_slice(self, key: str, region: Slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """Global ``region`` of tensor ``key``, reading only the overlapping chunk bytes.

        ``out`` (shape = region extents) receives the data if given. A CPU ``out`` of the
        stored dtype is filled in place whatever its strides, each chunk's part landing straight
        in its columns; any other ``out`` (another dtype or device) gets one copy of the region.
        """
        info = self.tensors.get(key)
        if info is None:
            raise CorruptCheckpointError(f"{self.folder}: tensor '{key}' is not in the checkpoint")
        region = _check_region(info, region)
        extents = tuple(hi - lo for lo, hi in region)
        if out is not None and tuple(out.shape) != extents:
            raise ValueError(f"read_slice('{key}'): out has shape {tuple(out.shape)}, region "
                             f"{region} has {extents}")  # fmt: skip
        direct = out is not None and out.device.type == "cpu" and out.dtype == info.dtype
        target = out if direct else torch.empty(extents, dtype=info.dtype)
        parts = self._grid(info).parts(region)
        _check_cover(info, region, parts, self.folder / ".metadata")
        for chunk, ov in parts:
            dest = tuple(slice(lo - r0, hi - r0) for (lo, hi), (r0, _) in zip(ov, region))
            self._read_overlap_into(info, chunk, ov, target[dest])
        if out is None or direct:
            return target
        out.copy_(target)
        return out

    def _read_overlap_into(
        self, info: TensorInfo, chunk: Chunk, ov: Slice, dest: torch.Tensor
    ) -> None:
        """Read the part ``ov`` of ``chunk`` into ``dest`` (CPU, the stored dtype, shaped like
        ``ov``, any strides) without staging: see :func:`scatter.read_box`."""
        ref = self._locate(info, chunk)
        box = [(lo - off, hi - off) for (lo, hi), off in zip(ov, chunk.offsets)]
        f = self._file(chunk.relative_path)
        base = ref.storage.file_offset + ref.storage_offset * info.dtype.itemsize
        source = f"{f.name} (key '{info.key}')"  # the path as opened: no Path joins per read
        self.stats.add(scatter.read_box(f, base, chunk.sizes, box, dest, source=source))

    def _grid(self, info: TensorInfo) -> ChunkGrid:
        """:func:`_check_tiling` of a tensor, the first time it is read (kept per reader; two
        threads meeting a tensor at once both check it, harmlessly)."""
        grids: dict[str, ChunkGrid] = self.__dict__.setdefault("_grids", {})
        grid = grids.get(info.key)
        if grid is None:
            grid = grids[info.key] = _check_tiling(info, self.folder / ".metadata")
        return grid

    def read_bytes_item(self, key: str) -> bytes:
        """The raw payload of a bytes item (e.g. ``common_state/shard_0_1``)."""
        if key not in self.bytes_items:
            raise CorruptCheckpointError(
                f"{self.folder}: bytes item '{key}' is not in the checkpoint"
            )
        rel, offset, length = self.bytes_items[key]
        f = self._file(rel)
        size = os.fstat(f.fileno()).st_size
        data = os.pread(f.fileno(), length, offset) if offset + length <= size else b""
        if len(data) != length:
            raise CorruptCheckpointError(
                f"{self.folder / rel}: bytes item '{key}' needs bytes {offset}..{offset + length}, "
                f"the file has {size} bytes; truncated"
            )
        self.stats.add(length)
        return data


_PARSED: dict[tuple[object, ...], DcpMetadata] = {}
_PARSED_LOCK = threading.Lock()
_PARSED_KEEP = 4  # iterations kept parsed per process (a hot reload adds one)


def cached_dcp_metadata(path: Path) -> DcpMetadata:
    """:func:`read_dcp_metadata`, parsed once per process per version of the file: SGLang's
    config lookups, the plugin and the loader open the same checkpoint several times. A file
    rewritten since (path, inode, size, modification or change time differ) is parsed again."""
    try:
        st = os.stat(path)
    except OSError:
        return read_dcp_metadata(path)  # its own error for a missing file
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
           st.st_ctime_ns)  # fmt: skip
    with _PARSED_LOCK:
        hit = _PARSED.get(key)
    if hit is None:
        hit = read_dcp_metadata(path)
        with _PARSED_LOCK:
            _PARSED[key] = hit
            while len(_PARSED) > _PARSED_KEEP:
                del _PARSED[next(iter(_PARSED))]
    return hit


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


def _check_cover(
    info: TensorInfo, region: Slice, parts: list[tuple[Chunk, Slice]], source: Path
) -> None:
    """The chunks overlapping ``region`` hold as many elements as it has (with no two chunks
    overlapping, see :func:`_check_tiling`, they then cover it exactly once)."""
    covered = sum(_numel(tuple(hi - lo for lo, hi in ov)) for _, ov in parts)
    wanted = _numel(tuple(hi - lo for lo, hi in region))
    if covered != wanted:
        raise CorruptCheckpointError(
            f"{source}: chunks of '{info.key}' cover {covered} of the {wanted} elements of "
            f"region {region}; the metadata is damaged"
        )


GRID_CELLS = 1 << 24  # above this, chunks that are not a grid are compared pair by pair


@dataclass(frozen=True)
class ChunkGrid:
    """A tensor's chunks on the grid their edges draw: ``cuts`` per dimension, and the chunk
    of each cell when every chunk is one cell (every Megatron layout), else None (lookups
    scan the chunks)."""

    chunks: tuple[Chunk, ...]
    cuts: tuple[tuple[int, ...], ...]
    cells: dict[tuple[int, ...], Chunk] | None

    def parts(self, region: Slice) -> list[tuple[Chunk, Slice]]:
        """The chunks overlapping ``region`` and their overlaps, in time linear in those."""
        if self.cells is None:
            return [(c, ov) for c in self.chunks if (ov := c.overlap(region)) is not None]
        ranges = [
            range(bisect.bisect_right(cut, lo) - 1, bisect.bisect_left(cut, hi))
            for cut, (lo, hi) in zip(self.cuts, region)
        ]
        out = []
        for cell in itertools.product(*ranges):
            c = self.cells.get(cell)
            if c is not None and (ov := c.overlap(region)) is not None:
                out.append((c, ov))
        return out


def _check_tiling(info: TensorInfo, source: Path) -> ChunkGrid:
    """No element of ``info`` is in two chunks, in time linear in the chunks for a grid; the
    grid is returned for lookups.

    The distinct chunk edges per dimension cut the tensor into grid cells and each chunk into
    whole cells. Chunks of one cell each are checked with a dict of cells; chunks spanning
    several cells mark them in an array of owners; more than ``GRID_CELLS`` cells (edges that
    no grid explains) fall back to comparing pairs.
    """
    chunks = tuple(c for c in info.chunks if 0 not in c.sizes)
    cuts = tuple(
        tuple(sorted({0, dim, *(c.offsets[d] for c in chunks), *(c.offsets[d] + c.sizes[d]
                                                                    for c in chunks)}))
        for d, dim in enumerate(info.shape)
    )  # fmt: skip
    where = [{x: i for i, x in enumerate(cut)} for cut in cuts]
    boxes = [tuple((w[o], w[o + n]) for w, o, n in zip(where, c.offsets, c.sizes)) for c in chunks]
    cells: dict[tuple[int, ...], Chunk] | None = None
    if all(hi - lo == 1 for box in boxes for lo, hi in box):
        cells, pair = _one_cell_each(chunks, boxes)
    elif _numel(tuple(len(cut) - 1 for cut in cuts)) <= GRID_CELLS:
        pair = _owners_overlap(chunks, boxes, [len(cut) - 1 for cut in cuts])
    else:
        pair = next(((a, b) for i, a in enumerate(chunks) for b in chunks[i + 1 :]
                     if _boxes_meet(a, b)), None)  # fmt: skip
    if pair is not None:
        raise CorruptCheckpointError(
            f"{source}: chunks of '{info.key}' at offsets {pair[0].offsets} and "
            f"{pair[1].offsets} overlap; the metadata is damaged"
        )
    return ChunkGrid(chunks, cuts, cells)


def _one_cell_each(
    chunks: tuple[Chunk, ...], boxes: list[tuple[tuple[int, int], ...]]
) -> tuple[dict[tuple[int, ...], Chunk], tuple[Chunk, Chunk] | None]:
    """The chunk of each cell, and the first two chunks found in the same cell."""
    owner: dict[tuple[int, ...], Chunk] = {}
    for c, box in zip(chunks, boxes):
        cell = tuple(lo for lo, _ in box)
        if cell in owner:
            return owner, (owner[cell], c)
        owner[cell] = c
    return owner, None


def _owners_overlap(
    chunks: tuple[Chunk, ...], boxes: list[tuple[tuple[int, int], ...]], grid_shape: list[int]
) -> tuple[Chunk, Chunk] | None:
    """Mark each chunk's cells in an array of owners; the first two chunks sharing one."""
    grid = torch.full(grid_shape, -1, dtype=torch.int64)
    for i, (c, box) in enumerate(zip(chunks, boxes)):
        cells = grid[tuple(slice(lo, hi) for lo, hi in box)]
        taken = cells[cells >= 0]
        if taken.numel():
            return chunks[int(taken[0])], c
        cells.fill_(i)
    return None


def _boxes_meet(a: Chunk, b: Chunk) -> bool:
    return all(
        max(x, y) < min(x + m, y + n) for x, m, y, n in zip(a.offsets, a.sizes, b.offsets, b.sizes)
    )


def _check_region(info: TensorInfo, region: Any) -> Slice:
    region = tuple((int(a), int(b)) for a, b in region)
    if len(region) != len(info.shape) or any(
        not 0 <= lo < hi <= dim for (lo, hi), dim in zip(region, info.shape)
    ):
        raise CorruptCheckpointError(
            f"tensor '{info.key}' of shape {info.shape}: requested region {region} is out of bounds"
        )
    return region


def _index(meta: DcpMetadata) -> tuple[dict[str, TensorInfo], dict[str, tuple[str, int, int]]]:
    """Join each tensor's chunks and each bytes item with its storage entry (byte range)."""
    tensors: dict[str, TensorInfo] = {}
    for key, t in meta.tensors.items():
        chunks = []
        for c in t.chunks:
            r = meta.storage.get((key, c.offsets))
            if r is None:
                raise CorruptCheckpointError(
                    f"{meta.source}: chunk of '{key}' at offsets {c.offsets} has no storage entry"
                )
            chunks.append(Chunk(c.offsets, c.sizes, r.relative_path, r.offset, r.length))
        tensors[key] = TensorInfo(key, t.dtype, t.size, tuple(chunks))
    items: dict[str, tuple[str, int, int]] = {}
    for key in meta.bytes_items:
        r = meta.byte_range(key)
        if r is not None:
            items[key] = (r.relative_path, r.offset, r.length)
    return tensors, items
