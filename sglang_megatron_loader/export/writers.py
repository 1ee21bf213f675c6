"""Write an :class:`HfStream` as a Hugging Face folder or a plain PyTorch ``.pt`` file.

Both writers stream (one parameter plus one output shard in memory at most), show a progress
bar with bytes and throughput, and write atomically: data goes to ``<out>.partial-<pid>`` and is
renamed into place only when complete, so an interrupted export leaves nothing that looks done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sglang_megatron_loader.checkpoint.locate import find_tokenizer
from sglang_megatron_loader.checkpoint.torchzip import TorchZip
from sglang_megatron_loader.errors import MegatronLoaderError
from sglang_megatron_loader.export.stream import HfStream, TensorSpec

PROVENANCE_ARGS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "padded_vocab_size",
    "vocab_size",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "bf16",
    "fp16",
    "rotary_base",
    "norm_epsilon",
    "untie_embeddings_and_output_weights",
    "tokenizer_type",
    "tokenizer_model",
)


class ExportError(MegatronLoaderError):
    """The export destination cannot be written as asked."""


def provenance(stream: HfStream) -> dict[str, str]:
    """String metadata recorded in every safetensors shard (source, iteration, key args)."""
    loc, args = stream.ckpt.location, stream.ckpt.args
    picked = {k: getattr(args, k) for k in PROVENANCE_ARGS if hasattr(args, k)}
    return {
        "format": "pt",
        "megatron_source": str(loc.iter_dir.resolve()),
        "megatron_iteration": loc.iteration_label,
        "megatron_args": json.dumps(picked, default=str, sort_keys=True),
        "exported_by": "sglang-megatron-loader",
    }


@contextlib.contextmanager
def _atomic_path(out: Path, force: bool) -> Iterator[Path]:
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists; pass --force to replace it")
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, mininterval=0.5
    )


def shard_plan(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy grouping in spec order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def export_hf(
    stream: HfStream,
    out: Path,
    *,
    shard_bytes: int = 5 * 10**9,
    tokenizer: Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Write a Hugging Face Llama folder; returns a small report (bytes, seconds, shards).

    Each shard's safetensors header is written first (all shapes are known from the plan),
    then each tensor's bytes as the stream produces them: memory holds one parameter at most.
    """
    shards = shard_plan(stream.specs, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    meta, start = provenance(stream), time.perf_counter()
    with _atomic_path(out, force) as tmp:
        tmp.mkdir(parents=True)
        _write_configs(stream, tmp)
        bar = _progress(stream.total_bytes, f"Exporting {out.name}", progress)
        tensors = stream.tensors()
        weight_map: dict[str, str] = {}
        for shard, file in zip(shards, names):
            with open(tmp / file, "wb") as f:
                f.write(safetensors_header(shard, meta))
                for spec in shard:
                    got, tensor = next(tensors)
                    if got != spec:  # same order by construction
                        raise ExportError(f"internal: expected {spec.name}, got {got.name}")
                    _write_all(f, tensor)
                    weight_map[spec.name] = file
                    bar.update(spec.nbytes)
        bar.close()
        index = {"metadata": {"total_size": stream.total_bytes, **meta}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        copied = _copy_tokenizer(stream, tmp, tokenizer)
    seconds = time.perf_counter() - start
    return {
        "out": str(out),
        "bytes": stream.total_bytes,
        "seconds": seconds,
        "shards": len(shards),
        "tokenizer": copied,
    }


_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding ``specs`` in order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for s in specs:
        header[s.name] = {
            "dtype": _SAFETENSORS_DTYPES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def _write_all(f: Any, tensor: torch.Tensor) -> None:
    view = memoryview(tensor.contiguous().view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        done += f.write(view[done:])


def _write_configs(stream: HfStream, folder: Path) -> None:
    from transformers import GenerationConfig

    stream.config.save_pretrained(folder)
    GenerationConfig.from_model_config(stream.config).save_pretrained(folder)


def _copy_tokenizer(stream: HfStream, folder: Path, given: Path | None) -> str | None:
    """Copy the given tokenizer folder, else the checkpoint's own (see ``find_tokenizer``)."""
    if given is not None and not given.is_dir():
        raise ExportError(f"--tokenizer {given}: not a folder")
    source = given or find_tokenizer(
        stream.ckpt.location, getattr(stream.ckpt.args, "tokenizer_model", None)
    )
    if source is None:
        return None
    for f in source.iterdir():
        if f.is_file():
            shutil.copy2(f, folder / f.name)
    return str(source)


def export_pytorch(
    stream: HfStream, out: Path, *, force: bool = False, progress: bool = True
) -> dict:
    """One ``.pt`` file: ``{"model_state_dict": {hf_name: tensor}, "model_config": dict}``.

    Loadable with ``torch.load(out, weights_only=True)``. Written without holding the state
    dict: a skeleton is saved with ``torch.serialization.skip_data`` (unallocated pages), then
    each tensor's bytes are written at the offset the zip records for its storage.
    """
    start = time.perf_counter()
    skeleton = {s.name: torch.empty(s.shape, dtype=s.dtype) for s in stream.specs}
    config = json.loads(stream.config.to_json_string(use_diff=False))
    with _atomic_path(out, force) as tmp:
        with torch.serialization.skip_data():
            torch.save({"model_state_dict": skeleton, "model_config": config}, tmp)
        del skeleton
        with open(tmp, "r+b") as f:
            refs = TorchZip(f, 0, os.fstat(f.fileno()).st_size, source=str(tmp)).locate()
            refs = refs["model_state_dict"]
            bar = _progress(stream.total_bytes, f"Exporting {out.name}", progress)
            for spec, tensor in stream.tensors():
                ref = refs[spec.name]
                _pwrite_all(f.fileno(), tensor, ref.storage.file_offset)
                bar.update(spec.nbytes)
            bar.close()
            os.fsync(f.fileno())
    return {"out": str(out), "bytes": stream.total_bytes, "seconds": time.perf_counter() - start}


def _pwrite_all(fd: int, tensor: torch.Tensor, offset: int) -> None:
    view = memoryview(tensor.contiguous().view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def report_line(report: dict[str, Any]) -> str:
    gbps = report["bytes"] / max(report["seconds"], 1e-9) / 1e9
    return (
        f"wrote {report['out']}: {report['bytes'] / 1e9:.3f} GB in {report['seconds']:.2f} s "
        f"({gbps:.2f} GB/s)"
    )
