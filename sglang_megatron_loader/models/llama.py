"""Llama family: Megatron GPTModel (RMSNorm, SwiGLU, GQA, RoPE) <-> SGLang ``LlamaForCausalLM``.

The Qwen2 and Qwen3 tables (``qwen.py``) are this one plus their extra tensors.

Pure data. ``{}`` stands for the layer index. Each source lists the key names a checkpoint may
use (Transformer Engine and local specs store the first; the second is the local-spec module
name, kept for checkpoints saved without the key map).
"""

from sglang_megatron_loader.config import ModelDims
from sglang_megatron_loader.models.rules import (
    QKV,
    GatedMLP,
    Replicated,
    RowParallel,
    VocabParallel,
)
from sglang_megatron_loader.models.table import Mapping, ModelTable

LLAMA = ModelTable(
    name="llama",
    architecture="LlamaForCausalLM",
    layer_prefix="decoder.layers.",
    per_layer=(
        Mapping(
            "model.layers.{}.input_layernorm.weight",
            ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
            Replicated(),
        ),
        Mapping(
            "model.layers.{}.self_attn.qkv_proj.weight",
            ("self_attention.linear_qkv.weight",),
            QKV(),
        ),
        Mapping(
            "model.layers.{}.self_attn.o_proj.weight",
            ("self_attention.linear_proj.weight",),
            RowParallel("attention"),
        ),
        Mapping(
            "model.layers.{}.post_attention_layernorm.weight",
            ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
            Replicated(),
        ),
        Mapping("model.layers.{}.mlp.gate_up_proj.weight", ("mlp.linear_fc1.weight",), GatedMLP()),
        Mapping(
            "model.layers.{}.mlp.down_proj.weight", ("mlp.linear_fc2.weight",), RowParallel("ffn")
        ),
    ),
    global_=(
        Mapping(
            "model.embed_tokens.weight", ("embedding.word_embeddings.weight",), VocabParallel()
        ),
        Mapping("model.norm.weight", ("decoder.final_layernorm.weight",), Replicated()),
        Mapping("lm_head.weight", ("output_layer.weight",), VocabParallel(), untied_only=True),
    ),
    # Deliberately not loaded: Transformer Engine / local-spec extra state, optimizer state
    # (plain, distributed or chained), RNG and rerun-machine state, common state.
    ignored=(
        r"(^|\.)_extra_state(/|$)",
        r"(^|\.)optimizer\.",
        r"^chained_\d+\.",
        r"^rng_state",
        r"^rerun_state_machine",
        r"^common_state/",
    ),
)


def hf_parts(name: str, dims: ModelDims) -> tuple[tuple[str, int], ...]:
    """SGLang parameter -> its Hugging Face tensors as ``(hf_name, rows)`` in row order.

    Undoes SGLang's ``stacked_params_mapping`` (q/k/v -> qkv_proj, weight and bias alike;
    gate/up -> gate_up_proj) and drops SGLang's vocab padding rows, so exports hold exactly
    ``vocab_size`` rows. Shared by every table (Qwen2/Qwen3 keep Llama's names).
    """
    module, _, leaf = name.rpartition(".")  # leaf: weight or bias
    stem, _, fused = module.rpartition(".")
    if fused == "qkv_proj":
        kv = dims.num_kv_heads * dims.head_dim
        return (
            (f"{stem}.q_proj.{leaf}", dims.num_heads * dims.head_dim),
            (f"{stem}.k_proj.{leaf}", kv),
            (f"{stem}.v_proj.{leaf}", kv),
        )
    if fused == "gate_up_proj":
        f = dims.ffn_hidden_size
        return ((f"{stem}.gate_proj.{leaf}", f), (f"{stem}.up_proj.{leaf}", f))
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return ((name, dims.vocab_size),)
    return ((name, -1),)  # -1: all rows
