"""Every rank serves the same iteration: at start and across a reload, at TP=2 over gloo.

A Megatron run root (training layout TP2, iteration 10) with two more iterations beside it: 20
(same model, other weights) and 30 (iteration 20's files, the data file of training rank 1 cut
short inside ``output_layer.weight``'s second half of rows, which only serving TP rank 1 reads).
The ranks run as SGLang runs them (``consistency_ranks.py``): a launcher resolves the arguments
once; rank 0 builds, then the tracker moves to 20 before rank 1 builds; then both reload from
the run root with the tracker on 30 (fails on rank 1 alone), then on 20. After each step every
parameter of each rank must equal SGLang's default loader on the Hugging Face export of the
iteration that should be served, and the reply (TP rank 0's message) must say what that is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harness import World, prepare_case, rank_env
from make_megatron_checkpoint import VARIANTS, generate

RANKS = Path(__file__).with_name("consistency_ranks.py")
TIMEOUT_S = 600.0
SOURCE = "fp32_tp2"


def cut_only_rank1_reads(iter_dir: Path) -> str:
    """Cut the training-rank-1 data file inside its last chunk, and check (from torch's own
    view of ``.metadata``) that this chunk is the second half of ``output_layer.weight``'s rows:
    at serving TP=2 only rank 1 reads it. Returns the chunk's description."""
    meta = pickle.loads((iter_dir / ".metadata").read_bytes())
    chunks = [
        (info.offset, info.length, index)
        for index, info in meta.storage_data.items()
        if info.relative_path == "__1_0.distcp"
    ]
    offset, length, index = max(chunks, key=lambda c: c[0])
    rows = meta.state_dict_metadata[index.fqn].size[0]
    assert index.fqn == "output_layer.weight" and index.offset[0] == rows // 2, index
    data = iter_dir / "__1_0.distcp"
    assert data.stat().st_size == offset + length
    os.truncate(data, offset + length // 2)
    return f"{index.fqn} rows {index.offset[0]}..{rows} in {data.name}"


@pytest.fixture(scope="module")
def results(megatron_ckpt, tmp_path_factory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("iterations")
    run = root / "run"
    shutil.copytree(megatron_ckpt(SOURCE), run)
    nxt = dataclasses.replace(VARIANTS[SOURCE], name="next", seed=777, iteration=20)
    generate(root / "next", nxt)
    shutil.copytree(root / "next" / "iter_0000020", run / "iter_0000020")
    shutil.copytree(run / "iter_0000020", run / "iter_0000030")
    print("iteration 30:", cut_only_rank1_reads(run / "iter_0000030"))
    start, _ = prepare_case(megatron_ckpt(SOURCE), VARIANTS[SOURCE], root / "hf10")
    later, _ = prepare_case(root / "next", nxt, root / "hf20")
    world = World(tp=2)
    job = {
        "world": dataclasses.asdict(world),
        "port": _free_port(),
        "run_root": str(run),
        "dtype": start.dtype,
        "server_args": str(root / "server_args.pkl"),
        "published_while_starting": "20",
        "hf": {"start": start.hf, "iter20": later.hf},
        "reloads": [
            {"name": "truncated_on_rank1", "tracker": "30", "expect": "start"},
            {"name": "next", "tracker": "20", "expect": "iter20"},
        ],
    }
    job_path = root / "job.json"
    job_path.write_text(json.dumps(job, indent=1))
    env = rank_env()
    subprocess.run(
        [sys.executable, str(RANKS), "launch", str(job_path)], env=env, check=True, timeout=300
    )
    return _run_ranks(world, job_path, env)


def _free_port() -> int:
    from harness import _serve_helpers

    return _serve_helpers().free_port()


def _run_ranks(world: World, job_path: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    workdir = job_path.parent
    procs = []
    for rank in range(world.size):
        log = open(workdir / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed below
        cmd = [sys.executable, str(RANKS), str(job_path), str(rank)]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    deadline = time.monotonic() + TIMEOUT_S
    for proc, log in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    failed = [r for r, (p, _) in enumerate(procs) if p.returncode != 0]
    if failed:
        tails = "\n".join(
            f"--- rank {r} ---\n" + (workdir / f"rank{r}.log").read_text(errors="replace")[-4000:]
            for r in failed
        )
        raise RuntimeError(f"rank(s) {failed} failed\n{tails}")
    return [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(world.size)]


def _same_as_expected(step: dict[str, Any]) -> None:
    vs = step["vs"]
    assert vs["diffs"] == [] and vs["only_megatron"] == [] and vs["only_hf"] == [], vs


def test_ranks_started_while_the_tracker_moved_serve_one_iteration(results) -> None:
    for rank in results:
        assert rank["start"]["model_path"].endswith("iter_0000010"), rank["start"]
        _same_as_expected(rank["start"])


def test_reload_failing_on_one_rank_keeps_every_rank_on_the_served_iteration(results) -> None:
    steps = [r["truncated_on_rank1"] for r in results]
    for step in steps:
        assert not step["ok"]
        assert step["model_path"].endswith("iter_0000010")
        _same_as_expected(step)
    reply = steps[0]["message"]  # SGLang answers with TP rank 0's message
    assert steps[1]["message"] == reply
    assert "Failed to update weights" in reply and "iteration 30" in reply, reply
    assert "TP rank 1:" in reply and "TP rank 0:" not in reply, reply
    assert reply.endswith("still serving iteration 10 (" + _iter(results, 10) + ")."), reply


def test_reload_that_holds_on_every_rank_serves_the_new_iteration(results) -> None:
    for rank in results:
        step = rank["next"]
        assert step["ok"], step["message"]
        assert step["message"].endswith(f"now serving iteration 20 ({_iter(results, 20)}) "
                                        "on every TP rank.")  # fmt: skip
        assert step["model_path"] == _iter(results, 20)
        _same_as_expected(step)


def _iter(results: list[dict[str, Any]], iteration: int) -> str:
    start = Path(results[0]["start"]["model_path"])
    return str(start.parent / f"iter_{iteration:07d}")
