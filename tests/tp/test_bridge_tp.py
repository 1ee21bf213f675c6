"""Megatron-Bridge saves at SGLang TP1 and TP2 (MoE saves also at TP2 with ``--ep-size 2``):
per rank, every parameter ``torch.equal`` to SGLang's default loader on the Hugging Face model
the save was imported from (its weights, untouched by this package), and each rank reads exactly
the bytes it holds (under EP, only its experts')."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import Case, World, assert_equal_loads, run_world

GOLDEN = Path(__file__).parents[1] / "fixtures" / "golden" / "bridge_0.6.2"
SAVES = sorted(p for p in GOLDEN.iterdir() if (p / "latest_checkpointed_iteration.txt").is_file())
DTYPES = {"fp32": ("float32", 4), "bf16": ("bfloat16", 2)}


def _variant(root: Path) -> dict:
    import torch

    return torch.load(f"{root}.reference.pt", weights_only=True)["variant"]


def _cases(moe_only: bool = False) -> list[Case]:
    cases = []
    for root in SAVES:
        v = _variant(root)
        if moe_only and not v.get("num_experts"):
            continue
        dtype, itemsize = DTYPES[v["dtype"]]
        cases.append(Case(root.name, str(root), f"{root}.hf", dtype, itemsize))
    return cases


def _check(results: list[dict], cases: list[Case], label: str) -> None:
    for rank, r in enumerate(results):
        for case in cases:
            got = r["cases"][case.name]
            where = f"{case.name} at {label} rank {rank}"
            assert_equal_loads(got, where)
            # each rank reads exactly its share of the weights, nothing else
            assert got["reads"]["weight_bytes"] == got["useful_bytes"], (where, got["reads"])


@pytest.mark.parametrize("tp", [1, 2])
def test_bridge_saves_load_like_the_hf_model_they_were_imported_from(tmp_path: Path, tp: int):
    cases = _cases()
    names = {c.name for c in cases}
    assert names >= {"llama_tp1_untied", "llama_tp2_tied", "qwen3_tp2", "qwen3_moe_ep2"}
    _check(run_world(World(tp), cases, tmp_path), cases, f"TP{tp}")


def test_bridge_moe_save_at_expert_parallel_2_reads_only_each_ranks_experts(tmp_path: Path):
    cases = _cases(moe_only=True)
    assert cases
    world = World(2, flags=("--ep-size", "2"))
    results = run_world(world, cases, tmp_path)
    _check(results, cases, world.label)
    for case in cases:
        v = _variant(Path(case.megatron))
        # each rank: half the experts of every layer, each expert's whole FFN (TP2 / EP2 = 1)
        share = v["num_layers"] * v["num_experts"] // 2 * 3 * v["moe_ffn_hidden_size"]
        share *= v["hidden_size"] * case.itemsize
        for rank, r in enumerate(results):
            got = r["cases"][case.name]
            compare = got["compare"]["params"]
            assert any(p.endswith("experts.w13_weight") for p in compare), (case.name, rank)
            experts = sum(
                need
                for key, (_, need) in got["reads"]["by_key"].items()
                if ".experts.experts." in key
            )
            assert experts == share, (case.name, rank, experts, share)
