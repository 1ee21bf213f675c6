"""``--enable-dp-attention`` and ``--enable-dp-lm-head`` with ``--load-format megatron``, on CPU
over gloo (``harness.py``): TP 4 with two attention-DP groups, so the attention-TP group (size 2)
differs from the TP group. SGLang splits some layers over the attention-TP group there: Llama's
and Qwen3's ``lm_head`` (DP lm-head), Qwen2/Qwen3's embedding and Qwen3's attention. On every rank
each parameter must equal SGLang's default loader on the classic HF conversion (``torch.equal``).
"""

from __future__ import annotations

import pytest
from harness import World, prepare_case, run_world
from make_megatron_checkpoint import VARIANTS

SOURCES = [
    "fp32_tp2",  # Llama, untied
    "qkv_bias_fp32_tp2",  # Qwen2, tied embeddings
    "qk_norm_fp32_tp1",  # Qwen3
]
DP_ATTENTION = World(4, flags=("--enable-dp-attention", "--dp-size", "2", "--enable-dp-lm-head"))


@pytest.fixture(scope="module")
def results(megatron_ckpt, tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("dp_attention")
    cases = [prepare_case(megatron_ckpt(s), VARIANTS[s], root / s)[0] for s in SOURCES]
    return run_world(DP_ATTENTION, cases, root / DP_ATTENTION.label)


@pytest.mark.parametrize("source", SOURCES)
def test_every_rank_equals_sglangs_default_loader(results, source) -> None:
    for rank in results:
        case = rank["cases"][source]
        assert "megatron_error" not in case, case["megatron_error"]
        assert "hf_error" not in case, case["hf_error"]
        cmp = case["compare"]
        assert cmp["diffs"] == [] and cmp["only_megatron"] == [] and cmp["only_hf"] == [], cmp
        assert cmp["all_zero"] == [], cmp["all_zero"]
