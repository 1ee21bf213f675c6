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
import zlib
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


# -- the common case, fast ------------------------------------------------------------------
#
# A DCP chunk is one ``torch.save`` of one contiguous tensor, and a load locates hundreds of
# them. ``zipfile`` plus a fresh unpickle costs ~1 ms each (and holds the GIL the reading threads
# need), so :func:`locate_tensor` parses the archive's directory itself in three small ``pread``
# calls and unpickles each distinct ``data.pkl`` once per process (chunks of one shape and dtype
# pickle to the same bytes). Anything it does not expect (a comment, 32-bit size escapes, a
# compressed entry, damage) sends the chunk down the full :class:`TorchZip` path, whose errors
# name what is wrong.

_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_CENTRAL_MAGIC = 0x02014B50
_EOCD = struct.Struct("<IHHHHIIH")
_EOCD_MAGIC = 0x06054B50
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_ZIP64_LOCATOR_MAGIC = 0x07064B50
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
_ZIP64_EOCD_MAGIC = 0x06064B50
_HEAD = 4096  # at most this much of an archive's head (its pickle) is read in one call
_TRAILER = _EOCD.size + _ZIP64_LOCATOR.size + _ZIP64_EOCD.size  # the end records
_SKIMMED: dict[bytes, LazyTensor] = {}
_SKIMMED_MAX = 4096


def locate_tensor(f: BinaryIO, start: int, length: int, *, source: str) -> TensorRef:
    """:meth:`TorchZip.locate` of an archive holding one tensor (a DCP chunk), without
    ``zipfile`` in the common case; a non-tensor payload is a :class:`CorruptCheckpointError`."""
    ref = _fast_locate(f.fileno(), start, length, source)
    if ref is not None:
        return ref
    ref = TorchZip(f, start, length, source=source).locate()
    if not isinstance(ref, TensorRef):
        raise CorruptCheckpointError(f"{source}: chunk is not a tensor ({type(ref).__name__})")
    return ref


def _fast_locate(fd: int, start: int, length: int, source: str) -> TensorRef | None:
    """None wherever the archive is not exactly the plain form ``torch.save`` writes."""
    if length < _EOCD.size:
        return None
    # exact reads only, never a tensor byte (a rank reads each tensor byte once, as data): the
    # end records, the central directory, then the archive's head up to its first storage
    tail_len = min(length, _TRAILER)
    tail = os.pread(fd, tail_len, start + length - tail_len)
    if len(tail) != tail_len:
        return None
    entries = _central_directory(fd, start, length, tail)
    if entries is None or "data.pkl" not in entries:
        return None
    first_storage = min((e[0] for n, e in entries.items() if n.startswith("data/")), default=length)
    head_len = min(length, _HEAD, first_storage)
    head = os.pread(fd, head_len, start)
    if len(head) != head_len:
        return None

    def data(name: str, want_bytes: bool) -> tuple[int, bytes] | None:
        """(offset in the archive, the bytes if asked) of a stored entry."""
        at = entries.get(name)
        if at is None:
            return None
        hdr, size, full, crc = at
        raw = head[hdr : hdr + _LOCAL_HEADER.size + len(full)]
        if len(raw) < _LOCAL_HEADER.size + len(full):
            raw = os.pread(fd, _LOCAL_HEADER.size + len(full), start + hdr)
        if len(raw) < _LOCAL_HEADER.size:
            return None
        fields = _LOCAL_HEADER.unpack_from(raw)
        if fields[0] != _LOCAL_MAGIC or fields[3] != zipfile.ZIP_STORED:
            return None
        name_len, extra_len = fields[9], fields[10]
        if raw[_LOCAL_HEADER.size : _LOCAL_HEADER.size + name_len] != full:
            return None
        offset = hdr + _LOCAL_HEADER.size + name_len + extra_len
        if offset + size > length:
            return None
        if not want_bytes:
            return offset, b""
        payload = head[offset : offset + size]
        if len(payload) != size:
            payload = os.pread(fd, size, start + offset)
        ok = len(payload) == size and zlib.crc32(payload) == crc
        return (offset, payload) if ok else None

    byteorder = data("byteorder", True)
    if byteorder is not None and byteorder[1].strip() not in (b"little", b""):
        return None
    pkl = data("data.pkl", True)
    if pkl is None:
        return None
    lazy = _SKIMMED.get(pkl[1])
    if lazy is None:
        try:
            lazy = _skim_pickle(pkl[1], source)
        except MegatronLoaderError:
            return None
        if lazy is None:
            return None
        if len(_SKIMMED) < _SKIMMED_MAX:
            _SKIMMED[pkl[1]] = lazy
    storage = data(f"data/{lazy.storage_key}", False)
    if storage is None:
        return None
    nbytes = entries[f"data/{lazy.storage_key}"][1]
    if nbytes != lazy.numel * lazy.dtype.itemsize:
        return None
    ref = StorageRef(start + storage[0], nbytes, lazy.dtype, lazy.numel)
    return TensorRef(ref, lazy.storage_offset, lazy.size, lazy.stride)


