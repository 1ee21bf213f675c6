"""What in a Megatron config shapes the forward, and what the loader does about each name.

An allow-list: every megatron-core ``TransformerConfig`` field (0.14-0.19), Megatron-LM argument
(``megatron/training/arguments.py`` and ModelOpt's ``post_training/arguments.py``, 0.14-0.19)
and Megatron-Bridge ``GPTModelProvider`` field is in exactly one class:

- :data:`SERVED`: the config builder implements it, for the values ``accepts`` admits;
- :data:`REFUSED`: changes the forward in a way no served architecture has; fine only at its
  default (``fine``), refused by name and value otherwise;
- :data:`~sglang_megatron_loader.arg_names.GATED`: only shapes a feature that a served or
  refused name turns on (MoE, MLA, Mamba, MTP, YaRN ...), so it never needs a check of its own;
- :data:`~sglang_megatron_loader.arg_names.IRRELEVANT`: training or runtime only.

A name in no class is refused unless its value is off (None, False, 0, empty): a newer release
cannot slip a math change past the loader. ``ignore`` lets a user serve named ones anyway.
Two namings: Megatron-LM ``args`` and ``TransformerConfig`` fields (Megatron-Bridge's
``run_config.yaml``, where callables, dtypes and enums are ``{_target_: ...}`` mappings).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sglang_megatron_loader.arg_names import GATED, IRRELEVANT, IRRELEVANT_PREFIXES
from sglang_megatron_loader.checkpoint.safe_pickle import MegatronPlaceholder

Naming = Literal["args", "transformer_config"]
SILU = "torch.nn.functional.silu"


@dataclass(frozen=True)
class Served:
    """Implemented by the config builder (``config.py``) for the values ``accepts`` admits."""

    meaning: str
    accepted: str
    accepts: Callable[[Any], bool]


@dataclass(frozen=True)
class Refused:
    """Changes the forward beyond what is served: fine only at ``fine`` (its defaults)."""

    meaning: str
    fine: tuple[Any, ...]
    also_fine: Callable[[Any], bool] | None = None  # values equivalent to the default

    def admits(self, value: Any) -> bool:
        if any(_same(value, f) for f in self.fine):
            return True
        return self.also_fine is not None and self.also_fine(value)


@dataclass(frozen=True)
class Combined:
    """Individually served names that no architecture serves together."""

    names: tuple[str, ...]
    refused_when: Callable[..., bool]
    meaning: str


def target_name(value: Any) -> str | None:
    """The qualified name a callable, dtype or enum stands for, in either naming.

    ``{_target_: torch.nn.functional.silu, _call_: false}`` (Bridge YAML), a live function,
    ``torch.bfloat16``, an enum member or an unpickled :class:`MegatronPlaceholder`.
    """
    if isinstance(value, Mapping):
        target = value.get("_target_")
        if not isinstance(target, str):
            return None
        name = value.get("_name_")  # Megatron's YAML enum representer
        return f"{target}.{name}" if isinstance(name, str) else target
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, enum.Enum):
        cls = type(value)
        return f"{cls.__module__}.{cls.__qualname__}.{value.name}"
    if isinstance(value, MegatronPlaceholder):
        return f"{value._qualname}({', '.join(map(repr, getattr(value, 'args', ())))})"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return None


def _same(value: Any, fine: Any) -> bool:
    """``value == fine``, never raising, None only matching None."""
    if fine is None or value is None:
        return value is fine
    try:
        return (value == fine) is True
    except Exception:  # an exotic value (a tensor, an object) is not a default
        return False


def is_off(value: Any) -> bool:
    """None, False, 0, 0.0, '', 'none', or an empty container: a feature left off."""
    if value is None or value is False:
        return True
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value == 0
    if isinstance(value, str):
        return value.strip().lower() in ("", "none")
    if isinstance(value, list | tuple | set | frozenset | dict):
        return len(value) == 0
    return False


def _any(_: Any) -> bool:
    return True


def _one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda v: any(_same(v, f) for f in values)


def _is_bool(v: Any) -> bool:
    return v is None or isinstance(v, bool)


def _each(names: str, rule: Any) -> dict[str, Any]:
    return dict.fromkeys(names.split(), rule)


def _served(meaning: str, accepted: str = "any value", accepts: Callable[[Any], bool] = _any):
    return Served(meaning, accepted, accepts)


_BOOL = "True or False"
_DIM = "the model's dimensions; any value (the config builder validates it)"
_VOCAB = "the vocabulary size (resolved with the tokenizer and the stored rows)"
_BRIDGE_PROVIDER = re.compile(
    r"megatron\.bridge\.models\.[\w.]+\."
    r"(GPTModelProvider|(Code)?Llama(2|3|31|32)?ModelProvider\w*|Qwen(2|25|3)ModelProvider\w*"
    r"|Qwen3MoEModelProvider\w*)"
)
_BRIDGE_SPECS = {
    f"megatron.bridge.models.gpt_provider.{name}"
    for name in (
        "default_layer_spec",
        "transformer_engine_layer_spec",
        "transformer_engine_full_layer_spec",
        "local_layer_spec",
    )
}

# The config builder (config.py ``hf_config_from_args``) reads these; ``accepts`` is what it
# serves. None is accepted where an old args namespace may lack the name.
SERVED: dict[str, Served] = {
    **_each(
        "num_layers hidden_size ffn_hidden_size num_attention_heads num_query_groups kv_channels "
        "group_query_attention",
        _served(_DIM),
    ),
    # --norm-epsilon's dest: norm_epsilon up to Megatron-LM 0.15, layernorm_epsilon from 0.16
    **_each("norm_epsilon layernorm_epsilon", _served("RMSNorm epsilon")),
    "normalization": _served(
        "normalization other than RMSNorm", "'RMSNorm'", _one_of(None, "RMSNorm")
    ),
    "swiglu": _served("MLP activation other than SwiGLU", "True", _one_of(None, True)),
    "gated_linear_unit": _served("MLP without a gated linear unit", "True", _one_of(None, True)),
    "activation_func": _served(
        "MLP activation other than SiLU",
        SILU + " (with gated_linear_unit: SwiGLU)",
        lambda v: target_name(v) == SILU,
    ),
    "add_bias_linear": _served("biases on linear layers", "False", _one_of(None, False)),
    "add_qkv_bias": _served("q/k/v biases (served as Qwen2)", _BOOL, _is_bool),
    "qk_layernorm": _served("q/k RMSNorm (served as Qwen3)", _BOOL, _is_bool),
    "position_embedding_type": _served(
        "position embedding other than RoPE", "'rope'", _one_of(None, "rope")
    ),
    "rotary_percent": _served("partial rotary embedding", "1.0", _one_of(None, 1.0)),
    "rotary_base": _served("RoPE base (rope_theta)"),
    **_each("use_rope_scaling rope_scaling", _served("Llama-3.x RoPE scaling", _BOOL, _is_bool)),
    # Megatron-Bridge passes its field to GPTModel; Megatron-LM's GPT builders (core_v0.14.0-
    # core_r0.19.0) never pass --rope-scaling-factor, so those runs trained with GPTModel's 8.0.
    "rope_scaling_factor": _served("Llama-3.x RoPE scaling factor"),
    **_each("max_position_embeddings seq_length", _served("context length")),
    **_each(
        "vocab_size padded_vocab_size make_vocab_size_divisible_by should_pad_vocab pad_vocab_size",
        _served(_VOCAB),
    ),
    "untie_embeddings_and_output_weights": _served("untied output layer", _BOOL, _is_bool),
    "share_embeddings_and_output_weights": _served("tied output layer", _BOOL, _is_bool),
    **_each("bf16 fp16", _served("serving dtype", _BOOL, _is_bool)),
    "_target_": _served(
        "Megatron-Bridge model provider",
        "GPTModelProvider, a Llama/Qwen2/Qwen3 dense provider or the Qwen3-MoE provider",
        lambda v: isinstance(v, str) and _BRIDGE_PROVIDER.fullmatch(v) is not None,
    ),
    # mixture of experts (config.py ``moe_fields``; served as Mixtral, with qk-layernorm as
    # Qwen3-MoE): the softmax top-k router, optionally softmax before top-k (not renormalised)
    "num_experts": _served("mixture of experts", "None or a count"),
    # its TransformerConfig name (Megatron-Bridge's run_config.yaml; checkpoint/bridge.py
    # hands it to the config builder as num_experts); every other MoE name is the same in both
    "num_moe_experts": _served("mixture of experts", "None or a count"),
    "moe_ffn_hidden_size": _served(_DIM),
    "moe_router_topk": _served("experts per token (top-k)"),
    "moe_router_pre_softmax": _served(
        "softmax over all experts before top-k (served: norm_topk_prob=False)", _BOOL, _is_bool
    ),
    "moe_router_score_function": _served(
        "router score function other than softmax", "'softmax'", _one_of(None, "softmax")
    ),
    "moe_router_topk_scaling_factor": _served(
        "scaling of the routing weights", "None or 1.0", _one_of(None, 1, 1.0)
    ),
    "moe_layer_freq": _served(
        "dense layers between MoE layers", "1 (every layer MoE)", lambda v: _every_layer_moe(v)
    ),
    "moe_grouped_gemm": _served(
        "grouped-GEMM experts (stored like SequentialMLP's)", _BOOL, _is_bool
    ),
    "moe_router_load_balancing_type": _served(
        "router load balancing that changes routing (Sinkhorn)",
        "a loss-only balancing: aux_loss, seq_aux_loss, global_aux_loss or none",
        lambda v: _loss_only_balancing(v),
    ),
    "transformer_layer_spec": _served(
        "Megatron-Bridge layer spec",
        "one of Bridge's standard GPT specs (" + ", ".join(sorted(_BRIDGE_SPECS)) + ")",
        lambda v: target_name(v) in _BRIDGE_SPECS,
    ),
}


def _every_layer_moe(value: Any) -> bool:
    """``moe_layer_freq`` 1, or a per-layer pattern of 1s (Megatron-LM may store it as text)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
        return True
    if isinstance(value, str):
        return bool(re.fullmatch(r"\s*\(?\s*\[\s*1\s*\]\s*\*\s*\d+\s*\)?\s*|1", value))
    return isinstance(value, list | tuple) and len(value) > 0 and all(x == 1 for x in value)


