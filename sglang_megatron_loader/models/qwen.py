"""Qwen2 and Qwen3 families: the Llama table plus the tensors that set them apart.

* Qwen2 (``add_qkv_bias``): ``linear_qkv.bias``, grouped per query group like the weight, ->
  SGLang ``qkv_proj.bias`` ``[q; k; v]``, sharded like the weight.
* Qwen3 (``qk_layernorm``): RMSNorm weights over the head dim, applied to each q and k head
  before RoPE -> ``q_norm`` / ``k_norm``, replicated on every rank.

Pure data. ``{}`` stands for the layer index.
"""

import dataclasses

from sglang_megatron_loader.models.llama import LLAMA
from sglang_megatron_loader.models.rules import QKV, Replicated
from sglang_megatron_loader.models.table import Mapping

QWEN2 = dataclasses.replace(
    LLAMA,
    name="qwen2",
    architecture="Qwen2ForCausalLM",
    per_layer=LLAMA.per_layer
    + (
        Mapping(
            "model.layers.{}.self_attn.qkv_proj.bias",
            ("self_attention.linear_qkv.bias",),
            QKV(bias=True),
        ),
    ),
)

QWEN3 = dataclasses.replace(
    LLAMA,
    name="qwen3",
    architecture="Qwen3ForCausalLM",
    per_layer=LLAMA.per_layer
    + (
        Mapping(
            "model.layers.{}.self_attn.q_norm.weight",
            ("self_attention.q_layernorm.weight",),
            Replicated("head_dim"),
        ),
        Mapping(
            "model.layers.{}.self_attn.k_norm.weight",
            ("self_attention.k_layernorm.weight",),
            Replicated("head_dim"),
        ),
    ),
)
