"""Llama family: Megatron GPTModel (RMSNorm, SwiGLU, GQA, RoPE) <-> SGLang ``LlamaForCausalLM``.

Pure data. ``{}`` stands for the layer index. Each source lists the key names a checkpoint may
use (Transformer Engine and local specs store the first; the second is the local-spec module
name, kept for checkpoints saved without the key map).
"""

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