def _loss_only_balancing(value: Any) -> bool:
    loss_only = (None, "aux_loss", "seq_aux_loss", "global_aux_loss", "none")
    if isinstance(value, list | tuple):
        return all(v in loss_only for v in value)
    return value in loss_only


# What a TransformerConfig / GPTModelProvider without the field means (its default): a
# Megatron-Bridge config always writes every field, so a missing one is judged at its default.
TRANSFORMER_CONFIG_DEFAULTS: dict[str, Any] = {
    "normalization": "LayerNorm",
    "gated_linear_unit": False,
    "activation_func": {"_target_": "torch.nn.functional.gelu", "_call_": False},
    "add_bias_linear": True,
    "position_embedding_type": "learned_absolute",
}


def _refuse(meaning: str, *fine: Any, also_fine: Callable[[Any], bool] | None = None) -> Refused:
    return Refused(meaning, fine or (None, False), also_fine)


def _all_zero(v: Any) -> bool:  # no_rope_freq as a per-layer pattern without a no-RoPE layer
    return isinstance(v, list | tuple) and all(x == 0 for x in v)


_ROUTING = "MoE routing other than softmax top-k"
_HYBRID = _refuse("hybrid Mamba / linear-attention layers", None, False, 0, 0.0)
_QUANT = "quantized model (ModelOpt / kitchen): the forward is not the stored weights' plain matmul"

