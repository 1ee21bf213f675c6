"""Megatron args -> LlamaConfig, from the args a real checkpoint stored."""

from __future__ import annotations

import copy

import pytest
import torch

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.config import llama_config_from_args
from sglang_megatron_loader.errors import UnsupportedCheckpointError


@pytest.fixture(scope="module")
def stored_args(megatron_ckpt):
    with MegatronCheckpoint(megatron_ckpt("fp32_tp1")) as ckpt:
        return ckpt.args


def test_config_fields_come_from_args(stored_args) -> None:
    a = stored_args
    c = llama_config_from_args(a, source="x")
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
    assert c.rms_norm_eps == a.norm_epsilon
    assert c.max_position_embeddings == a.max_position_embeddings
    assert c.tie_word_embeddings == (not a.untie_embeddings_and_output_weights)
    assert c.vocab_size == a.vocab_size
    assert c.megatron_padded_vocab_size == a.padded_vocab_size
    assert c.dtype in ("float32", torch.float32)


def test_bf16_args_and_overrides(stored_args) -> None:
    a = copy.copy(stored_args)
    a.bf16 = True
    assert str(llama_config_from_args(a, source="x").dtype).endswith("bfloat16")
    c = llama_config_from_args(a, source="x", overrides={"dtype": "float32", "vocab_size": 200})
    assert str(c.dtype).endswith("float32") and c.vocab_size == 200
    with pytest.raises(UnsupportedCheckpointError, match="dtype override 'int8'"):
        llama_config_from_args(a, source="x", overrides={"dtype": "int8"})


def test_group_query_attention_off_means_mha(stored_args) -> None:
    a = copy.copy(stored_args)
    a.group_query_attention = False
    assert llama_config_from_args(a, source="x").num_key_value_heads == a.num_attention_heads


def test_every_unsupported_feature_is_listed_in_one_error(stored_args) -> None:
    a = copy.copy(stored_args)
    a.num_experts, a.qk_layernorm, a.normalization, a.rotary_interleaved = (
        8,
        True,
        "LayerNorm",
        True,
    )
    with pytest.raises(UnsupportedCheckpointError) as err:
        llama_config_from_args(a, source="ckpt/iter_0000010")
    msg = str(err.value)
    for part in (
        "num_experts=8",
        "qk_layernorm=True",
        "normalization='LayerNorm'",
        "rotary_interleaved=True",
        "ckpt/iter_0000010",
    ):
        assert part in msg
