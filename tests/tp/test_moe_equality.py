"""Mixture-of-experts checkpoints (Mixtral- and Qwen3-MoE-shaped, saved by megatron-core with
EP 2, TP 2 x EP 2) to SGLang at TP 1, TP 2, TP 2 with ``--ep-size 2`` and PP 2, on CPU over
gloo.

As ``test_tp_equality.py``: each rank builds SGLang's real ``MixtralForCausalLM`` /
``Qwen3MoeForCausalLM`` twice through its own loading path, with ``--load-format megatron`` and
with the default loader on the classic HF conversion (per-expert tensors, read with PyTorch's
DCP), and the two must be ``torch.equal`` parameter by parameter (fused ``w13_weight`` /
``w2_weight`` included). Each rank reads exactly the bytes it holds: with ``--ep-size 2`` only
its experts' bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import World, prepare_case, run_world
from make_megatron_checkpoint import VARIANTS

SOURCES = ["moe_mixtral_fp32_tp2ep2", "moe_qwen3_fp32_ep2"]
WORLDS = {
    w.label: w for w in (World(1), World(2), World(2, flags=("--ep-size", "2")), World(1, pp=2))
}
LABELS = list(WORLDS)


@pytest.fixture(scope="module")
def cases(megatron_ckpt, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hf_moe")
    return {s: prepare_case(megatron_ckpt(s), VARIANTS[s], root / s) for s in SOURCES}


@pytest.fixture(scope="module")
def world_results(cases, tmp_path_factory) -> Callable[[str], list[dict[str, Any]]]:
    done: dict[str, list[dict[str, Any]]] = {}

    def get(label: str) -> list[dict[str, Any]]:
        if label not in done:
            start = time.monotonic()
            done[label] = run_world(
                WORLDS[label], [c for c, _ in cases.values()], tmp_path_factory.mktemp(label)
            )
            print(f"\n{label}: {time.monotonic() - start:.1f} s")
        return done[label]

    return get


def expert_share(source: str, world: World) -> int:
    """Bytes of the expert weights one rank holds: in each layer of its pipeline stage its
    ``E / ep`` experts, each FFN split over ``tp / ep`` ranks (SGLang's ``moe_tp_size``)."""
    v = VARIANTS[source]
    ep = 2 if "--ep-size" in world.flags else 1
    f = (v.moe_ffn_hidden_size or v.ffn_hidden_size) // (world.tp // ep)
    layers = v.num_layers // world.pp
    return layers * v.num_experts // ep * 3 * f * v.hidden_size * 4  # fp32


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("source", SOURCES)
def test_moe_load_equals_hf_conversion(world_results, source: str, label: str) -> None:
    for rank, r in enumerate(world_results(label)):
        r = r["cases"][source]
        where = f"{source} -> {label} rank {rank}"
        assert "megatron_error" not in r, f"{where}: {r['megatron_error']['where']}"
        assert "hf_error" not in r, f"{where}: reference build failed: {r['hf_error']['where']}"
        cmp = r["compare"]
        assert any(p.endswith("experts.w13_weight") for p in cmp["params"]), where
        assert any(p.endswith("experts.w2_weight") for p in cmp["params"]), where
        assert not cmp["only_megatron"] and not cmp["only_hf"], (where, cmp)
        assert not cmp["diffs"], f"{where}: parameters or buffers differ: {cmp['diffs']}"
        assert not cmp["all_zero"], f"{where}: never filled: {cmp['all_zero']}"


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("source", SOURCES)
def test_moe_rank_reads_exactly_its_experts(world_results, source: str, label: str) -> None:
    world = WORLDS[label]
    for rank, r in enumerate(world_results(label)):
        r = r["cases"][source]
        where = f"{source} -> {label} rank {rank}"
        reads = r["reads"]
        assert reads["weight_bytes"] == r["useful_bytes"], where
        over = {k: v for k, v in reads["by_key"].items() if v[0] != v[1]}
        assert not over, f"{where}: over-read [read, needed]: {over}"
        experts = sum(
            need for key, (_, need) in reads["by_key"].items() if ".experts.experts." in key
        )
        assert experts == expert_share(source, world), (where, experts)
