"""The common (non-tensor) state of a torch_dist checkpoint: ``args``, iteration, version."""

from __future__ import annotations

from typing import Any

from sglang_megatron_loader.checkpoint.dcp import DcpCheckpoint
from sglang_megatron_loader.checkpoint.torchzip import load_torch_bytes, load_torch_file
from sglang_megatron_loader.errors import CorruptCheckpointError

COMMON_STATE_KEY = "common_state/shard_0_1"  # megatron-core >= 0.19


def read_common_state(dcp: DcpCheckpoint) -> dict[str, Any]:
    """``common.pt`` (megatron-core <= 0.18) or the DCP item ``common_state/shard_0_1`` (0.19+)."""
    legacy = dcp.folder / "common.pt"
    if legacy.is_file():
        state, source = load_torch_file(legacy), str(legacy)
    elif COMMON_STATE_KEY in dcp.bytes_items:
        rel, offset, length = dcp.bytes_items[COMMON_STATE_KEY]
        source = (
            f"{dcp.folder / rel} (item '{COMMON_STATE_KEY}', bytes {offset}..{offset + length})"
        )
        state = load_torch_bytes(dcp.read_bytes_item(COMMON_STATE_KEY), source=source)
        if isinstance(state, list) and len(state) == 1:
            state = state[0]
    else:
        raise CorruptCheckpointError(
            f"{dcp.folder}: neither common.pt nor the DCP item '{COMMON_STATE_KEY}' is present; "
            "cannot read the training args"
        )
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{source}: expected a dict, found {type(state).__name__}")
    return state
