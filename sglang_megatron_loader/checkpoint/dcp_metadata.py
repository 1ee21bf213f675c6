"""DCP ``.metadata`` read without torch's own dataclasses.

``.metadata`` is a pickled ``torch.distributed.checkpoint.metadata.Metadata``. Unpickled into the
installed torch's classes, it breaks whenever another torch release pickles them differently:
torch 2.15's ``TensorProperties`` pickles a sixth value (``strides``) that torch 2.14's
``__setstate__`` cannot unpack. Here every class the file may name is an inert stand-in
(:class:`Pickled`) that records its fields by name, whatever form the pickle gives them (a dict,
a ``(dict, slots)`` pair, a tuple, constructor arguments). The fields are then checked against
what this reader knows, only along the path it reads (entries and storage index, not planner
data):

* fields it uses must be present and well-typed, else :class:`CorruptCheckpointError`;
* newer fields it understands are accepted: ``strides`` when they are the contiguous strides;
* any other field of a class that describes bytes (tensor, chunk, storage entry, index) is
  accepted only when unset (None, empty, False). Set, it may change what the bytes mean, so the
  file is refused as written by a newer torch (:class:`UnsupportedCheckpointError` naming the
  field and its value), never as corrupt;
* other fields (``Metadata``, ``StorageMeta``, planner data, megatron-core's additions) are kept
  and ignored.

Nothing outside the allow-list is imported or called: the unpickler is ``SafeUnpickler`` with
the stand-ins of ``dcp_standins`` on top. :func:`parse_dcp_metadata` takes the file's bytes, so
one parse can be cached and reused; :func:`read_dcp_metadata` reads the file first.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sglang_megatron_loader.checkpoint.dcp_standins import (
    SUPPORTED,
    BytesStorageRecord,
    ChunkRecord,
    EnumRecord,
    IndexRecord,
    MetadataRecord,
    Pickled,
    PropertiesRecord,
    StorageInfoRecord,
    TensorStorageRecord,
    unpickle_dcp_metadata,
)
from sglang_megatron_loader.errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsupportedCheckpointError,
)
from sglang_megatron_loader.gcpause import paused_gc


# -- the parsed result -------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkMeta:
    """One stored chunk of a tensor: where it sits in the global tensor."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class TensorMeta:
    """A tensor entry: dtype, global size and chunks; ``strides`` as torch >= 2.15 records
    them (always contiguous here: anything else is refused)."""

    key: str
    dtype: torch.dtype
    size: tuple[int, ...]
    chunks: tuple[ChunkMeta, ...]
    strides: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ByteRange:
    """Where a storage entry's bytes are: a file inside the checkpoint folder and a range."""

    relative_path: str
    offset: int
    length: int


@dataclass(frozen=True)
class DcpMetadata:
    """What ``.metadata`` says, as plain values: tensor entries, bytes items, storage index."""

    source: str
    tensors: Mapping[str, TensorMeta]
    bytes_items: tuple[str, ...]
    storage: Mapping[tuple[str, tuple[int, ...]], ByteRange]  # (fqn, chunk offsets or ())
    version: str | None  # ``Metadata.version``: the DCP format, "1.0.0" in torch 2.14 and 2.15
    pickled_globals: frozenset[str]  # every class the file names: tells writers apart
    records_strides: bool  # TensorProperties carry ``strides``: written by torch >= 2.15

    def keys(self) -> list[str]:
        return [*self.tensors, *self.bytes_items]

    def byte_range(self, fqn: str, offsets: tuple[int, ...] = ()) -> ByteRange | None:
        """The storage entry of ``fqn`` at ``offsets``; for a bytes item, any entry of it."""
        found = self.storage.get((fqn, offsets))
        if found is None and not offsets:
            found = next((r for (f, _), r in self.storage.items() if f == fqn), None)
        return found


