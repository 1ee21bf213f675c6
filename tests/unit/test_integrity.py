"""integrity.json written by megatron-core's own save_integrity_manifest, checked on load, once
per file per machine: concurrent ranks share one hash of each file, and its verdict."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.checkpoint.integrity import (
    MANIFEST,
    VERDICT_ENV,
    verdict_dir,
    verify_integrity,
)
from sglang_megatron_loader.errors import CorruptCheckpointError, IncompleteCheckpointError


@pytest.fixture(autouse=True)
def _own_verdicts(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(VERDICT_ENV, str(tmp_path / "verdicts"))


def write_manifest(iter_dir) -> None:
    sys.modules.setdefault("flash_mla", None)  # as in the fixture script (CPU-only machine)
    from megatron.core.dist_checkpointing.validation import save_integrity_manifest

    save_integrity_manifest(str(iter_dir))


def test_manifest_verified_and_overwritten_tensor_bytes_caught(ckpt_copy) -> None:
    iter_dir = ckpt_copy("fp32_tp1") / "iter_0000010"
    assert verify_integrity(iter_dir) == 0  # no manifest: nothing to check in "auto"
    with pytest.raises(IncompleteCheckpointError, match="integrity.json: missing"):
        verify_integrity(iter_dir, "require")
    write_manifest(iter_dir)
    assert verify_integrity(iter_dir, "require") == 3  # .metadata, .distcp, metadata.json
    # the one damage the reader cannot see on its own: tensor bytes overwritten in place
    with MegatronCheckpoint(iter_dir) as ckpt:
        chunk = ckpt.tensors["decoder.layers.mlp.linear_fc2.weight"].chunks[0]
    with open(iter_dir / chunk.relative_path, "r+b") as f:
        f.seek(chunk.offset + chunk.length - 16)
        f.write(b"\x7f" * 8)
    with pytest.raises(CorruptCheckpointError, match=r"__0_0\.distcp: sha256 .* manifest says"):
        verify_integrity(iter_dir)
    assert verify_integrity(iter_dir, "off") == 0


CHILD = r"""
import json, os, sys, time
from pathlib import Path
from sglang_megatron_loader.checkpoint import integrity
from sglang_megatron_loader.errors import CorruptCheckpointError

iter_dir, log, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
integrity.SETTLED_NS = 0  # the fixture copy is seconds old: keep its verdicts anyway
real = integrity._sha256

def counted(path):
    time.sleep(0.3)  # slow hashing: the two processes overlap on every file
    with open(log, "a") as f:
        f.write(f"{me} {path.name}\n")
    return real(path)

integrity._sha256 = counted
Path(me).touch()
while not Path(other).exists():
    time.sleep(0.01)
try:
    print(json.dumps({"ok": integrity.verify_integrity(iter_dir, "require")}))
except CorruptCheckpointError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def _verify_in_two_processes(iter_dir, tmp_path, tag: str) -> tuple[list[dict], list[str]]:
    log, env = tmp_path / f"{tag}.log", {**os.environ, VERDICT_ENV: str(tmp_path / "verdicts")}
    a, b = tmp_path / f"{tag}.a", tmp_path / f"{tag}.b"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(iter_dir), str(log), str(me), str(other)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for me, other in ((a, b), (b, a))
    ]
    outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    lines = log.read_text().splitlines() if log.exists() else []  # written per file hashed
    return outs, [line.split()[1] for line in lines]


def test_two_ranks_at_once_hash_each_file_once(ckpt_copy, tmp_path) -> None:
    iter_dir = ckpt_copy("fp32_tp1") / "iter_0000010"
    write_manifest(iter_dir)
    outs, hashed = _verify_in_two_processes(iter_dir, tmp_path, "clean")
    assert outs == [{"ok": 3}, {"ok": 3}]
    assert sorted(hashed) == sorted(json.loads((iter_dir / MANIFEST).read_text())["files"])
    # a later process (a second server, a restart) reads every verdict: nothing hashed again
    outs, again = _verify_in_two_processes(iter_dir, tmp_path, "later")
    assert outs == [{"ok": 3}, {"ok": 3}] and again == []


def test_damaged_file_fails_in_every_rank_hashed_once(ckpt_copy, tmp_path) -> None:
    iter_dir = ckpt_copy("fp32_tp1") / "iter_0000010"
    write_manifest(iter_dir)
    with open(iter_dir / "__0_0.distcp", "r+b") as f:
        f.seek(-16, os.SEEK_END)
        f.write(b"\x7f" * 8)
    outs, hashed = _verify_in_two_processes(iter_dir, tmp_path, "damaged")
    for out in outs:
        assert re.search(r"1 of 3 file\(s\) fail .*__0_0\.distcp: sha256", out["error"], re.S)
    assert hashed.count("__0_0.distcp") == 1


def test_verdicts_are_not_trusted_from_a_folder_others_can_write(tmp_path, monkeypatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv(VERDICT_ENV, str(shared))
    assert verdict_dir() is None
    monkeypatch.setenv(VERDICT_ENV, str(tmp_path / "mine"))
    assert verdict_dir() == tmp_path / "mine"
