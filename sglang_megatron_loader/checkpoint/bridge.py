"""Megatron-Bridge saves: the model config from ``iter_*/run_config.yaml``.

Megatron-Bridge (``AutoBridge.import_ckpt``, its trainer) writes the same torch_dist tensors as
Megatron-LM, but no ``args``: the common state holds only ``checkpoint_version``, ``iteration``
and ``content_metadata``, and the config is ``run_config.yaml``, whose ``model:`` section uses
megatron-core ``TransformerConfig`` field names. The YAML is read as data only (YAML's safe
subset); a ``_target_`` is a string compared against known names, never imported or called.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from sglang_megatron_loader.errors import CorruptCheckpointError, UnsupportedCheckpointError

RUN_CONFIG = "run_config.yaml"

# Providers whose ``provide()`` builds a plain megatron-core GPTModel from the config fields
# (so the fields say everything about the forward): Bridge 0.6 configures GPTModelProvider
# itself for Llama, Qwen2, Qwen3 and Qwen3-MoE; older releases named per-family providers
# (``Qwen3MoEModelProvider`` ...). Others (VL, hybrid, MLA, Gemma's scaled embeddings, ...)
# are refused by name.
_PROVIDER = re.compile(
    r"megatron\.bridge\.models\.[\w.]+\."
    r"(GPTModelProvider|Llama\d*ModelProvider\w*|Qwen\d*ModelProvider\w*|Qwen3MoEModelProvider\w*)"
)
SILU = "torch.nn.functional.silu"


def read_run_config(iter_dir: Path) -> dict[str, Any]:
    """The ``model:`` section of ``iter_dir/run_config.yaml``, its ``_target_`` checked."""
    import yaml

    path = iter_dir / RUN_CONFIG
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CorruptCheckpointError(f"{path}: not UTF-8 text ({exc})") from exc
    except yaml.constructor.ConstructorError as exc:
        raise UnsupportedCheckpointError(
            f"{path}: refusing a YAML tag that builds an object ({exc.problem}); the run "
            "config is read as plain data only"
        ) from exc
    except yaml.YAMLError as exc:
        raise CorruptCheckpointError(f"{path}: not valid YAML ({exc})") from exc
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise CorruptCheckpointError(
            f"{path}: expected a mapping with a 'model:' section (Megatron-Bridge's run config), "
            f"found {type(model if isinstance(data, dict) else data).__name__}"
        )
    target = model.get("_target_")
    if not (isinstance(target, str) and _PROVIDER.fullmatch(target)):
        raise UnsupportedCheckpointError(
            f"{path}: model._target_ is {target!r}; served Megatron-Bridge providers are "
            "GPTModelProvider, the Llama/Qwen2/Qwen3 providers and the Qwen3-MoE provider "
            "(vision-language and other model families are not served yet)"
        )
    bad = [k for k in model if not isinstance(k, str)]
    if bad:
        raise CorruptCheckpointError(f"{path}: model section has non-string keys {bad[:5]}")
    return model


def target_of(value: Any) -> str | None:
    """The ``_target_`` string of a hydra-style object spec, or None for plain values."""
    if isinstance(value, dict):
        target = value.get("_target_")
        return target if isinstance(target, str) else None
    return None


def args_from_run_config(model: dict[str, Any], source: str) -> argparse.Namespace:
    """The Megatron-LM ``args`` names the config builder reads, from TransformerConfig names.

    Every field is carried over under its own name (most are the same in both); the few whose
    Megatron-LM argument differs are added under that name. What the loader serves or refuses
    is decided on the original fields (``arg_policy``), not here.
    """
    heads = model.get("num_attention_heads")
    groups = model.get("num_query_groups")
    activation = model.get("activation_func")
    args = argparse.Namespace(**model)
    args.norm_epsilon = model.get("layernorm_epsilon")
    args.untie_embeddings_and_output_weights = not model.get(
        "share_embeddings_and_output_weights", True
    )
    args.group_query_attention = groups is not None and groups != heads
    args.swiglu = bool(model.get("gated_linear_unit")) and target_of(activation) == SILU
    args.use_rope_scaling = bool(model.get("rope_scaling"))
    args.rotary_seq_len_interpolation_factor = model.get("seq_len_interpolation_factor")
    args.max_position_embeddings = model.get("seq_length")
    args.tokenizer_model = None  # the save's own tokenizer/ folder is found by location
    # mixture of experts: the MoE fields share their Megatron-LM names except the count
    args.num_experts = model.get("num_moe_experts")
    if model.get("params_dtype") is not None and not (model.get("bf16") or model.get("fp16")):
        dtype = str(target_of(model["params_dtype"]) or model["params_dtype"]).rsplit(".", 1)[-1]
        args.bf16, args.fp16 = dtype == "bfloat16", dtype in ("float16", "half")
    return args