REFUSED: dict[str, Refused] = {
    # architecture
    # mixture of experts beyond the served softmax top-k router over routed experts
    "moe_shared_expert_intermediate_size": _refuse("shared experts", None, 0),
    "moe_shared_expert_gate": _refuse("gated shared experts"),
    "use_grouped_gemm_for_shared_expert": _refuse("shared experts"),
    "moe_shared_expert_glu_interleave_size": _refuse("shared experts, interleaved GLU", None, 0),
    "moe_router_enable_expert_bias": _refuse(_ROUTING + ": expert bias (aux-loss-free)"),
    "moe_router_num_groups": _refuse(_ROUTING + ": group-limited routing", None, 0, 1),
    "moe_router_group_topk": _refuse(_ROUTING + ": group-limited routing", None, 0),
    "moe_router_topk_limited_devices": _refuse(_ROUTING + ": device-limited routing", None, 0),
    "moe_router_force_load_balancing": _refuse(_ROUTING + ": forced (random) routing"),
    "moe_router_force_biased": _refuse(_ROUTING + ": forced biased routing", None, 0, 0.0),
    "moe_input_jitter_eps": _refuse(_ROUTING + ": input jitter", None, 0, 0.0),
    "moe_apply_probs_on_input": _refuse("routing weights applied to the expert input"),
    "export_moe_apply_probs_on_input": _refuse("routing weights applied to the expert input"),
    "moe_latent_size": _refuse("latent MoE (experts in a projected space)", None, 0),
    "moe_mlp_glu_interleave_size": _refuse("experts' fc1 with interleaved gate/up", None, 0),
    "moe_single_grouped_weight": _refuse("experts stored as one grouped weight"),
    "moe_single_grouped_bias": _refuse("experts stored as one grouped bias"),
    "use_fused_weighted_squared_relu": _refuse("squared-ReLU experts"),
    "multi_latent_attention": _refuse("multi-latent attention (MLA)"),
    "experimental_attention_variant": _refuse("experimental attention (gated delta net, DSA)"),
    "linear_attention_freq": _refuse("linear-attention layers"),
    "is_hybrid_model": _HYBRID,
    "hybrid_layer_pattern": _HYBRID,
    "hybrid_override_pattern": _HYBRID,
    "hybrid_attention_ratio": _HYBRID,
    "hybrid_mlp_ratio": _HYBRID,
    "heterogeneous_block_specs": _refuse("heterogeneous (per-layer) block specs"),
    "hetereogenous_dist_checkpoint": _refuse("heterogeneous (per-layer) block specs"),
    "heterogeneous_layers_config_path": _refuse("heterogeneous layers"),
    "heterogeneous_layers_config_encoded_json": _refuse("heterogeneous layers"),
    "spec": _refuse("a custom layer spec module"),
    "use_legacy_models": _refuse("Megatron-LM legacy (non-mcore) model"),
    "retro_add_retriever": _refuse("RETRO retrieval model"),
    "mtp_num_layers": _refuse("multi-token-prediction layers", None, 0),
    "mtp_enabled": _refuse("multi-token-prediction layers"),
    "attention_chunk_size": _refuse("chunked (Llama-4) attention"),
    "nope_layer_interval": _refuse("layers without RoPE (Llama-4)"),
    # attention math
    "softmax_type": _refuse(
        "attention softmax other than vanilla (off-by-one, learnable sinks)", "vanilla", None
    ),
    "softmax_scale": _refuse("custom attention softmax scale (1/sqrt(head_dim) is served)"),
    "qk_l2_norm": _refuse("Llama-4 style L2 norm of q and k"),
    "export_qk_l2_norm": _refuse("Llama-4 style L2 norm of q and k"),
    "attention_output_gate": _refuse("gated attention output"),
    "window_size": _refuse("sliding-window attention"),
    "apply_residual_connection_post_layernorm": _refuse("post-layernorm residual"),
    # norms and MLP
    "apply_layernorm_1p": _refuse("layernorm-1p (zero-centred gamma)"),
    "layernorm_zero_centered_gamma": _refuse("layernorm-1p (zero-centred gamma)"),  # 0.16+ dest
    "squared_relu": _refuse("squared-ReLU activation"),
    "openai_gelu": _refuse("GeLU activation"),
    "quick_geglu": _refuse("quick-GeGLU activation"),
    "glu_linear_offset": _refuse("offset in the GLU: act(x0) * (x1 + offset)", 0.0, None),
    "activation_func_clamp_value": _refuse("clamped MLP activation"),
    # positions
    "rotary_interleaved": _refuse("interleaved rotary embedding"),
    "no_rope_freq": _refuse("layers without RoPE", also_fine=_all_zero),
    "rope_type": _refuse("rotary embedding other than plain RoPE", None, "rope"),
    "rotary_seq_len_interpolation_factor": _refuse(
        "linear RoPE position interpolation", None, 1, 1.0
    ),
    "seq_len_interpolation_factor": _refuse("linear RoPE position interpolation", None, 1, 1.0),
    # scaled parameterisations
    "use_mup": _refuse("muP scaling (embedding, attention and logit multipliers)"),
    "mup_output_mult": _refuse("muP logit multiplier", 1.0, None),
    "mup_embedding_mult": _refuse("muP embedding multiplier", 1.0, None),
    # quantization: the stored weights are not what the trained forward multiplied by
    "use_kitchen": _refuse(_QUANT),
    "use_kitchen_attention": _refuse(_QUANT),
    "kitchen_config_file": _refuse(_QUANT),
    "kitchen_recipe_number": _refuse(_QUANT),
    "quant_recipe": _refuse(_QUANT),
    "restore_modelopt_state": _refuse(_QUANT),
    "modelopt_enabled": _refuse(_QUANT),
    "export_quant_cfg": _refuse(_QUANT),
    "export_real_quant_cfg": _refuse(_QUANT, None, "None"),
    "export_kv_cache_quant": _refuse("quantized KV cache", None, "none"),
    "export_model_type": _refuse("ModelOpt model type other than GPTModel", None, "GPTModel"),
    "export_offline_model": _refuse("model without decoder layers (ModelOpt offline)"),
    "enable_gpt_oss": _refuse("GPT-OSS (YaRN, attention sinks)"),
}


