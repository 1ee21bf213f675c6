"""Megatron training ``args`` -> the transformers config (Llama, Qwen2 or Qwen3) SGLang serves.

Every field comes from the checkpoint itself; nothing is typed by hand. The architecture is
picked from args by :data:`ARCHITECTURES`; features no architecture serves are refused with one
error listing every offending arg and its value.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    MixtralConfig,
    PreTrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from sglang_megatron_loader.arg_policy import Naming, policy_violations
from sglang_megatron_loader.errors import CorruptCheckpointError, UnsupportedCheckpointError
from sglang_megatron_loader.vocab import OVERRIDE_HINT, Vocab, resolve_vocab

logger = logging.getLogger("sglang_megatron_loader")

REQUIRED_ARGS = ("num_layers", "hidden_size", "num_attention_heads")


@dataclass(frozen=True)
class Architecture:
    """An SGLang / transformers model class, its config class, and when args select it."""

    name: str
    config_class: type[PreTrainedConfig]
    selected_by: Callable[[Any], bool]
    fields: dict[str, Any]  # fixed config fields of this architecture
    # fields derived from args (args, source) -> fields, e.g. the experts of an MoE model
    derived: Callable[[Any, str], dict[str, Any]] | None = None


def _has_experts(args: Any) -> bool:
    return bool(getattr(args, "num_experts", None))


def moe_fields(args: Any, source: str) -> dict[str, Any]:
    """The experts as both MoE configs name them. Megatron's softmax router (top-k of the
    logits, then softmax over those k; ``moe_router_pre_softmax``: softmax over all experts,
    then top-k, not renormalised) is transformers' softmax -> top-k with (without)
    ``norm_topk_prob``; the refusals (``arg_policy``) keep every other routing option off."""
    experts = _int_arg(args, "num_experts", source)
    ffn = _int_arg(args, "moe_ffn_hidden_size", source, None) or _int_arg(
        args, "ffn_hidden_size", source
    )
    topk = _int_arg(args, "moe_router_topk", source, 2)
    return dict(
        num_local_experts=experts,  # Mixtral's name
        num_experts=experts,  # Qwen3-MoE's name
        num_experts_per_tok=topk,
        moe_intermediate_size=ffn,
        norm_topk_prob=not getattr(args, "moe_router_pre_softmax", False),
        decoder_sparse_step=1,
        mlp_only_layers=[],
        output_router_logits=False,
    )


def _mixtral_fields(args: Any, source: str) -> dict[str, Any]:
    moe = moe_fields(args, source)
    return {
        "num_local_experts": moe["num_local_experts"],
        "num_experts_per_tok": moe["num_experts_per_tok"],
        "intermediate_size": moe["moe_intermediate_size"],
        "output_router_logits": False,
    }


def _qwen3_moe_fields(args: Any, source: str) -> dict[str, Any]:
    moe = moe_fields(args, source)
    del moe["num_local_experts"]
    return moe


# First match wins; Llama is the default. Each has a mapping table in ``models/``.
ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "Qwen3MoeForCausalLM",
        Qwen3MoeConfig,
        lambda a: _has_experts(a) and bool(getattr(a, "qk_layernorm", False)),
        {"attention_bias": False, "use_sliding_window": False},
        _qwen3_moe_fields,
    ),
    Architecture(
        "MixtralForCausalLM",
        MixtralConfig,
        _has_experts,
        {"sliding_window": None},
        _mixtral_fields,
    ),
    Architecture(
        "Qwen3ForCausalLM",
        Qwen3Config,
        lambda a: bool(getattr(a, "qk_layernorm", False)),
        {"attention_bias": False, "use_sliding_window": False},
    ),
    Architecture(
        "Qwen2ForCausalLM",
        Qwen2Config,
        lambda a: bool(getattr(a, "add_qkv_bias", False)),
        {"use_sliding_window": False},  # q/k/v biases are always on in Qwen2
    ),
    Architecture(
        "LlamaForCausalLM",
        LlamaConfig,
        lambda a: True,
        {"attention_bias": False, "mlp_bias": False},
    ),
)

# Megatron's ``RotaryEmbedding._apply_scaling`` (Llama-3.x): only the factor comes from args
# (``--rope-scaling-factor``); these are fixed there.
MEGATRON_ROPE_FACTOR = 8.0  # GPTModel's rope_scaling_factor default
MEGATRON_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class ModelDims:
    """The dimensions the planner needs, derived from args (and confirmed against shapes)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    padded_vocab_size: int
    vocab_size: int
    tied_embeddings: bool
    num_experts: int = 0  # mixture of experts: routed experts per layer (0: dense MLP)
    moe_ffn_hidden_size: int = 0  # each expert's FFN size

    @classmethod
    def from_hf_config(cls, cfg: Any, padded_vocab_size: int) -> ModelDims:
        experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
        return cls(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            ffn_hidden_size=cfg.intermediate_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            padded_vocab_size=padded_vocab_size,
            vocab_size=cfg.vocab_size,
            tied_embeddings=bool(cfg.tie_word_embeddings),
            num_experts=experts or 0,
            moe_ffn_hidden_size=(
                getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
                if experts
                else 0
            ),
        )


