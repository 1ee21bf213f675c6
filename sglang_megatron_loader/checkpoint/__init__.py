"""Reader room: knows only Megatron's checkpoint formats (paths, DCP metadata, byte ranges)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sglang_megatron_loader.checkpoint.bridge import (
    RUN_CONFIG,
    args_from_run_config,
    read_run_config,
)
from sglang_megatron_loader.checkpoint.common import read_common_state
from sglang_megatron_loader.checkpoint.dcp import DcpCheckpoint, TensorInfo
from sglang_megatron_loader.checkpoint.legacy import LegacyCheckpoint
from sglang_megatron_loader.checkpoint.locate import (
    CheckpointLocation,
    looks_like_megatron,
    resolve,
)
from sglang_megatron_loader.checkpoint.torch_dcp import TorchDcpCheckpoint
from sglang_megatron_loader.errors import CorruptCheckpointError

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
        # Megatron-LM keeps its args in the common state; Megatron-Bridge writes none and keeps
        # the config in run_config.yaml (TransformerConfig names), translated to args names.
        self.run_config: dict[str, Any] | None = None
        if "args" in self.common:
            self.args: Any = self.common["args"]
        elif (self.location.iter_dir / RUN_CONFIG).is_file():
            self.run_config = read_run_config(self.location.iter_dir)
            self.args = args_from_run_config(self.run_config, self.config_source)
        else:
            raise CorruptCheckpointError(
                f"{self.location.iter_dir}: no 'args' in the common state (keys: "
                f"{sorted(map(str, self.common))[:10]}) and no {RUN_CONFIG}; the model config "
                "cannot be derived. Megatron-LM's training loop stores args; Megatron-Bridge "
                f"writes {RUN_CONFIG}."
            )

    @property
    def writer(self) -> str:
        """Which tool's config the checkpoint carries: ``megatron-lm`` or ``megatron-bridge``."""
        return "megatron-bridge" if self.run_config is not None else "megatron-lm"

    @property
    def config_source(self) -> str:
        """The file the model config comes from, for messages."""
        if self.run_config is not None:
            return str(self.location.iter_dir / RUN_CONFIG)
        return f"{self.location.iter_dir} (args)"

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