def read_dcp_metadata(path: Path) -> DcpMetadata:
    """Read and parse a ``.metadata`` file."""
    if not path.is_file():
        raise IncompleteCheckpointError(f"{path}: missing; the DCP save is incomplete")
    return parse_dcp_metadata(path.read_bytes(), source=str(path))


def parse_dcp_metadata(data: bytes, *, source: str) -> DcpMetadata:
    """Parse the bytes of a ``.metadata`` file (named ``source`` in messages)."""
    with paused_gc():
        return _parse_dcp_metadata(data, source)


def _parse_dcp_metadata(data: bytes, source: str) -> DcpMetadata:
    root, names = unpickle_dcp_metadata(data, source=source)
    if not isinstance(root, MetadataRecord):
        raise CorruptCheckpointError(
            f"{source}: expected a DCP Metadata object, found {type(root).__name__}"
        )
    check = _Checker(source, root.fields.get("version"), root.fields.get("state_dict_metadata"))
    storage = check.storage_index(root.fields.get("storage_data"))
    tensors, items = check.entries(root.fields.get("state_dict_metadata"))
    version = root.fields.get("version")
    return DcpMetadata(
        source=source,
        tensors=types.MappingProxyType(tensors),
        bytes_items=tuple(items),
        storage=types.MappingProxyType(storage),
        version=version if isinstance(version, str) else None,
        pickled_globals=names,
        records_strides=check.saw_strides,
    )


# -- checks ------------------------------------------------------------------------------------
def _unset(value: Any) -> bool:
    if value is None or value is False:
        return True
    return isinstance(value, tuple | list | dict | set | frozenset | str | bytes) and not value


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except RecursionError:  # a hostile, deeply nested value
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dims(values: Any) -> tuple[int, ...] | None:
    """``values`` as a tuple of non-negative ints, or None when it is anything else."""
    if not isinstance(values, tuple | list):
        return None
    dims = tuple(values)
    if not dims or ({*map(type, dims)} == {int} and min(dims) >= 0):  # the common case, in C
        return dims
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return None
    return tuple(int(v) for v in values)


