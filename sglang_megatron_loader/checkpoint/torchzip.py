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
from sglang_megatron_loader.errors import CorruptCheckpointError

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
        expected, step = [], 1
        for dim in reversed(self.size):
            expected.append(step)
            step *= dim
        return all(s == e or d == 1 for s, e, d in zip(self.stride, reversed(expected), self.size))


class TorchZip:
    """The entries of one ``torch.save`` archive inside ``path`` at ``[start, start+length)``."""

    def __init__(self, f: BinaryIO, start: int, length: int, *, source: str) -> None:
        self._f, self._start, self.source = f, start, source
        try:
            zf = zipfile.ZipFile(FileWindow(f, start, length))
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"{source}: expected a torch.save zip archive of {length} bytes at offset {start}, "
                f"found none ({exc}); the file is truncated or overwritten"
            ) from exc
        self._infos = {i.filename.split("/", 1)[-1]: i for i in zf.infolist()}
        self._zf = zf
        if "data.pkl" not in self._infos:
            raise CorruptCheckpointError(f"{source}: torch.save archive without data.pkl")
        byteorder = self._infos.get("byteorder")
        if byteorder is not None and zf.read(byteorder).strip() not in (b"little", b""):
            raise CorruptCheckpointError(f"{source}: big-endian torch archives are not supported")

    def _data_offset(self, name: str) -> tuple[int, int]:
        info = self._infos.get(name)
        if info is None:
            raise CorruptCheckpointError(f"{self.source}: torch archive has no entry '{name}'")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptCheckpointError(f"{self.source}: entry '{name}' is compressed")
        header = os.pread(self._f.fileno(), _LOCAL_HEADER.size, self._start + info.header_offset)
        if len(header) != _LOCAL_HEADER.size:
            raise CorruptCheckpointError(f"{self.source}: truncated zip header of '{name}'")
        fields = _LOCAL_HEADER.unpack(header)
        if fields[0] != _LOCAL_MAGIC:
            raise CorruptCheckpointError(f"{self.source}: damaged zip header of '{name}'")
        offset = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
        return self._start + offset, info.file_size

    def _unpickle(self, rebuild: Any, persistent: Any) -> Any:
        data = self._zf.read(self._infos["data.pkl"])
        extra = {
            ("torch._utils", "_rebuild_tensor_v2"): rebuild,
            ("torch._utils", "_rebuild_tensor"): rebuild,
        }
        stream = io.BytesIO(data)
        return SafeUnpickler(
            stream, source=self.source, extra=extra, persistent_load=persistent
        ).load()

    def _storage_ref(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CorruptCheckpointError(f"{self.source}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise CorruptCheckpointError(f"{self.source}: unknown storage type {storage_type!r}")
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

        def rebuild(storage: StorageRef, offset: int, size: Any, stride: Any, *_: Any) -> TensorRef:
            return TensorRef(storage, int(offset), tuple(size), tuple(stride))

        return self._unpickle(rebuild, self._storage_ref)

    def load(self) -> Any:
        """Unpickle and materialise every tensor (small archives only)."""

        def rebuild(
            storage: StorageRef, offset: int, size: Any, stride: Any, *_: Any
        ) -> torch.Tensor:
            return materialise(self._f, TensorRef(storage, int(offset), tuple(size), tuple(stride)))

        return self._unpickle(rebuild, self._storage_ref)


def materialise(f: BinaryIO, ref: TensorRef) -> torch.Tensor:
    """Read one located tensor into fresh memory."""
    buf = torch.empty(ref.storage.numel, dtype=ref.storage.dtype)
    read_exact_into(f, ref.storage.file_offset, buf, source=getattr(f, "name", "?"))
    return buf.as_strided(ref.size, ref.stride, ref.storage_offset).clone()


def read_exact_into(f: BinaryIO, offset: int, out: torch.Tensor, *, source: str) -> int:
    """Fill contiguous ``out`` with the bytes of ``f`` at ``offset``; error if the file is short."""
    view = memoryview(out.view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
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
