"""Round trip: SGLang's default loader on OUR HF export equals the direct megatron load.

Per rank, at TP 1 and 2, every parameter and buffer ``torch.equal`` (the export and the loader
share the reader and planner; the default loader's own sharding is the independent half).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import HF_DTYPES, Case, World, assert_equal_loads, run_world
from make_megatron_checkpoint import VARIANTS

from sglang_megatron_loader.cli import main as cli

SOURCES = [
    "fp32_tp2",
    "bf16_tp1",
    "tied_fp32_tp1",
    "qkv_bias_fp32_tp2",  # Qwen2
    "qk_norm_fp32_tp1",  # Qwen3
    "rope_scaling_fp32_tp1",  # the exported config's rope scaling, seen in the rotary cache
]


@pytest.fixture(scope="module")
def exported_cases(megatron_ckpt, tmp_path_factory) -> list[Case]:
    root = tmp_path_factory.mktemp("export")
    cases = []
    for name in SOURCES:
        out = root / name
        assert cli(["export", str(megatron_ckpt(name)), str(out)]) == 0
        dtype = VARIANTS[name].dtype
        itemsize = 4 if dtype == "fp32" else 2
        cases.append(Case(name, str(megatron_ckpt(name)), str(out), HF_DTYPES[dtype], itemsize))
    return cases


@pytest.mark.parametrize("tp", [1, 2])
def test_default_loader_on_export_equals_direct_load(exported_cases, tmp_path: Path, tp: int):
    results = run_world(World(tp), exported_cases, tmp_path)
    for rank, r in enumerate(results):
        for case in exported_cases:
            assert_equal_loads(r["cases"][case.name], f"{case.name} at TP{tp} rank {rank}")