def _is_contiguous(sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """torch's rule: row-major strides, ignoring dims of size 1; empty tensors always are."""
    if len(sizes) != len(strides):
        return False
    if 0 in sizes:
        return True
    expected = 1
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


class _Checker:
    """Validates the stand-ins along the path the reader uses; messages name ``source``."""

    def __init__(self, source: str, version: Any, entries: Any) -> None:
        self.source = source
        self.version = version if isinstance(version, str) else None
        self.saw_strides = isinstance(entries, dict) and any(
            isinstance(md, TensorStorageRecord)
            and isinstance(props := md.fields.get("properties"), PropertiesRecord)
            and "strides" in props.fields
            for md in entries.values()
        )

    def corrupt(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.source}: {what}")

    def newer(
        self, what: str, problem: str = "a field that may change what the stored bytes mean"
    ) -> UnsupportedCheckpointError:
        """A well-formed file this reader cannot read right: refused, naming ``what``."""
        written = f"DCP metadata version {self.version}" if self.version else "no DCP version"
        if self.saw_strides:
            written += ", TensorProperties with strides: torch >= 2.15"
        return UnsupportedCheckpointError(
            f"{self.source}: {what}: {problem}, written by a newer torch than this reader knows "
            f"({written}); refused rather than read wrongly. This reader supports {SUPPORTED}. "
            "Upgrade sglang-megatron-loader, or re-save the checkpoint with the serving "
            "environment's torch."
        )

    def fields(self, obj: Pickled, where: str) -> dict[str, Any]:
        """``obj``'s fields, refusing unknown set fields of a class that describes bytes."""
        fields, cls = obj.fields, type(obj)  # settings from the class: no field shadows them
        if cls.strict and not cls.known.issuperset(fields):
            for name, value in fields.items():
                if name not in cls.known and not _unset(value):
                    dot = "" if str(name).startswith("[") else "."  # a positional value: [6]
                    raise self.newer(f"{where}{type(obj).__name__}{dot}{name} = {_short(value)}")
        return fields

    def need(self, obj: Pickled, name: str, where: str) -> Any:
        fields = self.fields(obj, where)
        if name not in fields:
            raise self.corrupt(
                f"{where}{type(obj).__name__} has no '{name}'; the file is damaged or not "
                "written by torch.distributed.checkpoint"
            )
        return fields[name]

    # -- storage index -----------------------------------------------------------------------
    def storage_index(self, data: Any) -> dict[tuple[str, tuple[int, ...]], ByteRange]:
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise self.corrupt(f"storage_data is a {type(data).__name__}, expected a dict")
        out: dict[tuple[str, tuple[int, ...]], ByteRange] = {}
        for idx, info in data.items():
            if not isinstance(idx, IndexRecord) or not isinstance(info, StorageInfoRecord):
                raise self.corrupt(
                    f"storage entry {type(idx).__name__} -> {type(info).__name__}; expected "
                    "MetadataIndex -> _StorageInfo"
                )
            fqn = self.need(idx, "fqn", "storage index: ")
            if not isinstance(fqn, str):
                raise self.corrupt(f"storage entry for {_short(fqn)}: the key is not a string")
            raw = self.fields(idx, f"'{fqn}': ").get("offset")
            offset = () if raw is None else _dims(raw)
            if offset is None:
                raise self.corrupt(f"storage entry of '{fqn}' has offset {_short(raw)}")
            out[(fqn, offset)] = self.byte_range(fqn, info)
        return out

    def byte_range(self, fqn: str, info: StorageInfoRecord) -> ByteRange:
        where = f"'{fqn}': "
        transforms = self.fields(info, where).get("transform_descriptors")
        if not _unset(transforms):
            raise UnsupportedCheckpointError(
                f"{self.source}: '{fqn}' is stored with transforms {_short(transforms)} "
                "(_StorageInfo.transform_descriptors: compression or encryption by a DCP "
                "storage extension); this reader reads only untransformed storage"
            )
        rel = self.need(info, "relative_path", where)
        offset, length = self.need(info, "offset", where), self.need(info, "length", where)
        if not isinstance(rel, str) or not rel or _escapes(rel):
            raise self.corrupt(
                f"'{fqn}' is stored in {_short(rel)}; expected a data file inside the checkpoint "
                "folder (the metadata is damaged or hostile)"
            )
        if _dims((offset, length)) is None:
            raise self.corrupt(
                f"'{fqn}' has byte offset {_short(offset)} and length {_short(length)}; expected "
                "non-negative integers"
            )
        return ByteRange(rel, int(offset), int(length))

    # -- entries -----------------------------------------------------------------------------
    def entries(self, data: Any) -> tuple[dict[str, TensorMeta], list[str]]:
        if not isinstance(data, dict):
            raise self.corrupt(f"state_dict_metadata is a {type(data).__name__}, expected a dict")
        tensors: dict[str, TensorMeta] = {}
        items: list[str] = []
        for key, md in data.items():
            if not isinstance(key, str):
                raise self.corrupt(f"key {_short(key)} is not a string")
            if isinstance(md, BytesStorageRecord):
                self.fields(md, f"'{key}': ")
                items.append(key)
            elif isinstance(md, TensorStorageRecord):
                tensors[key] = self.tensor(key, md)
            else:
                raise self.corrupt(f"'{key}' has unknown metadata {type(md).__name__}")
        return tensors, items

    def tensor(self, key: str, md: TensorStorageRecord) -> TensorMeta:
        where = f"'{key}': "
        props, raw_size = self.need(md, "properties", where), self.need(md, "size", where)
        if not isinstance(props, PropertiesRecord):
            raise self.corrupt(f"'{key}' has properties {type(props).__name__}")
        pf = self.fields(props, where)
        dtype, shape = pf.get("dtype"), _dims(raw_size)
        if not isinstance(dtype, torch.dtype) or shape is None:
            raise self.corrupt(
                f"'{key}' has dtype {_short(dtype)} and size {_short(raw_size)}; expected a "
                "torch dtype and non-negative integer sizes"
            )
        self.layout(key, pf)
        raw_chunks = self.need(md, "chunks", where)
        if not isinstance(raw_chunks, list | tuple):
            raise self.corrupt(f"'{key}' has chunks {type(raw_chunks).__name__}, expected a list")
        chunks = tuple(self.chunk(key, c, shape) for c in raw_chunks)
        strides = self.strides(key, "TensorProperties", pf.get("strides"), shape, chunks)
        return TensorMeta(key, dtype, shape, chunks, strides)

    def layout(self, key: str, pf: dict[str, Any]) -> None:
        """Dense, row-major storage only: strided layout, a memory format torch knows."""
        layout = pf.get("layout", torch.strided)
        if layout != torch.strided:
            raise UnsupportedCheckpointError(
                f"{self.source}: '{key}' has layout {_short(layout)}; only dense (torch.strided) "
                "tensors are read"
            )
        fmt = pf.get("memory_format")
        value = fmt.fields.get("value") if isinstance(fmt, EnumRecord) else None
        if isinstance(fmt, EnumRecord) and value not in (0, 1, 2):
            raise self.newer(
                f"'{key}': TensorProperties.memory_format = {_short(value)}", "an unknown encoding"
            )
        if not (fmt is None or isinstance(fmt, EnumRecord | torch.memory_format)):
            raise self.corrupt(f"'{key}' has memory_format {_short(fmt)}")

    def chunk(self, key: str, c: Any, shape: tuple[int, ...]) -> ChunkMeta:
        if not isinstance(c, ChunkRecord):
            raise self.corrupt(f"chunk of '{key}' is a {type(c).__name__}")
        where = f"'{key}': "
        raw_offsets, raw_sizes = self.need(c, "offsets", where), self.need(c, "sizes", where)
        offsets, sizes = _dims(raw_offsets), _dims(raw_sizes)
        if offsets is None or sizes is None or not len(offsets) == len(sizes) == len(shape):
            raise self.corrupt(
                f"chunk of '{key}' has offsets {_short(raw_offsets)} and sizes "
                f"{_short(raw_sizes)}; expected {len(shape)} non-negative integers each"
            )
        if any(o + n > d for o, n, d in zip(offsets, sizes, shape)):
            raise self.corrupt(
                f"chunk of '{key}' at offsets {offsets} with sizes {sizes} extends beyond the "
                f"tensor's shape {shape}"
            )
        chunk = ChunkMeta(offsets, sizes)
        if "strides" in c.fields:
            self.strides(key, "ChunkStorageMetadata", c.fields["strides"], shape, (chunk,))
        return chunk

    def strides(
        self,
        key: str,
        owner: str,
        value: Any,
        shape: tuple[int, ...],
        chunks: tuple[ChunkMeta, ...],
    ) -> tuple[int, ...] | None:
        """``strides`` (torch >= 2.15: the saved tensor's, global or per chunk): None or
        row-major for the tensor or one of its chunks, which is how the chunks are stored."""
        if value is None:
            return None
        strides = _dims(value)
        sizes = [shape, *(c.sizes for c in chunks)]
        if strides is None or not any(_is_contiguous(s, strides) for s in sizes):
            raise self.newer(
                f"'{key}': {owner}.strides = {_short(value)}",
                f"not the contiguous strides of its size {shape} or of a chunk (a transposed or "
                "channels-last tensor; only contiguous chunks are read)",
            )
        return strides


@functools.lru_cache(maxsize=4096)
def _escapes(rel: str) -> bool:
    """A storage path that is absolute or leaves the checkpoint folder (asked once per entry,
    of a few distinct files)."""
    return Path(rel).is_absolute() or ".." in Path(rel).parts
