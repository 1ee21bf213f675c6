"""Legacy ``torch``-format MoE checkpoints, saved with expert parallelism (TP2 x EP2, EP2 at TP1,
TP2 x EP2 with expert TP 1), served by SGLang's real ``MixtralForCausalLM`` /
``Qwen3MoeForCausalLM`` at TP 1, TP 2 and TP 2 with ``--ep-size 2`` (CPU, gloo; ``harness.py``).

As ``test_legacy_tp.py``: on every rank each parameter equals, ``torch.equal``, SGLang's default
loader on the classic HF conversion of the torch_dist save holding the same weights (read with
PyTorch's DCP), and the rank reads exactly the model bytes it holds; its expert bytes are its
own experts' share (``test_moe_equality.expert_share``), with ``--ep-size 2`` only its experts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import World, assert_equal_loads, prepare_case, run_world
from make_legacy_checkpoint import LEGACY_VARIANTS
from make_megatron_checkpoint import VARIANTS
from test_moe_equality import expert_share

SOURCES = sorted(n for n, v in LEGACY_VARIANTS.items() if VARIANTS[v.base].num_experts)
WORLDS = {w.label: w for w in (World(1), World(2), World(2, flags=("--ep-size", "2")))}


@pytest.fixture(scope="module")
def world_results(
    legacy_ckpt, megatron_ckpt, tmp_path_factory
) -> Callable[[str], list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("hf_legacy_moe")
    cases = []
    for name in SOURCES:
        base = LEGACY_VARIANTS[name].base
        case, _ = prepare_case(megatron_ckpt(base), VARIANTS[base], root / name)
        cases.append(dataclasses.replace(case, name=name, megatron=str(legacy_ckpt(name))))
    done: dict[str, list[dict[str, Any]]] = {}

    def get(label: str) -> list[dict[str, Any]]:
        if label not in done:
            start = time.monotonic()
            done[label] = run_world(WORLDS[label], cases, tmp_path_factory.mktemp(label))
            print(f"\n{label}: {time.monotonic() - start:.1f} s")
        return done[label]

    return get


@pytest.mark.parametrize("label", list(WORLDS))
@pytest.mark.parametrize("source", SOURCES)
def test_legacy_moe_load_equals_torch_dist_weights(world_results, source: str, label: str):
    base = LEGACY_VARIANTS[source].base
    for rank, res in enumerate(world_results(label)):
        r = res["cases"][source]
        where = f"{source} -> {label} rank {rank}"
        assert_equal_loads(r, where)
        assert any(p.endswith("experts.w13_weight") for p in r["compare"]["params"]), where
        reads = r["reads"]
        over = {k: v for k, v in reads["by_key"].items() if v[0] != v[1]}
        assert not over, f"{where}: read [got, needed] differs: {over}"
        assert reads["weight_bytes"] == r["useful_bytes"], where
        experts = sum(
            got for key, (got, _) in reads["by_key"].items() if ".experts.experts." in key
        )
        assert experts == expert_share(base, WORLDS[label]), (where, experts)