def unsupported_args(
    args: Any, *, naming: Naming = "args", ignore: Collection[str] = ()
) -> list[str]:
    """Each name whose value the loader does not serve, as ``'name=value (meaning); ...'``.

    ``args``: a Megatron-LM ``args`` namespace (``naming="args"``), or Megatron-Bridge
    ``TransformerConfig`` fields as a namespace or mapping (``naming="transformer_config"``).
    The allow-list is :mod:`sglang_megatron_loader.arg_policy`; ``ignore`` names are not judged.
    """
    values = args if isinstance(args, Mapping) else vars(args)
    return policy_violations(values, naming, ignore)


def architecture_for(args: Any) -> Architecture:
    """The architecture that serves a checkpoint with these (supported) args."""
    return next(a for a in ARCHITECTURES if a.selected_by(args))


def rope_parameters(args: Any, source: str, *, honours_factor: bool = False) -> dict[str, Any]:
    """transformers ``rope_parameters``: the base, plus Llama-3.x scaling when trained with it.

    Megatron-LM's ``pretrain_gpt`` (``gpt_builders.py``, 0.14 to main) passes ``rope_scaling``
    to ``GPTModel`` but not ``--rope-scaling-factor``: such runs train with megatron-core's
    default factor, 8, whatever ``args.rope_scaling_factor`` records. Megatron-Bridge passes its
    ``rope_scaling_factor`` (``honours_factor``).
    """
    params: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": _float_arg(args, "rotary_base", source, 10000.0),
    }
    if getattr(args, "use_rope_scaling", False):
        params["rope_type"] = "llama3"
        recorded = _float_arg(args, "rope_scaling_factor", source, MEGATRON_ROPE_FACTOR)
        params["factor"] = recorded if honours_factor else MEGATRON_ROPE_FACTOR
        if recorded != params["factor"]:
            logger.warning(
                "%s: args.rope_scaling_factor is %g, but Megatron-LM's GPT builder never passes "
                "it to the model, which trained with the default factor %g: serving %g (what "
                "Megatron computed). Override with --json-model-override-args "
                "'{\"rope_parameters\": {...}}' if this run's code passed it.",
                source,
                recorded,
                MEGATRON_ROPE_FACTOR,
                MEGATRON_ROPE_FACTOR,
            )
        params.update(MEGATRON_LLAMA3_ROPE)
    return params


_REQUIRED: Any = object()


def _int_arg(args: Any, name: str, source: str, default: Any = _REQUIRED) -> Any:
    """``args.<name>`` as a positive int; ``default`` when absent (an error if none is given)."""
    value = getattr(args, name, None)
    if value is None:
        if default is _REQUIRED:
            raise CorruptCheckpointError(f"{source}: args lack {name}; cannot derive the model")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CorruptCheckpointError(
            f"{source}: args.{name} is {value!r}; expected a positive integer"
        )
    return value


def _float_arg(args: Any, name: str, source: str, default: float) -> float:
    value = getattr(args, name, None)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise CorruptCheckpointError(
            f"{source}: args.{name} is {value!r}; expected a positive number"
        )
    return float(value)


def megatron_dtype(args: Any) -> torch.dtype:
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return torch.float32


