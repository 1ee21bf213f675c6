"""Read torch.distributed.checkpoint (DCP) data as Megatron's ``torch_dist`` writes it.

Only the metadata is parsed up front. A caller asks for one global slice of one tensor; only the
chunks overlapping it are touched, and of each chunk only the contiguous byte span covering the
overlap is read, straight into a buffer that is then copied to the destination.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata

from sglang_megatron_loader.checkpoint.safe_pickle import safe_loads
from sglang_megatron_loader.checkpoint.torchzip import TensorRef, TorchZip, read_exact_into
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

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        meta_path = folder / ".metadata"
        if not meta_path.is_file():
            raise IncompleteCheckpointError(f"{meta_path}: missing; the DCP save is incomplete")
        meta = safe_loads(meta_path.read_bytes(), source=str(meta_path))
        if not isinstance(meta, dcp_metadata.Metadata):
            raise CorruptCheckpointError(
                f"{meta_path}: expected a DCP Metadata object, found {type(meta).__name__}"
            )
        try:
            self.tensors, self.bytes_items = _index(meta, meta_path)
        except (AttributeError, TypeError, ValueError, KeyError) as exc:  # wrong field types
            raise CorruptCheckpointError(
                f"{meta_path}: malformed DCP metadata ({type(exc).__name__}: {exc}); the file is "
                "damaged or not written by torch.distributed.checkpoint"
            ) from exc
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
        source = f"{self.folder / chunk.relative_path} (key '{info.key}', chunk at {chunk.offsets})"
        if os.fstat(f.fileno()).st_size < chunk.offset + chunk.length:
            raise CorruptCheckpointError(
                f"{source}: file has {os.fstat(f.fileno()).st_size} bytes, the metadata places "
                f"the chunk at bytes {chunk.offset}..{chunk.offset + chunk.length}; truncated"
            )
        ref = TorchZip(f, chunk.offset, chunk.length, source=source).locate()
        if not isinstance(ref, TensorRef):
            raise CorruptCheckpointError(f"{source}: chunk is not a tensor ({type(ref).__name__})")
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

        ``out`` (shape = region extents, any dtype) receives the data if given.
        """
        info = self.tensors.get(key)
        if info is None:
            raise CorruptCheckpointError(f"{self.folder}: tensor '{key}' is not in the checkpoint")
        region = _check_region(info, region)
        extents = tuple(hi - lo for lo, hi in region)
        if out is None:
            out = torch.empty(extents, dtype=info.dtype)
        parts = [(c, ov) for c in info.chunks if (ov := c.overlap(region)) is not None]
        _check_tiling(info, region, parts, self.folder / ".metadata")
        for chunk, ov in parts:
            dest = tuple(slice(lo - r0, hi - r0) for (lo, hi), (r0, _) in zip(ov, region))
            self._read_overlap_into(info, chunk, ov, out[dest])
        return out

    def _read_overlap_into(
        self, info: TensorInfo, chunk: Chunk, ov: Slice, dest: torch.Tensor
    ) -> None:
        """Read the part ``ov`` of ``chunk`` into ``dest`` (shaped like ``ov``).

        ``ov`` is read as contiguous runs of the chunk's row-major storage (one run when it is
        a block of whole rows; one per row for a column slice, so a row-parallel shard reads
        only its columns). Runs land straight in ``dest`` when it is contiguous CPU memory of
        the stored dtype; otherwise in a buffer of ``ov``'s size, then ``copy_`` (casting).
        """
        ref = self._locate(info, chunk)
        local = [(lo - off, hi - off) for (lo, hi), off in zip(ov, chunk.offsets)]
        strides = _contiguous_strides(chunk.sizes)
        itemsize = info.dtype.itemsize
        direct = dest.dtype == info.dtype and dest.device.type == "cpu" and dest.is_contiguous()
        buf = dest.reshape(-1) if direct else torch.empty(dest.numel(), dtype=info.dtype)
        f = self._file(chunk.relative_path)
        source = str(self.folder / chunk.relative_path)
        base = ref.storage.file_offset + ref.storage_offset * itemsize
        pos = 0
        for first, n in _runs(local, chunk.sizes, strides):
            read_exact_into(f, base + first * itemsize, buf[pos : pos + n], source=source)
            pos += n
        if not direct:
            dest.copy_(buf.view(dest.shape))
        self.stats.add(pos * itemsize)

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


def _runs(
    local: list[tuple[int, int]], sizes: tuple[int, ...], strides: tuple[int, ...]
) -> list[tuple[int, int]]:
    """(first element, length) of the contiguous runs covering box ``local``, in C order."""
    k = len(sizes) - 1  # innermost dim not fully covered: runs span it and all dims after it
    while k > 0 and local[k] == (0, sizes[k]):
        k -= 1
    run = (local[k][1] - local[k][0]) * strides[k]
    starts = [local[k][0] * strides[k]]
    for d in range(k - 1, -1, -1):
        starts = [i * strides[d] + s for i in range(*local[d]) for s in starts]
    return [(s, run) for s in starts]


