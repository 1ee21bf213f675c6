"""Any training layout to any SGLang TP (and PP) size, on CPU over gloo.

For every source layout and target layout, each rank builds SGLang's real model (Llama; Qwen2 for
qkv bias; Qwen3 for q/k layernorm) twice through SGLang's own loading path: with ``--load-format
megatron`` and with the default loader on a Hugging Face folder made by the classic conversion
(read with PyTorch's DCP, not with this package). The two must be identical parameter by
parameter and buffer by buffer (``torch.equal``; the rotary cache carries the RoPE scaling), and
each rank must read its own share of the checkpoint, never all of it. One set of processes per
target layout loads every source layout (see ``harness.py``); a table of bytes read is printed
(``-s``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import Case, World, prepare_case, run_world
from make_megatron_checkpoint import VARIANTS

SOURCES = [
    "fp32_tp1",
    "fp32_tp2",
    "fp32_pp2",
    "fp32_tp2pp2",
    "bf16_tp1",
    "tied_fp32_tp1",
    "other_dims",
    "qkv_bias_fp32_tp2",  # Qwen2, tied embeddings
    "qk_norm_fp32_tp1",  # Qwen3
    "mha_fp32_tp1",
    "rope_scaling_fp32_tp1",
    "fp16_tp1",
]
TP_WORLDS = [World(1), World(2), World(4)]
PP_WORLDS = [World(1, pp=2), World(2, pp=2)]
WORLDS = {w.label: w for w in TP_WORLDS + PP_WORLDS}
SGLANG_VOCAB_PAD = 64  # VocabParallelEmbedding pads the vocab to a multiple of this (x TP)


def refused(source: str, world: World) -> bool:
    """Query heads that cannot be split evenly over the target TP size, or tied embeddings with
    PP > 1 for Llama (SGLang's Llama has no output layer on the last stage then; its Qwen2/Qwen3
    have one, filled from the embedding rows)."""
    v = VARIANTS[source]
    llama = not (v.qkv_bias or v.qk_layernorm)
    return v.num_attention_heads % world.tp != 0 or (v.tied_embeddings and world.pp > 1 and llama)


def combos(worlds: list[World], mark: Callable[[str, World], Any] | None = None) -> list[Any]:
    out = []
    for w in worlds:
        for s in SOURCES:
            if not refused(s, w):
                marks = mark(s, w) if mark else ()
                out.append(pytest.param(s, w.label, id=f"{s}-{w.label}", marks=marks))
    return out


# ---------------------------------------------------------------------------------------------
# Fixtures: HF conversions once, one set of processes per target layout
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cases(megatron_ckpt, tmp_path_factory) -> dict[str, tuple[Case, dict[str, int]]]:
    root = tmp_path_factory.mktemp("hf")
    return {s: prepare_case(megatron_ckpt(s), VARIANTS[s], root / s) for s in SOURCES}


@pytest.fixture(scope="module")
def world_results(cases, tmp_path_factory) -> Callable[[str], list[dict[str, Any]]]:
    done: dict[str, list[dict[str, Any]]] = {}

    def get(label: str) -> list[dict[str, Any]]:
        if label not in done:
            world = WORLDS[label]
            start = time.monotonic()
            done[label] = run_world(
                world, [c for c, _ in cases.values()], tmp_path_factory.mktemp(label)
            )
            print(f"\n{label}: {world.size} rank(s), {len(cases)} sources, "
                  f"{time.monotonic() - start:.1f} s")  # fmt: skip
            print(bytes_table(world, done[label], {s: z for s, (_, z) in cases.items()}))
        return done[label]

    return get


def per_rank(world_results, source: str, label: str) -> list[dict[str, Any]]:
    return [r["cases"][source] for r in world_results(label)]


# ---------------------------------------------------------------------------------------------
# Expectations, computed from the fixture's variant alone
# ---------------------------------------------------------------------------------------------


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> tuple[int, int]:
    """Even split, the remainder going to the last stages (SGLang's ``get_pp_indices``)."""
    base, extra = divmod(num_layers, pp)
    sizes = [base + (1 if r >= pp - extra else 0) for r in range(pp)]
    return sum(sizes[:pp_rank]), sum(sizes[: pp_rank + 1])


def vocab_rows(vocab: int, tp: int, tp_rank: int) -> int:
    """True-vocab rows of the embedding shard of ``tp_rank`` (SGLang pads, then splits)."""
    pad_to = SGLANG_VOCAB_PAD
    if -(-vocab // pad_to) * pad_to % tp:
        pad_to *= tp
    per = -(-vocab // pad_to) * pad_to // tp
    return min(max(vocab - tp_rank * per, 0), per)


def expected_share(source: str, world: World, tp_rank: int, pp_rank: int) -> int:
    """Checkpoint bytes a rank must hold: 1/TP of every split weight (qkv bias like its weight),
    whole norms (q/k norms: one head each), its KV heads, its stage's layers. SGLang puts
    ``embed_tokens`` on the first stage; untied, its Llama has ``lm_head`` on every stage, its
    Qwen2/Qwen3 on the last stage only; tied, ``lm_head`` is ``embed_tokens`` at PP 1, and
    Qwen2/Qwen3's last stage holds its own copy of the embedding rows at PP > 1."""
    v = VARIANTS[source]
    hid, ffn, h, n = v.hidden_size, v.ffn_hidden_size, v.head_dim, world.tp
    q = v.num_attention_heads // n * h
    kv = max(v.num_query_groups // n, 1) * h  # tp > groups: one replicated KV head
    per_layer = 2 * hid + (q + 2 * kv) * hid + hid * q + 2 * (ffn // n) * hid + hid * (ffn // n)
    per_layer += (q + 2 * kv) if v.qkv_bias else 0
    per_layer += 2 * h if v.qk_layernorm else 0
    lo, hi = stage_layers(v.num_layers, world.pp, pp_rank)
    elements = per_layer * (hi - lo)
    vocab = vocab_rows(v.vocab_size, n, tp_rank) * hid
    elements += vocab if pp_rank == 0 else 0
    elements += hid if pp_rank == world.pp - 1 else 0
    llama = not (v.qkv_bias or v.qk_layernorm)
    last = pp_rank == world.pp - 1
    if llama:
        elements += vocab if not v.tied_embeddings else 0
    else:
        elements += vocab if last and not (v.tied_embeddings and world.pp == 1) else 0
    return elements * (4 if v.dtype == "fp32" else 2)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "label"), combos(TP_WORLDS + PP_WORLDS))
def test_megatron_load_equals_hf_conversion(world_results, source: str, label: str) -> None:
    for rank, r in enumerate(per_rank(world_results, source, label)):
        where = f"{source} -> {label} rank {rank}"
        assert "megatron_error" not in r, f"{where}: {r['megatron_error']['where']}"
        assert "hf_error" not in r, f"{where}: reference build failed: {r['hf_error']['where']}"
        cmp = r["compare"]
        assert cmp["params"], where
        assert not cmp["only_megatron"] and not cmp["only_hf"], (where, cmp)
        assert not cmp["diffs"], f"{where}: parameters or buffers differ: {cmp['diffs']}"
        assert not cmp["all_zero"], f"{where}: never filled: {cmp['all_zero']}"


@pytest.mark.parametrize("label", ["tp1", "tp2"])
def test_rope_scaling_is_compared_in_the_rotary_cache(world_results, label: str) -> None:
    """Rope scaling changes no weight; only the compared ``cos_sin_cache`` shows it."""
    for rank, r in enumerate(per_rank(world_results, "rope_scaling_fp32_tp1", label)):
        buffers = r["compare"]["buffers"]
        assert any(b.endswith("rotary_emb.cos_sin_cache") for b in buffers), (rank, buffers)


@pytest.mark.parametrize(("source", "label"), combos(PP_WORLDS))
def test_pp_stage_reads_only_its_layers(world_results, source: str, label: str) -> None:
    world = WORLDS[label]
    for rank, r in enumerate(per_rank(world_results, source, label)):
        lo, hi = stage_layers(VARIANTS[source].num_layers, world.pp, r["pp_rank"])
        assert r["layers"] == [lo, hi], f"{source} -> {label} rank {rank}"
        assert r["reads"]["plan_layers"] == list(range(lo, hi)), f"{source} -> {label} rank {rank}"


@pytest.mark.parametrize(("source", "label"), combos(TP_WORLDS + PP_WORLDS))
def test_rank_reads_its_share_never_everything(
    world_results, cases, source: str, label: str
) -> None:
    world, (case, sizes) = WORLDS[label], cases[source]
    for rank, r in enumerate(per_rank(world_results, source, label)):
        where = f"{source} -> {label} rank {rank}"
        share = expected_share(source, world, r["tp_rank"], r["pp_rank"])
        reads = r["reads"]
        assert r["useful_bytes"] == share, where
        assert reads["plan_elements"] * case.itemsize == share, f"{where}: plan != share"
        assert reads["weight_bytes"] >= share, where
        if world.size > 1:
            assert reads["weight_bytes"] < sizes["model_bytes"], f"{where}: read everything"
        # every tensor, row-parallel column slices included, reads exactly what it needs
        exact = {k: v for k, v in reads["by_key"].items() if v[0] != v[1]}
        assert not exact, f"{where}: over-read [read, needed]: {exact}"
        # no tensor byte is read twice (metadata re-reads are listed in the table)
        assert not [t for t in reads["twice"] if "load:data" in t["reads"]], where


@pytest.mark.parametrize(("source", "label"), combos(TP_WORLDS + PP_WORLDS))
def test_rank_reads_no_more_than_it_holds(world_results, source: str, label: str) -> None:
    for rank, r in enumerate(per_rank(world_results, source, label)):
        over = {k: v for k, v in r["reads"]["by_key"].items() if v[0] != v[1]}
        assert r["reads"]["weight_bytes"] == r["useful_bytes"], (
            f"{source} -> {label} rank {rank}: read {r['reads']['weight_bytes']} bytes for "
            f"{r['useful_bytes']}; over-read [read, needed]: {over}"
        )


@pytest.mark.parametrize(("source", "label"), combos(TP_WORLDS + PP_WORLDS))
def test_metadata_is_parsed_once_per_process(world_results, source: str, label: str) -> None:
    """SGLang asks for the config several times, then the loader opens the checkpoint: one
    parse of ``.metadata`` serves them all (none when the world's setup parsed it first)."""
    for rank, r in enumerate(per_rank(world_results, source, label)):
        parses = r["reads"]["metadata_parses"]
        assert sum(parses.values()) <= 1, f"{source} -> {label} rank {rank}: {parses}"


def test_unsplittable_heads_are_refused_clearly(world_results) -> None:
    """other_dims has 6 query heads: TP 4 must fail with our ShardingError naming them."""
    assert refused("other_dims", WORLDS["tp4"])
    for rank, r in enumerate(per_rank(world_results, "other_dims", "tp4")):
        err = r.get("megatron_error")
        assert err is not None, f"rank {rank}: TP 4 of 6 heads loaded"
        assert err["type"].endswith("errors.ShardingError"), f"rank {rank}: {err['where']}"
        assert "num_attention_heads" in err["message"], err["message"]
        assert "6" in err["message"] and "4 TP ranks" in err["message"], err["message"]


@pytest.mark.parametrize("label", [w.label for w in PP_WORLDS])
def test_tied_embeddings_with_pp_are_refused_clearly(world_results, label: str) -> None:
    """SGLang's tied Llama has no lm_head after stage 0: refused at load on every rank."""
    for rank, r in enumerate(per_rank(world_results, "tied_fp32_tp1", label)):
        err = r.get("megatron_error")
        assert err is not None, f"rank {rank}: tied embeddings loaded at {label}"
        assert err["type"].endswith("errors.UnsupportedCheckpointError"), err["where"]
        assert "embeddings are tied" in err["message"], err["message"]
        assert "--pp-size is 2" in err["message"], err["message"]


def test_planner_alone_refuses_unsplittable_heads_clearly(megatron_ckpt) -> None:
    """The clear message exists in the planner; only the loader's order hides it."""
    from sglang_megatron_loader.checkpoint import MegatronCheckpoint
    from sglang_megatron_loader.engine import dims_for, hf_config_for
    from sglang_megatron_loader.errors import ShardingError
    from sglang_megatron_loader.models.llama import LLAMA
    from sglang_megatron_loader.models.rules import Tp
    from sglang_megatron_loader.planner import plan_rank

    root = megatron_ckpt("other_dims")
    with MegatronCheckpoint(root) as ckpt:
        dims = dims_for(ckpt, hf_config_for(root))
        with pytest.raises(ShardingError, match=r"num_attention_heads \(size 6\) across 4 TP"):
            plan_rank(LLAMA, dims, ckpt.tensors, Tp(0, 4))


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def bytes_table(world: World, results: list[dict[str, Any]], sizes: dict[str, Any]) -> str:
    head = (
        f"{'source':<22}{'target':<8}{'rank':>4} {'tp,pp':<6}{'layers':<7}"
        f"{'read':>9}{'holds':>9}{'x':>6}{'all I/O':>9}{'model':>9}{'read%':>7}  over-read / twice"
    )
    lines = [head, "-" * len(head)]
    for source in sizes:
        for rank, res in enumerate(results):
            r = res["cases"][source]
            pos = f"{r['tp_rank']},{r['pp_rank']}"
            if "reads" not in r:
                err = r.get("megatron_error", {}).get("type", "?").rsplit(".", 1)[-1]
                lines.append(f"{source:<22}{world.label:<8}{rank:>4} {pos:<6}refused: {err}")
                continue
            reads, model = r["reads"], sizes[source]["model_bytes"]
            read, holds = reads["weight_bytes"], r["useful_bytes"]
            io = sum(reads["bytes_by_phase"].values())
            over = sorted(
                {k.rsplit(".", 2)[-2] for k, (got, need) in reads["by_key"].items() if got > need}
            )
            notes = ",".join(over) + twice_note(reads)
            layers = f"{r['layers'][0]}-{r['layers'][1]}"
            lines.append(
                f"{source:<22}{world.label:<8}{rank:>4} {pos:<6}{layers:<7}{read:>9}{holds:>9}"
                f"{read / holds:>6.2f}{io:>9}{model:>9}{100 * read / model:>6.1f}%  {notes}"
            )
    return "\n".join(lines)


def twice_note(reads: dict[str, Any]) -> str:
    """Bytes read again: by config lookups (``cfg``) and, within the load, metadata (``meta``)."""
    extra = {"cfg": 0, "meta": 0}
    for t in reads["twice"]:
        size = t["end"] - t["start"]
        in_load = [r for r in t["reads"] if r.startswith("load:")]
        extra["cfg"] += size * (len(t["reads"]) - max(len(in_load), 1))
        extra["meta"] += size * max(len(in_load) - 1, 0)
    parses = "+".join(str(n) for n in reads["metadata_parses"].values()) or "0"  # 0: cached
    return f" | again: cfg {extra['cfg']} B, meta {extra['meta']} B; .metadata parsed {parses}x"