def _moe_combined(experts: str) -> tuple[Combined, ...]:
    """The MoE combinations, for ``experts`` = the expert count's name in one naming."""
    return (
        Combined(
            (experts, "add_qkv_bias"),
            lambda experts, bias: bool(experts) and bool(bias),
            "mixture of experts with qkv bias: neither Mixtral nor Qwen3-MoE has q/k/v biases",
        ),
        Combined(
            (experts, "moe_router_pre_softmax", "qk_layernorm"),
            lambda experts, pre, qk: bool(experts) and bool(pre) and not qk,
            "softmax before top-k without qk-layernorm: served as Mixtral, which always "
            "renormalises the top-k weights (only Qwen3-MoE, with qk-layernorm, serves it)",
        ),
    )


# Served names each fine on its own that no architecture serves together.
COMBINED: tuple[Combined, ...] = (
    *_moe_combined("num_experts"),  # Megatron-LM args
    *_moe_combined("num_moe_experts"),  # TransformerConfig (Megatron-Bridge)
    Combined(
        ("qk_layernorm", "add_qkv_bias"),
        lambda qk, bias: bool(qk) and bool(bias),
        "qk-layernorm with qkv bias: SGLang's Qwen3 (the qk-layernorm model) puts a bias on "
        "o_proj as well whenever it has qkv biases, and Megatron has none there",
    ),
)