def _central_directory(
    fd: int, start: int, length: int, tail: bytes
) -> dict[str, tuple[int, int, bytes, int]] | None:
    """``{name after the archive prefix: (local header offset, size, full name, CRC-32)}`` of a zip
    whose directory is plain: no comment, no 32-bit escapes, stored entries only."""
    eocd = _EOCD.unpack_from(tail, len(tail) - _EOCD.size)
    if eocd[0] != _EOCD_MAGIC or eocd[7] != 0 or eocd[1] or eocd[2]:
        return None
    count, cd_size, cd_offset = eocd[4], eocd[5], eocd[6]
    loc_at = len(tail) - _EOCD.size - _ZIP64_LOCATOR.size
    if loc_at >= 0 and _ZIP64_LOCATOR.unpack_from(tail, loc_at)[0] == _ZIP64_LOCATOR_MAGIC:
        z64_at = loc_at - _ZIP64_EOCD.size
        if z64_at < 0:
            return None
        z64 = _ZIP64_EOCD.unpack_from(tail, z64_at)
        located = _ZIP64_LOCATOR.unpack_from(tail, loc_at)[2] == length - len(tail) + z64_at
        if z64[0] != _ZIP64_EOCD_MAGIC or z64[6] != z64[7] or not located:
            return None
        count, cd_size, cd_offset = z64[7], z64[8], z64[9]
    if not 0 < count <= 64 or cd_size > 64 * 1024 or cd_offset + cd_size > length:
        return None
    tail_start = length - len(tail)
    if cd_offset >= tail_start:
        cd = tail[cd_offset - tail_start : cd_offset - tail_start + cd_size]
    else:
        cd = os.pread(fd, cd_size, start + cd_offset)
    if len(cd) != cd_size:
        return None
    out: dict[str, tuple[int, int, bytes, int]] = {}
    at = 0
    for _ in range(count):
        if at + _CENTRAL.size > len(cd):
            return None
        e = _CENTRAL.unpack_from(cd, at)
        if e[0] != _CENTRAL_MAGIC or e[4] != zipfile.ZIP_STORED:
            return None
        csize, usize, name_len, extra_len, comment_len, hdr = e[8], e[9], e[10], e[11], e[12], e[16]
        if csize != usize or 0xFFFFFFFF in (csize, hdr):
            return None
        name = cd[at + _CENTRAL.size : at + _CENTRAL.size + name_len]
        at += _CENTRAL.size + name_len + extra_len + comment_len
        if len(name) != name_len or hdr + _LOCAL_HEADER.size > length:
            return None
        out[name.decode("utf-8", "replace").split("/", 1)[-1]] = (hdr, usize, name, e[7])
    return out if at == len(cd) else None


def _skim_pickle(data: bytes, source: str) -> LazyTensor | None:
    """The one tensor ``data.pkl`` describes (storages named, not located), through the same
    allow-list and view checks as :meth:`TorchZip.skim`; None if it is not one tensor."""
    checker = TorchZip.__new__(TorchZip)
    checker.source = source

    def rebuild(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> LazyTensor:
        if not (isinstance(storage, tuple) and len(storage) == 3):
            raise CorruptCheckpointError(f"{source}: malformed tensor record")
        storage_type, key, numel = storage
        checker._check_view(numel, offset, size, stride, key)
        return LazyTensor(key, storage_type.dtype, numel, offset, tuple(size), tuple(stride))

    extra = {
        ("torch._utils", "_rebuild_tensor_v2"): rebuild,
        ("torch._utils", "_rebuild_tensor"): rebuild,
    }
    try:
        obj = SafeUnpickler(
            io.BytesIO(data), source=source, extra=extra, persistent_load=checker._storage_pid
        ).load()
    except MegatronLoaderError:
        raise
    except Exception:  # the full path reports it
        return None
    return obj if isinstance(obj, LazyTensor) else None


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
