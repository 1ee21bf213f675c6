"""execute_plan fills every destination the same way, read by read equal to PyTorch's own DCP
loader: reads straight into CPU parameters (contiguous, or strided like a column view of a wider
tensor), and the staging path a GPU load takes (reused host buffers, casts after the copy),
forced here on the CPU, with reads small enough to cycle the buffers across threads."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed.checkpoint as dcp

from sglang_megatron_loader import engine
from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.engine import dims_for, execute_plan, hf_config_for
from sglang_megatron_loader.models import table_for
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import ParamPlan, plan_rank

SOURCES = ["fp32_tp1", "fp32_tp2", "fp32_tp2pp2", "bf16_tp1", "qkv_bias_fp32_tp2"]
SERVED = [Tp(0, 1), Tp(1, 2), Tp(3, 4)]


def _strided(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Same shape, not contiguous: the middle columns of a wider tensor (1-D: every other)."""
    if len(shape) == 1:
        return torch.full((2 * shape[0],), -7, dtype=dtype)[::2]
    return torch.full((*shape[:-1], shape[-1] + 5), -7, dtype=dtype)[..., 2 : 2 + shape[-1]]


MODES: dict[str, tuple[Callable[[tuple[int, ...], torch.dtype], torch.Tensor], dict]] = {
    "direct": (lambda s, d: torch.full(s, -7, dtype=d), {}),
    "direct_strided": (_strided, {}),
    "staged": (lambda s, d: torch.full(s, -7, dtype=d), {"staging": True}),
    "staged_small_reads": (_strided, {"staging": True, "max_read_bytes": 1000, "threads": 3}),
    "cast_fp64": (lambda s, d: torch.full(s, -7, dtype=torch.float64), {"max_read_bytes": 4096}),
}


@pytest.fixture(scope="module")
def reference(megatron_ckpt) -> Callable[[str], dict[str, torch.Tensor]]:
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def get(source: str) -> dict[str, torch.Tensor]:
        if source not in cache:
            with MegatronCheckpoint(megatron_ckpt(source)) as ckpt:
                out = {k: torch.empty(i.shape, dtype=i.dtype) for k, i in ckpt.tensors.items()
                       if not k.startswith("optimizer")}  # fmt: skip
                reader = dcp.FileSystemReader(str(ckpt.location.iter_dir))
            dcp.load(out, storage_reader=reader, no_dist=True)
            cache[source] = out
        return cache[source]

    return get


def _expected(p: ParamPlan, full: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(p.shape, dtype=dtype)
    for r in p.reads:
        rows = out[r.dst[0] : r.dst[1]]
        rows.copy_(full[r.key][tuple(slice(lo, hi) for lo, hi in r.region)].reshape(rows.shape))
    return out


@pytest.mark.parametrize("tp", SERVED, ids=lambda t: f"tp{t.size}r{t.rank}")
@pytest.mark.parametrize("source", SOURCES)
def test_every_mode_fills_what_torch_dcp_reads(megatron_ckpt, reference, source, tp) -> None:
    root = megatron_ckpt(source)
    config = hf_config_for(root)
    full = reference(source)
    with MegatronCheckpoint(root) as ckpt:
        plan = plan_rank(table_for(config), dims_for(ckpt, config), ckpt.tensors, tp)
        stored = {p.name: ckpt.tensors[p.reads[0].key].dtype for p in plan.params}
        for mode, (make, kwargs) in MODES.items():
            out = {p.name: make(p.shape, stored[p.name]) for p in plan.params}
            report = execute_plan(ckpt, plan, lambda p, o=out: o[p.name], progress=False, **kwargs)
            assert report.bytes_read == plan.bytes_to_read(ckpt.tensors), mode
            for p in plan.params:
                want = _expected(p, full, stored[p.name]).to(out[p.name].dtype)
                assert torch.equal(out[p.name], want), f"{mode}: {p.name}"


def test_default_reader_threads_follow_the_ranks_cores_on_a_cpu() -> None:
    import torch

    from sglang_megatron_loader.engine import THREADS, default_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert default_threads(torch.device("cpu")) == 1
        torch.set_num_threads(64)
        assert default_threads(torch.device("cpu")) == THREADS
        assert default_threads(torch.device("cuda", 0)) == THREADS
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.int8])
def test_padding_rows_are_zeroed_in_place_whatever_the_layout(dtype) -> None:
    """``zero`` (the vocabulary padding rows): contiguous rows and a strided view alike, the
    rest untouched, without torch's intra-op threads on the CPU."""
    base = torch.full((10, 12), 7, dtype=dtype)
    engine.zero(base[6:])
    engine.zero(base[:3, 4:9])
    engine.zero(base[3:3])  # empty
    want = torch.full((10, 12), 7, dtype=dtype)
    want[6:] = 0
    want[:3, 4:9] = 0
    assert torch.equal(base, want)


@pytest.mark.parametrize("prefault", [True, False])
def test_reloads_skip_the_prefault_walk_and_fill_the_same(
    megatron_ckpt, reference, monkeypatch, prefault: bool
) -> None:
    """``prefault=False`` (a reload into parameters already in memory): no populate call,
    the same values; the default populates every CPU parameter once."""
    calls: list[int] = []
    real = engine.populate
    monkeypatch.setattr(engine, "populate", lambda t: calls.append(t.data_ptr()) or real(t))
    root = megatron_ckpt("bf16_tp1")
    config = hf_config_for(root)
    full = reference("bf16_tp1")
    with MegatronCheckpoint(root) as ckpt:
        plan = plan_rank(table_for(config), dims_for(ckpt, config), ckpt.tensors, Tp(0, 1))
        dests = {p.name: torch.full(p.shape, -7, dtype=torch.bfloat16) for p in plan.params}
        execute_plan(ckpt, plan, lambda p: dests[p.name], progress=False, prefault=prefault)
    for p in plan.params:
        assert torch.equal(dests[p.name], _expected(p, full, torch.bfloat16)), p.name
    assert sorted(calls) == (sorted(d.data_ptr() for d in dests.values()) if prefault else [])
