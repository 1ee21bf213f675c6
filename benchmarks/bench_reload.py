"""Hot-reload time: a new checkpoint loaded into the running model, megatron against SGLang's own.

    .venv/bin/python benchmarks/bench_reload.py [--size medium] [--rounds 8] [--served 1,2]

An RL loop reloads the policy's weights into a serving model again and again
(``/update_weights_from_disk``); the parameters are already in memory, so a reload is the
reads alone, without the fresh-memory cost of a first load (``bench_matrix.py``). Per served TP,
``tp`` rank processes on a gloo group build SGLang's real model once (from the export), then
alternate, each on a fresh hard-linked path (page cache warm, no per-process cache):

* **megatron**: ``reload.py``'s own check and load steps on each rank (open the checkpoint,
  check its config against the served model, SGLang's restore step, fill every parameter,
  SGLang's post-processing), called with a stand-in for the parts of SGLang's
  ``WeightUpdater`` they use; what is left out is the agreement between ranks and the commit;
* **exported**: SGLang's own ``WeightUpdater.update_weights_from_disk`` steps on the HF export
  (``DefaultModelLoader``'s weights iterator, restore, ``load_weights_and_postprocess``).

A round's time is its slowest rank's (a max all-reduce); printed: medians, the median of the
per-round ratios megatron/exported and their min-max. The checkpoints are ``bench_matrix.py``'s
(generated there on first use).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_matrix as bm  # noqa: E402 - this script's folder


def _worker(job: dict[str, Any], rank: int) -> None:
    import torch

    r = bm.Rank(job, rank)
    r.h._cpu_sglang_environment()
    first = r.server_args(Path(job["exported"]), "auto")
    r.h._init_world(r.world, rank, job["port"], first)
    if rank == 0:
        shutil.rmtree(r.links, ignore_errors=True)
    r.barrier()
    model, model_config, _ = r.h.build_with_configs(first, rank)

    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader import get_model_loader
    from sglang.srt.model_loader.loader import DefaultModelLoader
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    from sglang_megatron_loader.checkpoint import resolve
    from sglang_megatron_loader.sglang import reload

    cpu, dtype = torch.device("cpu"), getattr(torch, job["dtype"])

    def exported(path: Path) -> None:  # WeightUpdater.update_weights_from_disk's steps
        config = copy.copy(model_config)
        config.model_path = str(path)
        loader = get_model_loader(LoadConfig(load_format="auto"), config)
        with set_default_torch_dtype(dtype):
            weights = loader._get_weights_iterator(
                DefaultModelLoader.Source.init_new(config, model)
            )
            DefaultModelLoader.restore_weights_before_loading(model, cpu)
            loader.load_weights_and_postprocess(model, weights, cpu)

    # what reload.py's steps use of SGLang's WeightUpdater (no extra config: default threads)
    updater = SimpleNamespace(
        model_config=model_config,
        device="cpu",
        get_model=lambda: model,
        get_model_runner=lambda: SimpleNamespace(load_config=None),
    )

    def megatron(path: Path) -> None:  # reload.py's _check and _load, on this rank
        with contextlib.ExitStack() as stack:
            checked = reload._check(updater, resolve(path), stack)
            outcome = checked.outcome
            if outcome.ok:
                outcome = reload._load(updater, checked.ckpt, checked.dims)
        if not outcome.ok:
            raise SystemExit(f"rank {rank}: reload failed: {outcome.message}")

    import gc

    for rnd in range(job["rounds"] + 1):  # round 0: warm-up, not reported
        order = ["megatron", "exported"] if rnd % 2 else ["exported", "megatron"]
        for mode in order:
            path = r.fresh_copy(job[mode])
            gc.collect()
            r.barrier()
            t0 = time.perf_counter()
            (megatron if mode == "megatron" else exported)(path)
            took = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            r.dist.all_reduce(took, op=r.dist.ReduceOp.MAX)
            r.drop_copy(path)
            if rnd:
                r.emit(mode=mode, round=rnd, seconds=float(took))
    r.barrier()
    sys.stdout.flush()
    os._exit(0)


def run(tp: int, job: dict[str, Any], workdir: Path) -> dict[str, Any]:
    sys.path.insert(0, str(bm.CPU_STUB))
    import serve_helpers

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rank0.jsonl").unlink(missing_ok=True)
    job = dict(job, world={"tp": tp, "pp": 1}, port=serve_helpers.free_port(),
               workdir=str(workdir))  # fmt: skip
    path = workdir / "job.json"
    path.write_text(json.dumps(job))
    env = bm.rank_env(tp)
    procs = []
    for rank in range(tp):
        log = open(workdir / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed below
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path), str(rank)]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    codes = []
    for proc, log in procs:
        codes.append(proc.wait(timeout=1800))
        log.close()
    if any(codes):
        tail = (workdir / "rank0.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"served TP{tp}: rank(s) failed, return codes {codes}\n{tail}")
    recs = [json.loads(line) for line in (workdir / "rank0.jsonl").read_text().splitlines()]
    by = {m: {x["round"]: x["seconds"] for x in recs if x.get("mode") == m}
          for m in ("megatron", "exported")}  # fmt: skip
    ratios = sorted(by["megatron"][k] / by["exported"][k] for k in by["megatron"])
    return {
        "served": tp,
        "megatron_s": statistics.median(list(by["megatron"].values())),
        "exported_s": statistics.median(list(by["exported"].values())),
        "megatron/exported": statistics.median(ratios),
        "range": [ratios[0], ratios[-1]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(bm.SIZES), default="medium")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--saved", default="tp1", help="one of " + ",".join(bm.SAVED))
    p.add_argument("--family", default="bf16", choices=bm.FAMILIES)
    p.add_argument("--served", default="1,2", help="comma list of served TP sizes (1, 2)")
    p.add_argument("--cache", type=Path, default=HERE / ".cache")
    p.add_argument("--work", type=Path, default=bm.REPO / "out" / "bench_reload")
    ns = p.parse_args(argv)
    root = bm.cache_root(ns.cache, ns.size, True)
    ckpts = bm.ensure_checkpoints(root, ns.size, [ns.family], [ns.saved], True, False)
    job = {"megatron": str(ckpts[ns.family][ns.saved]),
           "exported": str(ckpts[ns.family][ns.saved + ".hf"]),
           "rounds": ns.rounds, "dtype": bm.DTYPE}  # fmt: skip
    print(f"reload: saved {ns.saved} ({ns.family}), {ns.size}, {ns.rounds} rounds", flush=True)
    for tp in [int(s) for s in ns.served.split(",") if s]:
        res = run(tp, job, ns.work / f"tp{tp}")
        lo, hi = res["range"]
        print(f"served TP{tp}: megatron {res['megatron_s']:.3f} s, exported "
              f"{res['exported_s']:.3f} s, megatron/exported {res['megatron/exported']:.2f} "
              f"({lo:.2f}-{hi:.2f})", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        try:
            _worker(json.loads(Path(sys.argv[2]).read_text()), int(sys.argv[3]))
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stdout.flush()
            os._exit(1)
    sys.exit(main())