def classification(name: str) -> str | None:
    """'served', 'refused', 'gated', 'irrelevant' (by name or by prefix), or None: unknown."""
    if name in SERVED:
        return "served"
    if name in REFUSED:
        return "refused"
    if name in GATED:
        return "gated"
    if name in IRRELEVANT or name.startswith(IRRELEVANT_PREFIXES):
        return "irrelevant"
    return None


def show(value: Any) -> str:
    """A value as the message shows it: Python repr, or the name a callable/enum spec names."""
    target = target_name(value)
    return f"<{target}>" if target is not None else repr(value)


def _violation(name: str, value: Any) -> str | None:
    if name in SERVED:
        rule = SERVED[name]
        try:
            ok = rule.accepts(value)
        except (TypeError, ValueError):  # a value of the wrong type is not a served one
            ok = False
        return None if ok else f"{name}={show(value)} ({rule.meaning}); served: {rule.accepted}"
    if name in REFUSED:
        rule = REFUSED[name]
        if rule.admits(value):
            return None
        fine = " or ".join(show(f) for f in rule.fine)
        return f"{name}={show(value)} ({rule.meaning}); accepted: {fine}"
    if classification(name) is None and not is_off(value):
        return (
            f"{name}={show(value)} (unknown to this loader (newer Megatron?), so it may change the "
            "forward); accepted: off (None, False, 0); serve anyway with ignore_args"
        )
    return None


def policy_violations(
    values: Mapping[str, Any], naming: Naming = "args", ignore: Collection[str] = ()
) -> list[str]:
    """One message per name whose value the loader does not serve: ``'name=value (meaning);
    served: ...'`` or ``'...; accepted: ...'``. ``ignore``: names not to judge (user override)."""
    if naming not in ("args", "transformer_config"):
        raise ValueError(f"naming must be 'args' or 'transformer_config', not {naming!r}")
    values = dict(values)
    if naming == "transformer_config":
        values = {**TRANSFORMER_CONFIG_DEFAULTS, **values}
    ignored = set(ignore)
    out = [
        msg
        for name, value in values.items()
        if name not in ignored and (msg := _violation(name, value)) is not None
    ]
    for rule in COMBINED:
        if ignored.intersection(rule.names) or not all(n in values for n in rule.names):
            continue
        got = [values[n] for n in rule.names]
        if rule.refused_when(*got):
            both = " with ".join(f"{n}={show(v)}" for n, v in zip(rule.names, got, strict=True))
            out.append(f"{both} ({rule.meaning})")
    return out
