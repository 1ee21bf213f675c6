"""Megatron args -> the transformers config (Llama, Qwen2, Qwen3), from the args real
checkpoints stored."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen3Config

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.config import (
    hf_config_from_args,
    unsupported_args,
)
from sglang_megatron_loader.errors import UnsupportedCheckpointError
from sglang_megatron_loader.models import table_for


@pytest.fixture(scope="module")
def stored_args(megatron_ckpt):
    with MegatronCheckpoint(megatron_ckpt("fp32_tp1")) as ckpt:
        return ckpt.args


def test_config_fields_come_from_args(stored_args) -> None:
    a = stored_args
    c = hf_config_from_args(a, source="x")
    assert c.architectures == ["LlamaForCausalLM"]
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (
        a.num_layers,
        a.hidden_size,
        a.ffn_hidden_size,
    )
    assert (c.num_attention_heads, c.num_key_value_heads) == (
        a.num_attention_heads,
        a.num_query_groups,
    )
    assert c.head_dim == (a.kv_channels or a.hidden_size // a.num_attention_heads)
    assert c.rms_norm_eps == a.layernorm_epsilon  # --norm-epsilon's dest since Megatron-LM 0.16
    assert c.max_position_embeddings == a.max_position_embeddings
    assert c.tie_word_embeddings == (not a.untie_embeddings_and_output_weights)
    # a run with a Hugging Face tokenizer records no args.vocab_size: without the tokenizer,
    # every stored row is served (with a warning; see test_vocab.py)
    assert a.vocab_size is None
    assert c.vocab_size == c.megatron_padded_vocab_size == a.padded_vocab_size
    assert c.dtype in ("float32", torch.float32)


def test_bf16_args_and_overrides(stored_args) -> None:
    a = copy.copy(stored_args)
    a.bf16 = True
    assert str(hf_config_from_args(a, source="x").dtype).endswith("bfloat16")
    c = hf_config_from_args(a, source="x", overrides={"dtype": "float32", "vocab_size": 200})
    assert str(c.dtype).endswith("float32") and c.vocab_size == 200
    with pytest.raises(UnsupportedCheckpointError, match="dtype override 'int8'"):
        hf_config_from_args(a, source="x", overrides={"dtype": "int8"})


def test_group_query_attention_off_means_mha(stored_args) -> None:
    a = copy.copy(stored_args)
    a.group_query_attention = False
    assert hf_config_from_args(a, source="x").num_key_value_heads == a.num_attention_heads


def test_every_unsupported_feature_is_listed_in_one_error(stored_args) -> None:
    a = copy.copy(stored_args)
    a.num_experts, a.qk_layernorm, a.normalization, a.rotary_interleaved = (
        8,
        True,
        "LayerNorm",
        True,
    )
    a.add_qkv_bias = True
    with pytest.raises(UnsupportedCheckpointError) as err:
        hf_config_from_args(a, source="ckpt/iter_0000010")
    msg = str(err.value)
    for part in (
        "num_experts=8",
        "qk_layernorm=True with add_qkv_bias=True",
        "normalization='LayerNorm'",
        "rotary_interleaved=True",
        "ckpt/iter_0000010",
    ):
        assert part in msg


# -- architecture and variant args, each mapped to its config field ----------------------------


def _args_of(megatron_ckpt, variant: str):
    with MegatronCheckpoint(megatron_ckpt(variant)) as ckpt:
        return ckpt.args


def test_rope_scaling_args_map_to_llama3_rope_parameters(megatron_ckpt) -> None:
    a = _args_of(megatron_ckpt, "rope_scaling_fp32_tp1")
    assert a.use_rope_scaling and a.rope_scaling_factor == 32.0
    c = hf_config_from_args(a, source="x")
    assert c.architectures == ["LlamaForCausalLM"]
    # Megatron's RotaryEmbedding._apply_scaling: only the factor is an arg, and Megatron-LM's
    # GPT builder does not pass it: the run trained with the default 8 (the reference logits
    # come from the model built that way)
    assert c.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": float(a.rotary_base),
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    b = copy.copy(a)
    del b.rope_scaling_factor  # Megatron's default factor
    assert hf_config_from_args(b, source="x").rope_parameters["factor"] == 8.0
    # a writer that passes the factor (Megatron-Bridge) is served with it
    honoured = hf_config_from_args(a, source="x", honours_rope_factor=True)
    assert honoured.rope_parameters["factor"] == 32.0
    b.use_rope_scaling = False
    assert hf_config_from_args(b, source="x").rope_parameters == {
        "rope_type": "default",
        "rope_theta": float(a.rotary_base),
    }


def test_rotary_base_and_norm_epsilon(stored_args) -> None:
    a = copy.copy(stored_args)
    a.rotary_base, a.layernorm_epsilon = 500000, 1e-6
    c = hf_config_from_args(a, source="x")
    assert c.rope_parameters["rope_theta"] == 500000.0 and c.rms_norm_eps == 1e-6
    # Megatron-LM <= 0.15 stored --norm-epsilon as norm_epsilon
    del a.layernorm_epsilon
    a.norm_epsilon = 1e-4
    assert hf_config_from_args(a, source="x").rms_norm_eps == 1e-4


def test_qkv_bias_maps_to_qwen2(megatron_ckpt) -> None:
    a = _args_of(megatron_ckpt, "qkv_bias_fp32_tp2")
    c = hf_config_from_args(a, source="x")
    assert isinstance(c, Qwen2Config) and c.architectures == ["Qwen2ForCausalLM"]
    assert c.tie_word_embeddings is True and c.use_sliding_window is False
    assert c.head_dim == a.kv_channels  # Qwen2 reads head_dim when the config has one


def test_qk_layernorm_maps_to_qwen3(megatron_ckpt) -> None:
    a = _args_of(megatron_ckpt, "qk_norm_fp32_tp1")
    c = hf_config_from_args(a, source="x")
    assert isinstance(c, Qwen3Config) and c.architectures == ["Qwen3ForCausalLM"]
    assert c.attention_bias is False and c.head_dim == a.kv_channels
    assert c.rms_norm_eps == a.layernorm_epsilon  # Megatron's q/k norms use layernorm_epsilon too


def test_qk_layernorm_with_qkv_bias_is_refused(stored_args) -> None:
    a = copy.copy(stored_args)
    a.qk_layernorm = a.add_qkv_bias = True
    with pytest.raises(
        UnsupportedCheckpointError, match="qk_layernorm=True with add_qkv_bias=True"
    ):
        hf_config_from_args(a, source="x")
    assert "qk_layernorm=True with add_qkv_bias=True" in unsupported_args(a)[0]


def test_fp16_args_give_float16(megatron_ckpt) -> None:
    a = _args_of(megatron_ckpt, "fp16_tp1")
    assert a.fp16 and not a.bf16
    assert str(hf_config_from_args(a, source="x").dtype).endswith("float16")


def test_no_gqa_fixture_gives_as_many_kv_heads_as_heads(megatron_ckpt) -> None:
    a = _args_of(megatron_ckpt, "mha_fp32_tp1")
    assert a.group_query_attention is False
    assert hf_config_from_args(a, source="x").num_key_value_heads == a.num_attention_heads


@pytest.mark.parametrize(
    ("variant", "table"),
    [("fp32_tp1", "llama"), ("qkv_bias_fp32_tp2", "qwen2"), ("qk_norm_fp32_tp1", "qwen3")],
)
def test_each_architecture_has_its_table(megatron_ckpt, variant: str, table: str) -> None:
    assert (
        table_for(hf_config_from_args(_args_of(megatron_ckpt, variant), source="x")).name == table
    )


def test_moe_routing_beyond_softmax_topk_and_mla_stay_refused(stored_args) -> None:
    a = copy.copy(stored_args)
    a.num_experts, a.multi_latent_attention = 8, True
    a.moe_shared_expert_intermediate_size, a.moe_router_score_function = 64, "sigmoid"
    msg = "\n".join(unsupported_args(a))
    assert "num_experts" not in msg  # served (Mixtral / Qwen3-MoE)
    assert "moe_shared_expert_intermediate_size=64 (shared experts)" in msg
    assert "moe_router_score_function='sigmoid'" in msg
    assert "multi_latent_attention=True (multi-latent attention (MLA))" in msg
