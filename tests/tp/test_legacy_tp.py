"""Legacy ``torch``-format checkpoints served by SGLang's real ``LlamaForCausalLM`` at TP 1 and 2
(CPU, gloo; ``harness.py``): every parameter equals SGLang's default loader on the classic HF
conversion of the torch_dist checkpoint holding the same weights, and each rank reads exactly the
model bytes it holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from harness import World, assert_equal_loads, prepare_case, run_world
from make_legacy_checkpoint import LEGACY_VARIANTS
from make_megatron_checkpoint import VARIANTS

# the harness's classic conversion is Llama's (no qkv bias): the Qwen2-style variant is checked
# against torch_dist in tests/unit/test_legacy.py instead; MoE saves: test_legacy_moe_tp.py
SOURCES = sorted(
    n
    for n, v in LEGACY_VARIANTS.items()
    if not VARIANTS[v.base].qkv_bias and not VARIANTS[v.base].num_experts
)
WORLDS = {w.label: w for w in (World(1), World(2))}


@pytest.fixture(scope="module")
def world_results(legacy_ckpt, megatron_ckpt, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hf")
    cases = []
    for name in SOURCES:
        base = LEGACY_VARIANTS[name].base
        case, _ = prepare_case(megatron_ckpt(base), VARIANTS[base], root / name)
        cases.append(dataclasses.replace(case, name=name, megatron=str(legacy_ckpt(name))))
    return {
        label: run_world(w, cases, tmp_path_factory.mktemp(label)) for label, w in WORLDS.items()
    }


@pytest.mark.parametrize("label", list(WORLDS))
@pytest.mark.parametrize("source", SOURCES)
def test_legacy_load_equals_torch_dist_weights(world_results, source: str, label: str) -> None:
    for rank, res in enumerate(world_results[label]):
        r = res["cases"][source]
        where = f"{source} -> {label} rank {rank}"
        assert_equal_loads(r, where)
        reads = r["reads"]
        over = {k: v for k, v in reads["by_key"].items() if v[0] != v[1]}
        assert not over, f"{where}: read [got, needed] differs: {over}"
        assert reads["weight_bytes"] == r["useful_bytes"], where
        print(f"{where}: read {reads['weight_bytes']} B for {r['useful_bytes']} B held; "
              f"all I/O {sum(reads['bytes_by_phase'].values())} B")  # fmt: skip
