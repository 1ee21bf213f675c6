"""``integrity.json`` (megatron-core 0.18+, saved with ``--verify-integrity``): SHA-256 of every
file of the iteration folder, checked the way megatron-core's ``verify_integrity_manifest`` does.

Hashing reads whole files (optimizer state included), so it costs a full read of the checkpoint;
``--model-loader-extra-config '{"verify_integrity": "off"}'`` skips it. It is paid once per file
per machine, not once per rank: the first process to reach a file hashes it and leaves the
digest in a per-user verdict folder, keyed by the file's identity (real path, device, inode,
size, modification and change times); the other processes wait on that file's lock, then read
the digest (a failing digest too). Files are hashed on several threads, in 16 MiB blocks. A
file changed within the last second is hashed by every process and its digest not kept: a
write in the same clock tick could leave its times unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sglang_megatron_loader.errors import CorruptCheckpointError, IncompleteCheckpointError

logger = logging.getLogger("sglang_megatron_loader")

MANIFEST = "integrity.json"
MODES = ("auto", "require", "off")  # auto: verify when the manifest exists
HASH_THREADS = 4
BLOCK = 16 * 2**20
SETTLED_NS = 10**9  # a file's times must be this much older than its hash for the verdict to keep
VERDICT_ENV = "SGLANG_MEGATRON_LOADER_VERDICTS"  # the verdict folder (default: per-user in /tmp)
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def verify_integrity(iter_dir: Path, mode: str = "auto") -> int:
    """Check every file listed in the manifest; returns the number of files verified."""
    if mode not in MODES:
        raise CorruptCheckpointError(f"verify_integrity={mode!r}: expected one of {MODES}")
    path = iter_dir / MANIFEST
    if mode == "off" or (mode == "auto" and not path.is_file()):
        return 0
    if not path.is_file():
        raise IncompleteCheckpointError(
            f"{path}: missing, and verify_integrity is 'require'; save with --verify-integrity "
            "(megatron-core >= 0.18) or drop the requirement"
        )
    try:
        manifest = json.loads(path.read_text())
        algorithm, files = manifest.get("algorithm", "sha256"), dict(manifest["files"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{path}: not a valid integrity manifest ({exc})") from exc
    if algorithm != "sha256":
        raise CorruptCheckpointError(f"{path}: hash algorithm {algorithm!r}, expected 'sha256'")
    start = time.perf_counter()
    present = {name: iter_dir / name for name in files}
    present = {n: p for n, p in present.items() if p.is_file() and p.parent == iter_dir}
    got, hashed = file_digests(list(present.values()))
    bad = []
    for name, expected in sorted(files.items()):
        if name not in present:
            bad.append(f"{name}: missing")
        elif got[present[name]] != expected:
            digest = got[present[name]]
            bad.append(f"{name}: sha256 {digest[:16]}..., manifest says {str(expected)[:16]}...")
    if bad:
        raise CorruptCheckpointError(
            f"{path}: {len(bad)} of {len(files)} file(s) fail the integrity check:\n  "
            + "\n  ".join(bad)
        )
    logger.info(
        "Checkpoint integrity verified: %d file(s) in %s in %.2f s (%d hashed here, %.3f GB; "
        "the others by an earlier or concurrent process)",
        len(files),
        iter_dir,
        time.perf_counter() - start,
        len(hashed),
        sum(p.stat().st_size for p in hashed) / 1e9,
    )
    return len(files)


def file_digests(paths: list[Path]) -> tuple[dict[Path, str], list[Path]]:
    """SHA-256 of each file, and the files this process hashed itself. Files locked by another
    process are left for last, so concurrent processes share the work instead of queueing."""
    if not paths:
        return {}, []
    folder = verdict_dir()
    hashed: list[Path] = []
    with ThreadPoolExecutor(min(HASH_THREADS, len(paths)), "megatron-sha256") as pool:
        first = dict(zip(paths, pool.map(lambda p: _digest(p, folder, False, hashed), paths)))
        busy = [p for p, d in first.items() if d is None]
        first.update(zip(busy, pool.map(lambda p: _digest(p, folder, True, hashed), busy)))
    return {p: d for p, d in first.items() if d is not None}, hashed


def verdict_dir() -> Path | None:
    """The per-user verdict folder, or None (hash every time) where it cannot be trusted: not
    ours, a symlink, or open to other users."""
    folder = Path(
        os.environ.get(VERDICT_ENV)
        or Path(tempfile.gettempdir()) / f"sglang-megatron-loader-{os.getuid()}" / "integrity"
    )
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(folder)
    except OSError:
        return None
    if not os.path.isdir(folder) or os.path.islink(folder) or st.st_uid != os.getuid():
        return None
    if st.st_mode & 0o022:  # others could plant verdicts
        return None
    return folder


def _identity(path: Path) -> tuple[tuple[object, ...], int]:
    st = os.stat(path)
    ident = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return (*ident, st.st_ctime_ns), max(st.st_mtime_ns, st.st_ctime_ns)


def _read_verdict(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text if _DIGEST.match(text) else None


def _digest(path: Path, folder: Path | None, wait: bool, hashed: list[Path]) -> str | None:
    """The file's digest: a kept verdict, else hashed here under the file's lock. None when
    ``wait`` is False and another process holds the lock."""
    if folder is None:
        hashed.append(path)
        return _sha256(path)
    ident, changed = _identity(path)
    key = hashlib.sha256(repr(ident).encode()).hexdigest()
    verdict = folder / f"{key}.sha256"
    if (digest := _read_verdict(verdict)) is not None:
        return digest
    fd = os.open(folder / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return None
        if (digest := _read_verdict(verdict)) is not None:  # decided while we waited
            return digest
        started = time.time_ns()
        digest = _sha256(path)
        hashed.append(path)
        if changed <= started - SETTLED_NS and _identity(path)[0] == ident:
            tmp = folder / f"{key}.{os.getpid()}.tmp"
            tmp.write_text(digest)
            os.replace(tmp, verdict)
        return digest
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # releases the lock


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # releases the GIL
    return h.hexdigest()
