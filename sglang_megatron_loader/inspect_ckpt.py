"""``sglang-megatron inspect``: what a checkpoint holds and what serving it would do.

Metadata only: ``.metadata``, ``metadata.json`` and the (small) common state; no tensor data.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.engine import checkpoint_hf_config, checkpoint_refusals, dims_for
from sglang_megatron_loader.errors import MegatronLoaderError
from sglang_megatron_loader.models import table_for
from sglang_megatron_loader.models.llama import LLAMA
from sglang_megatron_loader.models.moe import FC1, local_experts
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import RankPlan, plan_rank

_MCORE_STRATEGY = "megatron.core.dist_checkpointing.strategies.torch"
TRAINING_LAYOUT_ARGS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage",
    "expert_model_parallel_size",
    "context_parallel_size",
    "use_distributed_optimizer",
)


def writer_version(ckpt: MegatronCheckpoint) -> str:
    """Which megatron-core generation wrote the checkpoint, from its on-disk layout."""
    if ckpt.location.format == "torch":
        version = ckpt.common.get("checkpoint_version")
        return f"Megatron-LM --ckpt-format torch (per-rank files, checkpoint_version {version})"
    if ckpt.location.format == "torch_dcp":
        plain = "Megatron-LM --ckpt-format torch_dcp (plain PyTorch DCP, FSDP2 training)"
        return plain + _torch_generation(ckpt)
    return _mcore_generation(ckpt) + _torch_generation(ckpt)


def _mcore_generation(ckpt: MegatronCheckpoint) -> str:
    legacy_common = (ckpt.location.iter_dir / "common.pt").is_file()
    if legacy_common or "common_backend" in ckpt.location.metadata_json:
        # megatron classes the save pickled into .metadata tell the older generations apart
        pickled = ckpt.dcp.metadata.pickled_globals
        if f"{_MCORE_STRATEGY}.MCoreMetadata" in pickled:
            return "megatron-core 0.15 (common.pt, MCoreMetadata in .metadata)"
        if f"{_MCORE_STRATEGY}.MCoreSavePlan" in pickled:
            return "megatron-core <= 0.14 (common.pt, MCoreSavePlan in .metadata)"
        if legacy_common:
            return "megatron-core 0.16 to 0.18 (common.pt)"
        return "megatron-core <= 0.18"
    return "megatron-core >= 0.19 (common state inside the DCP)"


def _torch_generation(ckpt: MegatronCheckpoint) -> str:
    """torch 2.15 added ``TensorProperties.strides``; ``Metadata.version`` stayed 1.0.0."""
    meta = getattr(ckpt.dcp, "metadata", None)  # legacy per-rank files have none
    return ", DCP metadata of torch >= 2.15" if meta is not None and meta.records_strides else ""


def inspect(
    path: str, tp: int = 0, tokenizer: str | Path | None = None, ep: int = 1
) -> tuple[dict[str, Any], list[RankPlan]]:
    """The report as a JSON-able dict, and the per-rank plans when ``tp`` is given (with
    ``ep``: SGLang's ``--ep-size``, which places whole experts on ranks).

    ``tokenizer`` sets the true vocabulary where the checkpoint does not record it (default:
    the checkpoint's own tokenizer, see ``find_tokenizer``)."""
    with MegatronCheckpoint(path) as ckpt:
        model_keys = [k for k in ckpt.tensors if not LLAMA.is_ignored(k)]
        other = [k for k in ckpt.tensors if k not in model_keys]
        args = ckpt.args
        info: dict[str, Any] = {
            "checkpoint": str(ckpt.location.iter_dir),
            "iteration": ckpt.location.iteration_label,
            "format": ckpt.location.format,
            "writer": ("Megatron-Bridge on " if ckpt.writer == "megatron-bridge" else "")
            + writer_version(ckpt),
            "config_source": ckpt.config_source,
            "training_layout": {k: getattr(args, k, None) for k in TRAINING_LAYOUT_ARGS},
            "parameters": sum(_numel(ckpt.tensors[k].shape) for k in model_keys),
            "model_bytes": sum(ckpt.tensors[k].nbytes for k in model_keys),
            "optimizer_and_other_bytes": sum(ckpt.tensors[k].nbytes for k in other)
            + getattr(ckpt.dcp, "other_bytes", 0),  # legacy files: optimizer and RNG state
            "files_bytes": sum(ckpt.dcp.file_sizes().values()),
            "dtypes": dict(
                Counter(str(ckpt.tensors[k].dtype).removeprefix("torch.") for k in model_keys)
            ),
            "refused": checkpoint_refusals(ckpt),
        }
        plans: list[RankPlan] = []
        if info["refused"]:
            return info, plans
        config = checkpoint_hf_config(ckpt, tokenizer=tokenizer)
        info["config"] = config.to_diff_dict()
        info["vocab"] = {
            "served": config.vocab_size,
            "stored_rows": config.megatron_padded_vocab_size,
            "from": config.megatron_vocab_origin,
        }
        experts = experts_info(ckpt, config)
        if experts:
            info["experts"] = experts
        if tp:
            try:
                dims = dims_for(ckpt, config)
                table = table_for(config)
                ranks = [Tp(r, tp, r // max(tp // ep, 1), ep) for r in range(tp)]
                plans = [plan_rank(table, dims, ckpt.tensors, t) for t in ranks]
                info["bytes_per_rank"] = [p.bytes_to_read(ckpt.tensors) for p in plans]
                if experts:
                    experts["per_rank"] = [list(local_experts(dims, t, "experts")) for t in ranks]
            except MegatronLoaderError as exc:
                info["tp_error"] = str(exc)
    return info, plans


def experts_info(ckpt: MegatronCheckpoint, config: Any) -> dict[str, Any] | None:
    """Count, top-k, expert FFN size and bytes per expert of an MoE checkpoint (None: dense)."""
    dims = dims_for(ckpt, config)
    if not dims.num_experts:
        return None
    fc1 = next((t for k, t in ckpt.tensors.items() if k.endswith(FC1)), None)
    itemsize = fc1.dtype.itemsize if fc1 is not None else 0
    per_layer = 3 * dims.moe_ffn_hidden_size * dims.hidden_size * itemsize  # fc1 [2F,H] + fc2
    return {
        "num_experts": dims.num_experts,
        "top_k": config.num_experts_per_tok,
        "moe_ffn_hidden_size": dims.moe_ffn_hidden_size,
        "bytes_per_expert_per_layer": per_layer,
        "bytes_per_expert": per_layer * dims.num_layers,
        "experts_bytes": per_layer * dims.num_layers * dims.num_experts,
    }


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def format_text(info: dict[str, Any]) -> str:
    lines = [
        f"checkpoint   {info['checkpoint']}",
        f"iteration    {info['iteration']}",
        f"format       {info['format']}, written by {info['writer']}",
        f"config from  {info['config_source']}",
        "training     "
        + ", ".join(f"{k}={v}" for k, v in info["training_layout"].items() if v is not None),
        f"parameters   {info['parameters']:,}",
        f"model bytes  {human(info['model_bytes'])} ({info['dtypes']})",
        f"other bytes  {human(info['optimizer_and_other_bytes'])} "
        "(optimizer and other state, never read)",
        f"on disk      {human(info['files_bytes'])}",
    ]
    if info["refused"]:
        lines.append("REFUSED      " + "; ".join(info["refused"]))
    if "config" in info:
        c = info["config"]
        lines.append(
            f"config       {c['architectures'][0]}: {c['num_hidden_layers']} layers, hidden "
            f"{c['hidden_size']}, ffn {c['intermediate_size']}, heads {c['num_attention_heads']} "
            f"(kv {c['num_key_value_heads']}, head_dim {c['head_dim']}), vocab {c['vocab_size']}, "
            f"tied {c.get('tie_word_embeddings', True)}, dtype {c.get('dtype')}"
        )
    if "vocab" in info:
        v = info["vocab"]
        lines.append(
            f"vocab        {v['served']} tokens served of {v['stored_rows']} stored rows "
            f"(size from {v['from']})"
        )
    if "experts" in info:
        e = info["experts"]
        lines.append(
            f"experts      {e['num_experts']} per layer, top-{e['top_k']}, ffn "
            f"{e['moe_ffn_hidden_size']}: {human(e['bytes_per_expert'])} per expert "
            f"({human(e['bytes_per_expert_per_layer'])} per layer), "
            f"{human(e['experts_bytes'])} in all"
        )
        if "per_rank" in e:
            lines.append(
                "experts/rank "
                + ", ".join(f"{r}: {x[0]}-{x[-1]}" for r, x in enumerate(e["per_rank"]) if x)
            )
    if "bytes_per_rank" in info:
        per = info["bytes_per_rank"]
        lines.append(
            f"TP={len(per)} plan  bytes per rank: "
            + ", ".join(human(b) for b in per)
            + f" (model {human(info['model_bytes'])})"
        )
    if "tp_error" in info:
        lines.append(f"TP plan      cannot serve: {info['tp_error']}")
    return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
