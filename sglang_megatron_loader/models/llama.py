"""Llama family: Megatron GPTModel (RMSNorm, SwiGLU, GQA, RoPE) <-> SGLang ``LlamaForCausalLM``.

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

    Undoes SGLang's ``stacked_params_mapping`` (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and
    drops SGLang's vocab padding rows, so exports hold exactly ``vocab_size`` rows.
    """
    qkv, gate_up = "self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"
    if name.endswith(qkv):
        base, kv = name.removesuffix(qkv), dims.num_kv_heads * dims.head_dim
        return (
            (base + "self_attn.q_proj.weight", dims.num_heads * dims.head_dim),
            (base + "self_attn.k_proj.weight", kv),
            (base + "self_attn.v_proj.weight", kv),
        )
    if name.endswith(gate_up):
        base, f = name.removesuffix(gate_up), dims.ffn_hidden_size
        return ((base + "mlp.gate_proj.weight", f), (base + "mlp.up_proj.weight", f))
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return ((name, dims.vocab_size),)
    return ((name, -1),)  # -1: all rows
