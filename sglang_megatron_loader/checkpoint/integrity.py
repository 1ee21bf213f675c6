"""``integrity.json`` (megatron-core 0.18+, saved with ``--verify-integrity``): SHA-256 of every
file of the iteration folder, checked the way megatron-core's ``verify_integrity_manifest`` does.

Hashing reads whole files (optimizer state included), so it costs a full read of the checkpoint;
``--model-loader-extra-config '{"verify_integrity": "off"}'`` skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from sglang_megatron_loader.errors import CorruptCheckpointError, IncompleteCheckpointError

logger = logging.getLogger("sglang_megatron_loader")

MANIFEST = "integrity.json"
MODES = ("auto", "require", "off")  # auto: verify when the manifest exists


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
    bad = []
    for name, expected in sorted(files.items()):
        target = iter_dir / name
        if not target.is_file() or target.parent != iter_dir:
            bad.append(f"{name}: missing")
            continue
        got = _sha256(target)
        if got != expected:
            bad.append(f"{name}: sha256 {got[:16]}..., manifest says {str(expected)[:16]}...")
    if bad:
        raise CorruptCheckpointError(
            f"{path}: {len(bad)} of {len(files)} file(s) fail the integrity check:\n  "
            + "\n  ".join(bad)
        )
    logger.info("Checkpoint integrity verified: %d file(s) in %s", len(files), iter_dir)
    return len(files)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
