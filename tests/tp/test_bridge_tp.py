"""Megatron-Bridge saves at SGLang TP1 and TP2: per rank, every parameter ``torch.equal`` to
SGLang's default loader on the Hugging Face model the save was imported from (its weights,
untouched by this package), and each rank reads exactly the bytes it holds."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import Case, World, assert_equal_loads, run_world

GOLDEN = Path(__file__).parents[1] / "fixtures" / "golden" / "bridge_0.6.2"
SAVES = sorted(p for p in GOLDEN.iterdir() if (p / "latest_checkpointed_iteration.txt").is_file())
DTYPES = {"fp32": ("float32", 4), "bf16": ("bfloat16", 2)}


def _cases() -> list[Case]:
    import torch

    cases = []
    for root in SAVES:
        ref = torch.load(f"{root}.reference.pt", weights_only=True)
        dtype, itemsize = DTYPES[ref["variant"]["dtype"]]
        cases.append(Case(root.name, str(root), f"{root}.hf", dtype, itemsize))
    return cases


@pytest.mark.parametrize("tp", [1, 2])
def test_bridge_saves_load_like_the_hf_model_they_were_imported_from(tmp_path: Path, tp: int):
    cases = _cases()
    assert {c.name for c in cases} >= {"llama_tp1_untied", "llama_tp2_tied", "qwen3_tp2"}
    results = run_world(World(tp), cases, tmp_path)
    for rank, r in enumerate(results):
        for case in cases:
            got = r["cases"][case.name]
            where = f"{case.name} at TP{tp} rank {rank}"
            assert_equal_loads(got, where)
            # each rank reads exactly its share of the weights, nothing else
            assert got["reads"]["weight_bytes"] == got["useful_bytes"], (where, got["reads"])
