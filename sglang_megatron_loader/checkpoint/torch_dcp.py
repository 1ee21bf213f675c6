"""Megatron-LM ``--ckpt-format torch_dcp``: Megatron-LM's state dict saved with plain PyTorch DCP.

``save_checkpoint`` hands ``generate_state_dict``'s dict to ``torch.distributed.checkpoint.save``:
``args``, ``iteration`` and ``checkpoint_version`` become top-level bytes items (``torch.save``
payloads) and the model's ``state_dict_for_save_checkpoint()`` lands under ``model.`` with
per-layer mcore names (``model.decoder.layers.3.self_attention.linear_qkv.weight``). FSDP2
shards each tensor over the data-parallel ranks, which DCP records as chunks of the global
tensor, so the global tensors are exactly an unsharded (TP1) model's. Tensor parallelism or
pipeline stages would make those keys rank-local, which this reader refuses.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sglang_megatron_loader.checkpoint.dcp import DcpCheckpoint
from sglang_megatron_loader.checkpoint.dcp_metadata import DcpMetadata
from sglang_megatron_loader.checkpoint.torchzip import load_torch_bytes
from sglang_megatron_loader.errors import CorruptCheckpointError, UnsupportedCheckpointError

MODEL_PREFIX = "model."
COMMON_ITEMS = ("args", "iteration", "checkpoint_version", "num_floating_point_operations_so_far")


class TorchDcpCheckpoint(DcpCheckpoint):
    """A torch_dcp iteration folder seen as torch_dist's reader sees its folder: tensors keyed
    by their mcore names (the ``model.`` prefix dropped) and the common state from the items."""

    def __init__(self, folder: Path, metadata: DcpMetadata | None = None) -> None:
        super().__init__(folder, metadata)
        self.common = self._read_common()
        _refuse_rank_local_layouts(self.common["args"], folder)
        renamed = {}
        for key, info in self.tensors.items():
            name = key.removeprefix(MODEL_PREFIX) if key.startswith(MODEL_PREFIX) else key
            renamed[name] = dataclasses.replace(info, key=name)
        self.tensors = renamed

    def _read_common(self) -> dict[str, Any]:
        common: dict[str, Any] = {}
        for key in COMMON_ITEMS:
            if key in self.bytes_items:
                rel, offset, length = self.bytes_items[key]
                source = f"{self.folder / rel} (item '{key}', bytes {offset}..{offset + length})"
                common[key] = load_torch_bytes(self.read_bytes_item(key), source=source)
        if common.get("args") is None:
            raise CorruptCheckpointError(
                f"{self.folder}: torch_dcp checkpoint without an 'args' item; the model config "
                "cannot be derived"
            )
        return common


def _refuse_rank_local_layouts(args: Any, folder: Path) -> None:
    fmt = getattr(args, "ckpt_format", None)
    if fmt == "fsdp_dtensor":
        raise UnsupportedCheckpointError(
            f"{folder}: args.ckpt_format='fsdp_dtensor' (Megatron-FSDP): its parameter layout is "
            "not supported yet. Re-save with --ckpt-format torch_dist (Megatron-LM loads "
            "fsdp_dtensor and saves torch_dist in one run with --load/--save)."
        )
    split = {
        name: getattr(args, name, 1) or 1
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    }
    bad = {k: v for k, v in split.items() if v != 1}
    if bad:
        found = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise UnsupportedCheckpointError(
            f"{folder}: torch_dcp checkpoint saved with {found}: its 'model.' keys are rank-local "
            "shards this reader cannot place. Re-save with --ckpt-format torch_dist."
        )