def hf_config_from_args(
    args: Any,
    *,
    source: str,
    overrides: dict[str, Any] | None = None,
    vocab: Vocab | None = None,
    refused: list[str] | None = None,
    honours_rope_factor: bool = False,
) -> PreTrainedConfig:
    """Build the HF config. ``overrides`` may set ``vocab_size`` and ``dtype`` (or any field).

    ``vocab``: the true vocabulary (:func:`~sglang_megatron_loader.vocab.resolve_vocab`, which
    knows the stored rows and the tokenizer); without it, ``args.vocab_size``, else the padded
    size with a warning. ``refused``: the refusals already computed for a config that is not
    Megatron-LM ``args`` (a Megatron-Bridge ``run_config.yaml``); default: those of ``args``.
    ``honours_rope_factor``: the writer passes ``rope_scaling_factor`` to the model (Bridge).
    """
    missing = [n for n in REQUIRED_ARGS if getattr(args, n, None) is None]
    if missing:
        raise CorruptCheckpointError(
            f"{source}: args lack {', '.join(missing)}; cannot derive the model"
        )
    refused = unsupported_args(args) if refused is None else refused
    if refused:
        raise UnsupportedCheckpointError(
            f"{source}: this checkpoint uses features the loader does not serve:\n  "
            + "\n  ".join(refused)
            + "\n(served: Llama-style GPT models, with qkv bias as Qwen2, with qk-layernorm as "
            "Qwen3; mixture of experts as Mixtral, with qk-layernorm as Qwen3-MoE)"
        )
    hidden = _int_arg(args, "hidden_size", source)
    heads = _int_arg(args, "num_attention_heads", source)
    gqa = getattr(args, "group_query_attention", False)
    kv_heads = _int_arg(args, "num_query_groups", source) if gqa else heads
    if vocab is None:
        padded = _int_arg(args, "padded_vocab_size", source, None)
        rows = padded or _int_arg(args, "vocab_size", source, None)
        if rows is None:
            raise CorruptCheckpointError(
                f"{source}: args have neither vocab_size nor padded_vocab_size; pass the "
                f"vocabulary size with {OVERRIDE_HINT}"
            )
        vocab = resolve_vocab(args, stored_rows=rows, tokenizer=None, override=None, source=source)
    dtype = megatron_dtype(args)
    arch = architecture_for(args)
    fields: dict[str, Any] = dict(
        architectures=[arch.name],
        num_hidden_layers=_int_arg(args, "num_layers", source),
        hidden_size=hidden,
        intermediate_size=_int_arg(args, "ffn_hidden_size", source, 4 * hidden),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=_int_arg(args, "kv_channels", source, hidden // heads),
        # --norm-epsilon is stored as layernorm_epsilon from Megatron-LM 0.16 on (norm_epsilon
        # before); Megatron-Bridge names it layernorm_epsilon too
        rms_norm_eps=_float_arg(
            args,
            "layernorm_epsilon"
            if getattr(args, "layernorm_epsilon", None) is not None
            else "norm_epsilon",
            source,
            1e-5,
        ),
        rope_parameters=rope_parameters(args, source, honours_factor=honours_rope_factor),
        max_position_embeddings=_int_arg(args, "max_position_embeddings", source, None)
        or _int_arg(args, "seq_length", source, 4096),
        vocab_size=vocab.size,
        tie_word_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        hidden_act="silu",
        bos_token_id=None,  # token ids belong to the tokenizer, which Megatron args lack
        eos_token_id=None,
        dtype=str(dtype).removeprefix("torch."),
        **arch.fields,
    )
    if arch.derived is not None:
        fields.update(arch.derived(args, source))
    fields.update(_normalise_overrides(overrides or {}, source))
    config = arch.config_class(**fields)
    config.megatron_padded_vocab_size = vocab.stored_rows
    config.megatron_vocab_origin = vocab.origin
    return config


def _normalise_overrides(overrides: dict[str, Any], source: str) -> dict[str, Any]:
    out = dict(overrides)
    if "torch_dtype" in out:
        out["dtype"] = out.pop("torch_dtype")
    if "dtype" in out:
        value = str(out["dtype"]).removeprefix("torch.")
        if value not in ("float32", "bfloat16", "float16"):
            raise UnsupportedCheckpointError(
                f"{source}: dtype override {out['dtype']!r}: expected float32, bfloat16 or float16"
            )
        out["dtype"] = value
    if "vocab_size" in out and (not isinstance(out["vocab_size"], int) or out["vocab_size"] <= 0):
        raise UnsupportedCheckpointError(
            f"{source}: vocab_size override {out['vocab_size']!r} is not a positive integer"
        )
    return out
