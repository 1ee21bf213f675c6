"""Hot reload refuses a checkpoint whose architecture or rotary embedding differs from the served
one (both are built into SGLang's layers, not held in weights), with each difference named."""

from __future__ import annotations

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.config import hf_config_from_args
from sglang_megatron_loader.sglang.reload import config_incompatibilities


def config(megatron_ckpt, variant: str):
    with MegatronCheckpoint(megatron_ckpt(variant)) as ckpt:
        return hf_config_from_args(ckpt.args, source=ckpt.source)


def test_same_model_is_compatible(megatron_ckpt) -> None:
    assert (
        config_incompatibilities(
            config(megatron_ckpt, "fp32_tp1"), config(megatron_ckpt, "fp32_tp2")
        )
        == []
    )


def test_other_architecture_is_named(megatron_ckpt) -> None:
    problems = config_incompatibilities(
        config(megatron_ckpt, "fp32_tp1"), config(megatron_ckpt, "qk_norm_fp32_tp1")
    )
    assert problems == ["architecture: serving LlamaForCausalLM, checkpoint Qwen3ForCausalLM"]


def test_rope_scaling_change_is_named(megatron_ckpt) -> None:
    (problem,) = config_incompatibilities(
        config(megatron_ckpt, "fp32_tp1"), config(megatron_ckpt, "rope_scaling_fp32_tp1")
    )
    assert problem.startswith("rope: serving {'rope_type': 'default'")
    assert "'rope_type': 'llama3'" in problem and "'factor': 8.0" in problem
