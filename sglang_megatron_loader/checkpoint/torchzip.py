"""Parse ``torch.save`` zip archives (whole files or byte windows of a ``.distcp``) safely.

``torch.save`` writes an uncompressed zip: ``<prefix>/data.pkl`` (the pickled object, whose
storages are persistent ids) and ``<prefix>/data/<key>`` (raw storage bytes). We parse the zip
ourselves, unpickle ``data.pkl`` through the allow-list, and either materialise the storages
(small objects: ``common.pt``) or only *locate* them, so tensor bytes can be read straight into
their destination without an intermediate copy.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from sglang_megatron_loader.checkpoint.safe_pickle import SafeUnpickler, StorageType
from sglang_megatron_loader.errors import CorruptCheckpointError, MegatronLoaderError

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_MAGIC = 0x04034B50


class FileWindow(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes of ``f`` starting at ``start``."""

    def __init__(self, f: BinaryIO, start: int, length: int) -> None:
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        n = self._len - self._pos if n is None or n < 0 else min(n, self._len - self._pos)
        if n <= 0:
            return b""
        data = os.pread(self._f.fileno(), n, self._start + self._pos)
        self._pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


@dataclass(frozen=True)
class StorageRef:
    """Where one storage's raw bytes lie in the file, and their dtype and element count."""

    file_offset: int
    nbytes: int
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor rebuilt lazily: its storage location plus view geometry."""

    storage: StorageRef
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def is_contiguous(self) -> bool:
        return _is_contiguous(self.size, self.stride)


@dataclass(frozen=True)
class LazyTensor:
    """A tensor record from :meth:`TorchZip.skim`: its storage is named, not yet located, so
    not one byte of the storage's zip entry (header or data) has been read."""

    storage_key: str
    dtype: torch.dtype
    numel: int  # elements of the whole storage
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def is_contiguous(self) -> bool:
        return _is_contiguous(self.size, self.stride)


def _is_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected, step = [], 1
    for dim in reversed(size):
        expected.append(step)
        step *= dim
    return all(s == e or d == 1 for s, e, d in zip(stride, reversed(expected), size))


