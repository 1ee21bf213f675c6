"""integrity.json written by megatron-core's own save_integrity_manifest, checked on load."""

from __future__ import annotations

import sys

import pytest

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.checkpoint.integrity import verify_integrity
from sglang_megatron_loader.errors import CorruptCheckpointError, IncompleteCheckpointError


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
