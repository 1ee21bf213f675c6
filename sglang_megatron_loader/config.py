"""Megatron training ``args`` -> the transformers config (Llama, Qwen2 or Qwen3) SGLang serves.

Every field comes from the checkpoint itself; nothing is typed by hand. The architecture is
picked from args by :data:`ARCHITECTURES`; features no architecture serves are refused with one
error listing every offending arg and its value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LlamaConfig, PreTrainedConfig, Qwen2Config, Qwen3Config

from sglang_megatron_loader.errors import CorruptCheckpointError, UnsupportedCheckpointError

REQUIRED_ARGS = ("num_layers", "hidden_size", "num_attention_heads")

# (arg, predicate that is True when the value is unsupported, what it means)
_REFUSALS: tuple[tuple[str, Any, str], ...] = (
    ("num_experts", lambda v: bool(v), "mixture-of-experts"),
    ("multi_latent_attention", lambda v: bool(v), "multi-latent attention (MLA)"),
    ("add_bias_linear", lambda v: bool(v), "biases on linear layers"),
    ("normalization", lambda v: v not in (None, "RMSNorm"), "normalization other than RMSNorm"),
    ("swiglu", lambda v: v is False, "MLP activation other than SwiGLU"),
    ("squared_relu", lambda v: bool(v), "squared-ReLU activation"),
    (
        "position_embedding_type",
        lambda v: v not in (None, "rope"),
        "position embedding other than RoPE",
    ),
    ("rotary_percent", lambda v: v is not None and float(v) != 1.0, "partial rotary embedding"),
    ("rotary_interleaved", lambda v: bool(v), "interleaved rotary embedding"),
    ("apply_layernorm_1p", lambda v: bool(v), "layernorm-1p (zero-centred gamma)"),
    ("apply_residual_connection_post_layernorm", lambda v: bool(v), "post-layernorm residual"),
    ("window_size", lambda v: v is not None, "sliding-window attention"),
    ("mtp_num_layers", lambda v: bool(v), "multi-token-prediction layers"),
    ("heterogeneous_layers_config_path", lambda v: bool(v), "heterogeneous layers"),
)

# Combinations of individually supported args that no SGLang architecture serves:
# (args, predicate over their values that is True when refused, why).
_COMBINED_REFUSALS: tuple[tuple[tuple[str, ...], Any, str], ...] = (
    (
        ("qk_layernorm", "add_qkv_bias"),
        lambda qk, bias: bool(qk) and bool(bias),
        "qk-layernorm with qkv bias: SGLang's Qwen3 (the qk-layernorm model) puts a bias on "
        "o_proj as well whenever it has qkv biases, and Megatron has none there",
    ),
)


@dataclass(frozen=True)
class Architecture:
    """An SGLang / transformers model class, its config class, and when args select it."""

    name: str
    config_class: type[PreTrainedConfig]
    selected_by: Callable[[Any], bool]
    fields: dict[str, Any]  # fixed config fields of this architecture


# First match wins; Llama is the default. Each has a mapping table in ``models/``.
ARCHITECTURES: tuple[Architecture, ...] = (
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

    @classmethod
    def from_hf_config(cls, cfg: Any, padded_vocab_size: int) -> ModelDims:
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
        )


def unsupported_args(args: Any) -> list[str]:
    """Each unsupported feature as ``'arg=value (meaning)'``."""
    out = []
    for name, bad, meaning in _REFUSALS:
        value = getattr(args, name, None)
        try:
            refused = bad(value)
        except (TypeError, ValueError):  # a value of the wrong type is not a supported one
            refused = True
        if refused:
            out.append(f"{name}={value!r} ({meaning})")
    for names, bad, meaning in _COMBINED_REFUSALS:
        values = [getattr(args, n, None) for n in names]
        if bad(*values):
            both = " with ".join(f"{n}={v!r}" for n, v in zip(names, values, strict=True))
            out.append(f"{both} ({meaning})")
    return out


def architecture_for(args: Any) -> Architecture:
    """The architecture that serves a checkpoint with these (supported) args."""
    return next(a for a in ARCHITECTURES if a.selected_by(args))


def rope_parameters(args: Any, source: str) -> dict[str, Any]:
    """transformers ``rope_parameters``: the base, plus Llama-3.x scaling when trained with it."""
    params: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": _float_arg(args, "rotary_base", source, 10000.0),
    }
    if getattr(args, "use_rope_scaling", False):
        params["rope_type"] = "llama3"
        params["factor"] = _float_arg(args, "rope_scaling_factor", source, 8.0)
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
    args: Any, *, source: str, overrides: dict[str, Any] | None = None
) -> PreTrainedConfig:
    """Build the HF config. ``overrides`` may set ``vocab_size`` and ``dtype`` (or any field)."""
    missing = [n for n in REQUIRED_ARGS if getattr(args, n, None) is None]
    if missing:
        raise CorruptCheckpointError(
            f"{source}: args lack {', '.join(missing)}; cannot derive the model"
        )
    refused = unsupported_args(args)
    if refused:
        raise UnsupportedCheckpointError(
            f"{source}: this checkpoint uses features the loader does not serve:\n  "
            + "\n  ".join(refused)
            + "\n(served: Llama-style GPT models, with qkv bias as Qwen2, with qk-layernorm as "
            "Qwen3)"
        )
    hidden = _int_arg(args, "hidden_size", source)
    heads = _int_arg(args, "num_attention_heads", source)
    gqa = getattr(args, "group_query_attention", False)
    kv_heads = _int_arg(args, "num_query_groups", source) if gqa else heads
    padded = _int_arg(args, "padded_vocab_size", source, None)
    vocab = _int_arg(args, "vocab_size", source, None) or padded
    if vocab is None:
        raise CorruptCheckpointError(
            f"{source}: args have neither vocab_size nor padded_vocab_size; pass the vocabulary "
            "size with --json-model-override-args '{\"vocab_size\": N}'"
        )
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
        rms_norm_eps=_float_arg(args, "norm_epsilon", source, 1e-5),
        rope_parameters=rope_parameters(args, source),
        max_position_embeddings=_int_arg(args, "max_position_embeddings", source, None)
        or _int_arg(args, "seq_length", source, 4096),
        vocab_size=vocab,
        tie_word_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        hidden_act="silu",
        bos_token_id=None,  # token ids belong to the tokenizer, which Megatron args lack
        eos_token_id=None,
        dtype=str(dtype).removeprefix("torch."),
        **arch.fields,
    )
    fields.update(_normalise_overrides(overrides or {}, source))
    config = arch.config_class(**fields)
    config.megatron_padded_vocab_size = int(padded or vocab)
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