def _check_tiling(
    info: TensorInfo, region: Slice, parts: list[tuple[Chunk, Slice]], source: Path
) -> None:
    """The chunks overlapping ``region`` cover it exactly once: no gap, no element twice."""
    covered = sum(_numel(tuple(hi - lo for lo, hi in ov)) for _, ov in parts)
    wanted = _numel(tuple(hi - lo for lo, hi in region))
    if covered != wanted:
        raise CorruptCheckpointError(
            f"{source}: chunks of '{info.key}' cover {covered} of the {wanted} elements of "
            f"region {region}; the metadata is damaged"
        )
    for i, (a, ova) in enumerate(parts):
        for b, ovb in parts[i + 1 :]:
            if all(max(x0, y0) < min(x1, y1) for (x0, x1), (y0, y1) in zip(ova, ovb)):
                raise CorruptCheckpointError(
                    f"{source}: chunks of '{info.key}' at offsets {a.offsets} and {b.offsets} "
                    "overlap; the metadata is damaged"
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


def _index(
    meta: Any, source: Path
) -> tuple[dict[str, TensorInfo], dict[str, tuple[str, int, int]]]:
    """Join ``state_dict_metadata`` with ``storage_data`` into per-tensor chunk lists."""
    storage: dict[tuple[str, tuple[int, ...]], tuple[str, int, int]] = {}
    for idx, info in (meta.storage_data or {}).items():
        if getattr(info, "transform_descriptors", None):
            raise CorruptCheckpointError(
                f"{source}: '{idx.fqn}' is stored with transforms {info.transform_descriptors} "
                "(compression/encryption); only plain torch_dist files are supported"
            )
        offset = tuple(idx.offset) if idx.offset is not None else ()
        storage[(idx.fqn, offset)] = _byte_range(idx.fqn, info, source)
    tensors: dict[str, TensorInfo] = {}
    items: dict[str, tuple[str, int, int]] = {}
    for key, md in meta.state_dict_metadata.items():
        if not isinstance(key, str):
            raise CorruptCheckpointError(f"{source}: key {key!r} is not a string")
        if isinstance(md, dcp_metadata.BytesStorageMetadata):
            info = storage.get((key, ())) or _find_any(storage, key)
            if info is not None:
                items[key] = info
            continue
        if not isinstance(md, dcp_metadata.TensorStorageMetadata):
            raise CorruptCheckpointError(
                f"{source}: '{key}' has unknown metadata {type(md).__name__}"
            )
        shape = _dims(md.size)
        if not isinstance(md.properties.dtype, torch.dtype) or shape is None:
            raise CorruptCheckpointError(
                f"{source}: '{key}' has dtype {md.properties.dtype!r} and size {md.size!r}; "
                "expected a torch dtype and non-negative integer sizes"
            )
        chunks = []
        for c in md.chunks:
            offsets, sizes = _dims(c.offsets), _dims(c.sizes)
            if offsets is None or sizes is None or not len(offsets) == len(sizes) == len(shape):
                raise CorruptCheckpointError(
                    f"{source}: chunk of '{key}' has offsets {c.offsets!r} and sizes {c.sizes!r}; "
                    f"expected {len(shape)} non-negative integers each"
                )
            if any(o + n > d for o, n, d in zip(offsets, sizes, shape)):
                raise CorruptCheckpointError(
                    f"{source}: chunk of '{key}' at offsets {offsets} with sizes {sizes} "
                    f"extends beyond the tensor's shape {shape}"
                )
            info = storage.get((key, offsets))
            if info is None:
                raise CorruptCheckpointError(
                    f"{source}: chunk of '{key}' at offsets {offsets} has no storage entry"
                )
            chunks.append(Chunk(offsets, sizes, *info))
        tensors[key] = TensorInfo(key, md.properties.dtype, shape, tuple(chunks))
    return tensors, items


def _dims(values: Any) -> tuple[int, ...] | None:
    """``values`` as a tuple of non-negative ints, or None when it is anything else."""
    if not isinstance(values, tuple | list):  # torch.Size is a tuple
        return None
    if not all(isinstance(v, int) and v >= 0 for v in values):
        return None
    return tuple(int(v) for v in values)


def _byte_range(fqn: str, info: Any, source: Path) -> tuple[str, int, int]:
    """``(relative_path, offset, length)`` of a storage entry, inside the checkpoint folder."""
    rel, offset, length = info.relative_path, info.offset, info.length
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise CorruptCheckpointError(
            f"{source}: '{fqn}' is stored in {rel!r}; expected a data file inside the "
            "checkpoint folder (the metadata is damaged or hostile)"
        )
    if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
        raise CorruptCheckpointError(
            f"{source}: '{fqn}' has byte offset {offset!r} and length {length!r}; expected "
            "non-negative integers"
        )
    return rel, offset, length


def _find_any(
    storage: dict[tuple[str, tuple[int, ...]], tuple[str, int, int]], key: str
) -> tuple[str, int, int] | None:
    for (fqn, _), info in storage.items():
        if fqn == key:
            return info
    return None
