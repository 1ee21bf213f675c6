"""Ways to damage a private copy of a real megatron-core checkpoint, and the package path a load
takes (the same calls the SGLang loader makes), shared by the corruption tests."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

from sglang_megatron_loader import engine
from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.checkpoint.integrity import verify_integrity
from sglang_megatron_loader.checkpoint.safe_pickle import MegatronPlaceholder
from sglang_megatron_loader.config import hf_config_from_args
from sglang_megatron_loader.models.llama import LLAMA
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import plan_rank

QKV = "decoder.layers.self_attention.linear_qkv.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
COMMON = "common_state/shard_0_1"


def iter_dir(root: Path) -> Path:
    """The one iteration folder of a fixture run root."""
    (found,) = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_")]
    return found


def data_file(root: Path) -> Path:
    return sorted(iter_dir(root).glob("*.distcp"))[0]


# -- .metadata ---------------------------------------------------------------------------------
def read_metadata(root: Path) -> Metadata:
    """The fixture's ``.metadata`` as torch's own objects, to edit and write back. Plain
    ``pickle`` on purpose: the file is our fixture, and the package reads ``.metadata`` into
    stand-ins, never into these classes (``checkpoint/dcp_metadata.py``)."""
    return pickle.loads((iter_dir(root) / ".metadata").read_bytes())


def write_metadata(root: Path, meta: Metadata) -> None:
    (iter_dir(root) / ".metadata").write_bytes(pickle.dumps(meta))


def storage_index(meta: Metadata, fqn: str, nth: int = 0) -> MetadataIndex:
    """The ``nth`` storage entry of ``fqn`` (chunks in metadata order)."""
    md = meta.state_dict_metadata[fqn]
    if not hasattr(md, "chunks"):
        return next(i for i in meta.storage_data if i.fqn == fqn)
    offsets = md.chunks[nth].offsets
    return next(i for i in meta.storage_data if i.fqn == fqn and i.offset == offsets)


def append_and_repoint(root: Path, fqn: str, payload: bytes, nth: int = 0) -> Path:
    """Append ``payload`` to the data file of ``fqn``'s ``nth`` chunk (or its bytes item) and make
    ``.metadata`` point that chunk at it: what a writer with control of every file can do."""
    meta = read_metadata(root)
    idx = storage_index(meta, fqn, nth)
    info = meta.storage_data[idx]
    path = iter_dir(root) / info.relative_path
    offset = path.stat().st_size
    with open(path, "ab") as f:
        f.write(payload)
    meta.storage_data[idx] = dataclasses.replace(info, offset=offset, length=len(payload))
    write_metadata(root, meta)
    return path


def torch_save_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# -- common state ------------------------------------------------------------------------------
def common_state(root: Path) -> dict[str, Any]:
    """The fixture's common state, with megatron placeholders dropped so it can be re-saved."""
    with MegatronCheckpoint(root) as ckpt:
        state = dict(ckpt.common)
    args = {k: v for k, v in vars(state["args"]).items() if not isinstance(v, MegatronPlaceholder)}
    state["args"] = argparse.Namespace(**args)
    return state


def write_common_pt(root: Path, drop: tuple[str, ...] = (), **arg_changes: Any) -> Path:
    """A megatron-core <= 0.18 ``common.pt`` next to ``metadata.json`` (the reader prefers it)
    holding the fixture's own args with ``arg_changes`` applied and ``drop`` removed."""
    state = common_state(root)
    args = vars(state["args"])
    args.update(arg_changes)
    for name in drop:
        args.pop(name)
    path = iter_dir(root) / "common.pt"
    torch.save(state, path)
    return path


# -- bytes -------------------------------------------------------------------------------------
def write_integrity_manifest(root: Path) -> None:
    """``integrity.json`` as megatron-core's ``save_integrity_manifest`` writes it (0.18+,
    ``--verify-integrity``): SHA-256 of every file of the iteration folder."""
    it = iter_dir(root)
    files = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(it.iterdir())
        if p.is_file() and p.name != "integrity.json"
    }
    (it / "integrity.json").write_text(json.dumps({"algorithm": "sha256", "files": files}))


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path: Path, size: int) -> None:
    os.truncate(path, size)


# -- the load path -----------------------------------------------------------------------------
TP1 = Tp(0, 1)


def load(path: Path, tp: Tp = TP1, params: tuple[str, ...] | None = None) -> dict:
    """Open, check integrity.json if present, derive the config and dims, plan ``tp``'s rank and
    execute it into empty tensors: what ``--load-format megatron`` does, without SGLang's model
    around it (``MegatronModelLoader.load_model``)."""
    with MegatronCheckpoint(path) as ckpt:
        verify_integrity(ckpt.location.iter_dir, "auto")
        config = hf_config_from_args(ckpt.args, source=ckpt.source)
        dims = engine.dims_for(ckpt, config)
        plan = plan_rank(LLAMA, dims, ckpt.tensors, tp, params)
        dtype = getattr(torch, config.dtype) if isinstance(config.dtype, str) else config.dtype
        out = {p.name: torch.empty(p.shape, dtype=dtype) for p in plan.params}
        engine.execute_plan(ckpt, plan, lambda p: out[p.name], progress=False)
    return out
