"""Reader room: knows only Megatron's checkpoint formats (paths, DCP metadata, byte ranges)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sglang_megatron_loader.checkpoint.common import read_common_state
from sglang_megatron_loader.checkpoint.dcp import DcpCheckpoint, TensorInfo
from sglang_megatron_loader.checkpoint.legacy import LegacyCheckpoint
from sglang_megatron_loader.checkpoint.locate import (
    CheckpointLocation,
    looks_like_megatron,
    resolve,
)
from sglang_megatron_loader.checkpoint.torch_dcp import TorchDcpCheckpoint

__all__ = [
    "CheckpointLocation",
    "DcpCheckpoint",
    "LegacyCheckpoint",
    "MegatronCheckpoint",
    "TensorInfo",
    "looks_like_megatron",
    "resolve",
]


class MegatronCheckpoint:
    """One iteration of a Megatron run: where it is, its args, and its tensors (lazily read)."""

    def __init__(self, path: str | Path) -> None:
        self.location = resolve(path)
        # ``dcp``: the tensor reader; for the legacy format a DcpCheckpoint over per-rank files
        self.dcp: DcpCheckpoint
        if self.location.format == "torch":
            self.dcp = LegacyCheckpoint(self.location.iter_dir)
            self.common = self.dcp.common
        elif self.location.format == "torch_dcp":
            self.dcp = TorchDcpCheckpoint(self.location.iter_dir)
            self.common = self.dcp.common
        else:
            self.dcp = DcpCheckpoint(self.location.iter_dir)
            self.common = read_common_state(self.dcp)
        self.args: Any = self.common["args"]

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.dcp.tensors

    @property
    def source(self) -> str:
        return str(self.location.iter_dir)

    def close(self) -> None:
        self.dcp.close()

    def __enter__(self) -> MegatronCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