class TorchZip:
    """The entries of one ``torch.save`` archive inside ``path`` at ``[start, start+length)``."""

    def __init__(self, f: BinaryIO, start: int, length: int, *, source: str) -> None:
        self._f, self._start, self._len, self.source = f, start, length, source
        try:
            zf = zipfile.ZipFile(FileWindow(f, start, length))
        except Exception as exc:  # any parse failure of untrusted bytes
            raise CorruptCheckpointError(
                f"{source}: expected a torch.save zip archive of {length} bytes at offset {start}, "
                f"found none ({type(exc).__name__}: {exc}); the file is truncated or overwritten"
            ) from exc
        self._infos = {i.filename.split("/", 1)[-1]: i for i in zf.infolist()}
        self._zf = zf
        if "data.pkl" not in self._infos:
            raise CorruptCheckpointError(f"{source}: torch.save archive without data.pkl")
        if self._read("byteorder", b"little").strip() not in (b"little", b""):
            raise CorruptCheckpointError(f"{source}: big-endian torch archives are not supported")

    def _read(self, name: str, default: bytes | None = None) -> bytes:
        """The bytes of a (small) entry; CRC and header damage become our error."""
        info = self._infos.get(name)
        if info is None:
            if default is not None:
                return default
            raise CorruptCheckpointError(f"{self.source}: torch archive has no entry '{name}'")
        self._data_offset(name)  # bounds and local header checked before zipfile reads
        try:
            return self._zf.read(info)
        except Exception as exc:  # any parse failure of untrusted bytes
            raise CorruptCheckpointError(
                f"{self.source}: entry '{name}' of the torch.save archive is damaged "
                f"({type(exc).__name__}: {exc}); the file is overwritten or truncated"
            ) from exc

    def _data_offset(self, name: str) -> tuple[int, int]:
        info = self._infos.get(name)
        if info is None:
            raise CorruptCheckpointError(f"{self.source}: torch archive has no entry '{name}'")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptCheckpointError(f"{self.source}: entry '{name}' is compressed")
        if not 0 <= info.header_offset < self._len:
            raise CorruptCheckpointError(
                f"{self.source}: zip directory places '{name}' at byte {info.header_offset} of an "
                f"archive of {self._len} bytes; the file is damaged"
            )
        header = os.pread(self._f.fileno(), _LOCAL_HEADER.size, self._start + info.header_offset)
        if len(header) != _LOCAL_HEADER.size:
            raise CorruptCheckpointError(f"{self.source}: truncated zip header of '{name}'")
        fields = _LOCAL_HEADER.unpack(header)
        if fields[0] != _LOCAL_MAGIC:
            raise CorruptCheckpointError(
                f"{self.source}: damaged zip header of '{name}' (expected the local header "
                f"signature {_LOCAL_MAGIC:#010x}, found {fields[0]:#010x})"
            )
        offset = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
        if offset + info.file_size > self._len:
            raise CorruptCheckpointError(
                f"{self.source}: entry '{name}' claims bytes {offset}..{offset + info.file_size} "
                f"of an archive of {self._len} bytes; the file is damaged"
            )
        return self._start + offset, info.file_size

    def _unpickle(
        self, rebuild: Any, persistent: Any, extra: dict[tuple[str, str], Any] | None = None
    ) -> Any:
        data = self._read("data.pkl")
        extra = {
            **(extra or {}),
            ("torch._utils", "_rebuild_tensor_v2"): rebuild,
            ("torch._utils", "_rebuild_tensor"): rebuild,
        }
        stream = io.BytesIO(data)
        try:
            return SafeUnpickler(
                stream, source=self.source, extra=extra, persistent_load=persistent
            ).load()
        except MegatronLoaderError:
            raise
        except Exception as exc:  # any parse failure of untrusted bytes
            raise CorruptCheckpointError(
                f"{self.source}: cannot unpickle data.pkl of the torch.save archive "
                f"({type(exc).__name__}: {_short(exc)}); the file is damaged or not torch.save's"
            ) from exc

    def _storage_pid(self, pid: Any) -> tuple[StorageType, str, int]:
        """Check one ``torch.save`` persistent id; returns (storage type, key, element count)."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CorruptCheckpointError(f"{self.source}: unexpected persistent id {_short(pid)}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise CorruptCheckpointError(
                f"{self.source}: unknown storage type {_short(storage_type)}"
            )
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise CorruptCheckpointError(
                f"{self.source}: storage reference {_short(pid)}: expected a string key and a "
                "non-negative element count"
            )
        return storage_type, key, numel

    def _storage_ref(self, pid: Any) -> StorageRef:
        storage_type, key, numel = self._storage_pid(pid)
        offset, nbytes = self._data_offset(f"data/{key}")
        itemsize = storage_type.dtype.itemsize
        if nbytes != numel * itemsize:
            raise CorruptCheckpointError(
                f"{self.source}: storage data/{key} holds {nbytes} bytes, expected "
                f"{numel} x {itemsize} ({storage_type.dtype})"
            )
        return StorageRef(offset, nbytes, storage_type.dtype, numel)

    def locate(self) -> Any:
        """Unpickle with tensors replaced by :class:`TensorRef` (no tensor bytes read)."""

        def rebuild(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> TensorRef:
            return self._tensor_ref(storage, offset, size, stride)

        return self._unpickle(rebuild, self._storage_ref)

    def skim(self, extra: dict[tuple[str, str], Any] | None = None) -> Any:
        """Unpickle with tensors replaced by :class:`LazyTensor`: only the zip directory and
        ``data.pkl`` are read, no storage entry at all (for files that also hold optimizer and
        RNG state, whose bytes must stay unread). :meth:`resolve` locates a chosen one.
        ``extra`` adds inert allow-list entries for this archive only."""

        def rebuild(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> LazyTensor:
            if not (isinstance(storage, tuple) and len(storage) == 3):
                raise CorruptCheckpointError(
                    f"{self.source}: malformed tensor record (storage {_short(storage)})"
                )
            storage_type, key, numel = storage
            self._check_view(numel, offset, size, stride, key)
            return LazyTensor(key, storage_type.dtype, numel, offset, tuple(size), tuple(stride))

        return self._unpickle(rebuild, self._storage_pid, extra)

    def resolve(self, lazy: LazyTensor) -> TensorRef:
        """Locate the storage of a skimmed tensor (reads its 30-byte zip header, no data)."""
        offset, nbytes = self._data_offset(f"data/{lazy.storage_key}")
        if nbytes != lazy.numel * lazy.dtype.itemsize:
            raise CorruptCheckpointError(
                f"{self.source}: storage data/{lazy.storage_key} holds {nbytes} bytes, expected "
                f"{lazy.numel} x {lazy.dtype.itemsize} ({lazy.dtype})"
            )
        storage = StorageRef(offset, nbytes, lazy.dtype, lazy.numel)
        return TensorRef(storage, lazy.storage_offset, lazy.size, lazy.stride)

    def load(self) -> Any:
        """Unpickle and materialise every tensor (small archives only)."""

        def rebuild(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> torch.Tensor:
            return materialise(self._f, self._tensor_ref(storage, offset, size, stride))

        return self._unpickle(rebuild, self._storage_ref)

    def _tensor_ref(self, storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
        """A tensor rebuild call checked against its storage: the view stays inside it."""
        numel = storage.numel if isinstance(storage, StorageRef) else None
        self._check_view(numel, offset, size, stride, storage)
        return TensorRef(storage, offset, tuple(size), tuple(stride))

    def _check_view(
        self, numel: int | None, offset: Any, size: Any, stride: Any, storage: Any
    ) -> None:
        """The view (offset, size, stride) is well formed and stays inside ``numel`` elements
        (None: the storage record itself is malformed)."""
        ok = (
            numel is not None
            and isinstance(offset, int)
            and isinstance(size, tuple | torch.Size)
            and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(isinstance(n, int) and n >= 0 for n in (offset, *size, *stride))
        )
        if not ok:
            raise CorruptCheckpointError(
                f"{self.source}: malformed tensor record (storage {_short(storage)}, offset "
                f"{_short(offset)}, size {_short(size)}, stride {_short(stride)})"
            )
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if 0 not in tuple(size) and last >= numel:  # type: ignore[operator]
            raise CorruptCheckpointError(
                f"{self.source}: tensor of shape {tuple(size)} (stride {tuple(stride)}, offset "
                f"{offset}) reaches element {last} of a storage of {numel} elements"
            )


def _short(value: Any, limit: int = 120) -> str:
    """``repr`` for messages about untrusted values: bounded in length and never recursing."""
    try:
        text = repr(value)
    except Exception:  # a hostile object's repr is not ours to trust
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def materialise(f: BinaryIO, ref: TensorRef) -> torch.Tensor:
    """Read one located tensor into fresh memory."""
    buf = torch.empty(ref.storage.numel, dtype=ref.storage.dtype)
    read_exact_into(f, ref.storage.file_offset, buf, source=getattr(f, "name", "?"))
    return buf.as_strided(ref.size, ref.stride, ref.storage_offset).clone()


def read_exact_into(f: BinaryIO, offset: int, out: torch.Tensor, *, source: str) -> int:
    """Fill contiguous ``out`` with the bytes of ``f`` at ``offset``; error if the file is short."""
    flat = out.reshape(-1).view(torch.uint8)  # bytes: an n-d memoryview counts rows
    view = memoryview(flat.numpy()) if out.numel() else memoryview(b"")
    done = 0
    while done < len(view):
        n = os.preadv(f.fileno(), [view[done:]], offset + done)
        if n <= 0:
            raise CorruptCheckpointError(
                f"{source}: file ends at byte {offset + done}, expected {len(view)} bytes of "
                f"tensor data from offset {offset}; the file is truncated"
            )
        done += n
    return done


def load_torch_file(path: str | os.PathLike[str]) -> Any:
    """Safely load a whole small ``torch.save`` file such as ``common.pt``."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return TorchZip(f, 0, size, source=str(path)).load()


def load_torch_bytes(data: bytes, *, source: str) -> Any:
    """Safely load a ``torch.save`` payload held in memory (a DCP bytes item)."""
    import tempfile

    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        return TorchZip(f, 0, len(data), source=source).load()  # type: ignore[arg-type]
