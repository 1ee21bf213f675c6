"""Load-time matrix: saved TP1/TP2/TP4/PP2 x served TP1/TP2 x bf16 / bf16-with-fp32-norms.

    .venv/bin/python benchmarks/bench_matrix.py [--size medium] [--rounds 4] [--json out.json]

(``--saved tp1,tp4 --served 2 --families bf16 --no-integrity`` run part of it; ``--size tiny``
checks the script end to end in a few minutes.) First run: the checkpoints are generated
(``medium``: ~6 min, ~5 GB of RAM at most, 34 GB of disk), then the rows (~8 min on 2 cores).

One model, saved by megatron-core itself in every training layout (``make_bench_layouts.py``:
real ``torch_dist`` run roots with megatron's Adam state in the same files, the weights resharded
from the TP1 save by ``dist_checkpointing.load``), in two weight families: all bf16 (megatron's
``Float16OptimizerWithFloat16Params``) and bf16 with fp32 RMSNorm weights (``DistributedOptimizer``
buckets). Each run root is exported once with ``sglang-megatron export`` (HF safetensors). All of
it is cached under ``benchmarks/.cache/matrix-v<hash>/`` (generator version, megatron-core and
torch versions, size); delete the folder to regenerate.

Per served TP, ``tp`` rank processes on a gloo group build SGLang's real model the way its model
runner does (``tests/tp/harness.py``: ``ModelConfig.from_server_args``, ``build_load_config``,
``get_model``), over and over in the same processes. Per row (saved layout, served TP, family):

* one untimed ``--load-format megatron`` build under ``tests/tp/read_recorder.py`` (the bytes
  this rank reads and their file ranges; it also warms the page cache), one untimed build on the
  export;
* ``--rounds`` paired rounds, the order alternated (megatron, exported, floor / exported,
  megatron, floor): building + loading the model with ``--load-format megatron`` on the run root,
  with SGLang's default loader (``--load-format auto``) on the export, and the **raw-read floor**:
  the byte ranges the megatron build read (above) read into one reused, already-resident buffer
  (``preadv``; runs of equal length at a constant stride, i.e. a column slice, as one strided
  copy from a mapping). The ranks start each build together (a barrier); a build's time is its
  slowest rank's. Every build sees the checkpoint under a path it never saw (hard links, same
  inodes, so the page cache stays warm): no per-process cache of the package or of SGLang
  survives from one build to the next, as in a fresh server process. Likewise every build's
  parameters are fresh memory (``MALLOC_MMAP_THRESHOLD_`` fixed: glibc maps large
  allocations afresh instead of handing out the previous build's freed, already faulted pages).

Reported per row: median seconds, the median of the per-round ratios megatron/exported (with
the min-max over rounds), megatron/floor, and the loader's weight-read time (between its own
"... GB to read" and "Loaded ..." log lines: the reads alone, without config, metadata, plan
and SGLang's model construction) and its ratio to the floor; GB read per rank (megatron:
recorded; exported: the safetensors files, which SGLang's default loader reads whole on every
rank); peak RSS per process (``VmHWM``, reset before each build). Then the integrity cost:
the saved-TP1 bf16 run root with megatron-core's ``integrity.json`` (hard-linked copy), the
megatron load with ``verify_integrity`` "auto" against "off", for the first load on this
machine (fresh verdicts) and a later one (verdicts kept), per served TP.

Both loaders run with the same torch/OpenMP threads per rank: the cores divided by the served TP
(what SGLang's CPU backend binds), or ``--threads``. SGLang's default loader copies with torch
(OpenMP), so on a busy machine its times at 2 threads swing far more than at 1.

Timings on a shared machine are noisy: only ratios measured in the same rounds are reported as
results. ``/proc/loadavg`` is sampled at every row. On a shared machine the script waits for
free memory before each generation step and each round, its processes ask the OOM killer to take
them first, and a world whose rank was killed goes on from the first unfinished row.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import importlib.metadata
import json
import logging
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TP_DIR = REPO / "tests" / "tp"
CPU_STUB = REPO / "tests" / "cpu_stub"
GENERATOR = HERE / "make_bench_layouts.py"
GENERATOR_VERSION = 1  # bump when make_bench_layouts.py changes what it writes

SAVED = ("tp1", "tp2", "tp4", "pp2")
FAMILIES = {  # name -> generator flags
    "bf16": [],
    "bf16+fp32norms": ["--norms-fp32", "--distributed-optimizer"],
}
DTYPE = "bfloat16"

#: Shapes (make_bench_checkpoint.Shape fields). The vocabulary pads to the same rows at TP 1, 2
#: and 4 (Megatron-LM pads to 128 x TP): 32200 -> 32256 everywhere, with 56 padding rows.
#: Generating a run root holds all of its tensors at once (~15 bytes per parameter with the Adam
#: state), the matrix keeps 8 run roots on disk.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=2, hidden_size=128, ffn_hidden_size=384, num_attention_heads=8,
                 num_query_groups=4, vocab_size=1000),
    # 0.153 B parameters: 0.31 GB of bf16 weights, 2.2 GB per run root with the Adam state
    # (17 GB of disk for the matrix), ~3 GB of RAM to generate
    "small": dict(num_layers=12, hidden_size=768, ffn_hidden_size=3072, num_attention_heads=12,
                  num_query_groups=4, vocab_size=32200),
    # 0.25 B parameters: 0.50 GB of weights, 3.5 GB per run root (28 GB of disk), ~5 GB of RAM
    "medium": dict(num_layers=12, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16,
                   num_query_groups=4, vocab_size=32200),
    # 0.50 B parameters: 1.0 GB of weights, 7 GB per run root (56 GB of disk), ~9 GB of RAM
    "large": dict(num_layers=16, hidden_size=1536, ffn_hidden_size=4096, num_attention_heads=12,
                  num_query_groups=4, vocab_size=32200),
}  # fmt: skip
SHAPE_DEFAULTS = dict(
    tied_embeddings=False,
    max_position_embeddings=4096,
    seq_length=4096,
    tokenizer_model="bench-matrix-tokenizer",
)

VERDICT_ENV = "SGLANG_MEGATRON_LOADER_VERDICTS"  # the package's verdict folder (integrity)
_TO_READ = re.compile(r"GB to read$")
_LOADED = re.compile(r"Loaded (\d+) parameters from .* in ([\d.]+) s \(([\d.]+) GB read")


def num_parameters(shape: dict[str, Any]) -> int:
    h, nq, ng = shape["hidden_size"], shape["num_attention_heads"], shape["num_query_groups"]
    f, layers = shape["ffn_hidden_size"], shape["num_layers"]
    d = h // nq
    padded = -(-shape["vocab_size"] // 512) * 512
    per_layer = (nq + 2 * ng) * d * h + h * nq * d + 3 * f * h + 2 * h
    return layers * per_layer + 2 * padded * h + h


# ============================================================================================
# Driver: checkpoints, exports, the rank processes, the table
# ============================================================================================


def cache_root(base: Path, size: str, optimizer: bool) -> Path:
    """``base/matrix-v<hash>/<size>``: the generator version, the shape, the Adam state and the
    megatron-core and torch versions (not the generator's text: bump GENERATOR_VERSION)."""
    h = hashlib.sha256()
    for part in (
        str(GENERATOR_VERSION),
        json.dumps(SIZES[size], sort_keys=True),
        str(optimizer),
        _version("megatron-core"),
        _version("torch"),
    ):
        h.update(part.encode())
    return base / f"matrix-v{h.hexdigest()[:12]}" / (size + ("" if optimizer else "-noopt"))


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, need: int = 0) -> float:
    """Run ``cmd``; one killed by the OOM killer (its ranks ask to be picked first) is retried
    up to twice, once ``need`` bytes are available again."""
    start = time.perf_counter()
    for attempt in range(3):
        if need:
            wait_for_memory(need, what)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        killed = "SIGKILL" in proc.stderr or proc.returncode in (-9, 137)
        if proc.returncode == 0 or not killed or attempt == 2:
            break
        print(f"{what}: killed (out of memory?), retrying", flush=True)
        time.sleep(30)
    if proc.returncode != 0:
        raise SystemExit(
            f"{what} failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    return time.perf_counter() - start


def mem_available() -> int:
    match = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return int(match.group(1)) * 1024 if match else 1 << 62


def wait_for_memory(need: int, what: str, patience: float = 900.0) -> None:
    """Start ``what`` only once ``need`` bytes are available (the machine is shared): a run that
    the kernel's OOM killer stops takes someone else's process with it as often as not."""
    deadline, said = time.monotonic() + patience, False
    while (have := mem_available()) < need:
        if time.monotonic() > deadline:
            raise SystemExit(
                f"{what}: needs ~{need / 1e9:.1f} GB of free memory, {have / 1e9:.1f} GB "
                f"available after waiting {patience:.0f} s; try a smaller --size"
            )
        if not said:
            print(f"{what}: waiting for ~{need / 1e9:.1f} GB of memory ({have / 1e9:.1f} GB "
                  "available)", flush=True)  # fmt: skip
            said = True
        time.sleep(10)


def _done(marker: Path) -> bool:
    return marker.is_file()


def ensure_checkpoints(root: Path, size: str, families: list[str], saved: list[str],
                       optimizer: bool, integrity: bool) -> dict[str, Any]:  # fmt: skip
    """Generate what is missing; returns {family: {layout: run_root, layout+'.hf': export}}."""
    shape = {**SHAPE_DEFAULTS, **SIZES[size]}
    out: dict[str, Any] = {}
    timings: dict[str, float] = {}
    export_cli = Path(sys.executable).with_name("sglang-megatron")
    for family in families:
        fam_dir = root / family.replace("+", "_")
        fam_dir.mkdir(parents=True, exist_ok=True)
        out[family] = {}
        needed = ["tp1"] + [s for s in saved if s != "tp1"]
        for layout in needed:
            run_root, marker = fam_dir / layout, fam_dir / f"{layout}.complete"
            if not _done(marker):
                cmd = [sys.executable, str(GENERATOR), "--out", str(run_root), "--layout", layout,
                       "--shape-json", json.dumps(shape), *FAMILIES[family]]  # fmt: skip
                if layout != "tp1":
                    cmd += ["--base", str(fam_dir / "tp1")]
                if not optimizer:
                    cmd.append("--no-optimizer")
                ranks = {"tp1": 1, "tp2": 2, "tp4": 4, "pp2": 2}[layout]
                per_param = 16 if "--distributed-optimizer" in FAMILIES[family] else 14
                state = num_parameters(shape) * (per_param if optimizer else 2)
                need = int(state * 1.2) + ranks * 2**29
                print(f"generating {family} {layout} ...", flush=True)
                timings[f"generate {family} {layout}"] = _run(
                    cmd, f"generating {family} {layout}", need=need
                )
                marker.write_text(f"{timings[f'generate {family} {layout}']:.1f}\n")
            out[family][layout] = run_root
        for layout in saved:
            hf, marker = fam_dir / f"{layout}.hf", fam_dir / f"{layout}.hf.complete"
            if not _done(marker):
                print(f"exporting {family} {layout} ...", flush=True)
                timings[f"export {family} {layout}"] = _run(
                    [str(export_cli), "export", str(out[family][layout]), str(hf), "--force"],
                    f"exporting {family} {layout}",
                )
                marker.write_text(f"{timings[f'export {family} {layout}']:.1f}\n")
            out[family][layout + ".hf"] = hf
    if integrity:
        fam_dir = root / families[0].replace("+", "_")
        copy, marker = fam_dir / "tp1_integrity", fam_dir / "tp1_integrity.complete"
        if not _done(marker):
            print("writing integrity.json (hard-linked copy of tp1) ...", flush=True)
            timings["integrity manifest"] = _run(
                [
                    sys.executable,
                    str(GENERATOR),
                    "--integrity-copy",
                    str(copy),
                    "--base",
                    str(out[families[0]]["tp1"]),
                ],  # fmt: skip
                "integrity manifest",
            )
            marker.write_text("ok\n")
        out["integrity"] = copy
    out["timings"] = timings
    return out


def dir_bytes(path: Path, suffix: str | None = None) -> int:
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and (suffix is None or p.name.endswith(suffix))
    )


def threads_per_rank(world_size: int, threads: int | None) -> int:
    """torch/OpenMP threads per rank: ``--threads``, else the cores shared out between the
    ranks, as SGLang's CPU backend binds them (``SGLANG_CPU_OMP_THREADS_BIND``)."""
    return threads or max(1, (os.cpu_count() or 1) // world_size)


def rank_env(world_size: int, threads: int | None = None) -> dict[str, str]:
    sys.path.insert(0, str(TP_DIR))
    import harness

    env = harness.rank_env()
    env["OMP_NUM_THREADS"] = str(threads_per_rank(world_size, threads))  # both loaders alike
    env.pop("SGLANG_MEGATRON_LOADER_VERDICTS", None)
    # Fresh memory for every build, as in a fresh server process: with glibc's adaptive mmap
    # threshold, the parameters of one build are carved from the memory the previous build
    # freed, already faulted in (and huge-paged if that build asked for it), which flatters
    # whichever loader runs second. A fixed threshold maps every allocation >= 128 KiB afresh
    # and returns it to the kernel when freed.
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    return env


def _read_records(workdir: Path, tp: int) -> list[dict]:
    records = []
    for r in range(tp):
        path = workdir / f"rank{r}.jsonl"
        if path.is_file():
            records += [json.loads(line) for line in path.read_text().splitlines() if line]
    return records


def _finished(records: list[dict], tp: int) -> dict[str, int]:
    """Row -> the attempt in which every rank finished it."""
    done: dict[tuple[str, int], set[int]] = {}
    for r in records:
        if r.get("mode") == "done":
            done.setdefault((r["row"], r["attempt"]), set()).add(r["rank"])
    return {row: attempt for (row, attempt), ranks in done.items() if len(ranks) == tp}


def run_world(
    tp: int, job: dict[str, Any], workdir: Path, timeout: float, threads: int | None = None
) -> list[dict]:
    """Run ``job`` on ``tp`` rank processes; returns the records of every finished row.

    The ranks ask the OOM killer to take them first (a shared machine); ranks killed that way
    are started again, up to twice, once memory is back, and go on with the rows not finished.
    """
    sys.path.insert(0, str(CPU_STUB))
    import serve_helpers

    workdir.mkdir(parents=True, exist_ok=True)
    for stale in [workdir / "progress.txt"] + [workdir / f"rank{r}.jsonl" for r in range(tp)]:
        stale.unlink(missing_ok=True)
    env = rank_env(tp, threads)
    deadline = time.monotonic() + timeout
    shown = 0
    for attempt in range(3):
        finished = _finished(_read_records(workdir, tp), tp)
        todo = dict(job, attempt=attempt, skip=sorted(finished))
        todo.update(world={"tp": tp, "pp": 1}, port=serve_helpers.free_port(), workdir=str(workdir))
        path = workdir / "job.json"
        path.write_text(json.dumps(todo, indent=1, default=str))
        wait_for_memory(tp * 1400 * 2**20 + 2 * job["weights_bytes"], f"served TP{tp}")
        procs = []
        for rank in range(tp):
            log = open(workdir / f"rank{rank}.log", "ab")  # noqa: SIM115 - closed below
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path), str(rank)]
            procs.append(
                (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
            )
        progress = workdir / "progress.txt"
        try:
            while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
                time.sleep(1.0)
                if progress.is_file():
                    lines = progress.read_text().splitlines()
                    for line in lines[shown:]:
                        print(f"  [served tp{tp}] {line}", flush=True)
                    shown = len(lines)
                if any(p.poll() not in (None, 0) for p, _ in procs):
                    time.sleep(2.0)  # let the other ranks notice, then stop them
                    break
        finally:
            for proc, log in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
        codes = [p.returncode for p, _ in procs]
        if all(c == 0 for c in codes):
            break
        if -9 not in codes or attempt == 2 or time.monotonic() > deadline:
            tail = "".join(
                f"--- rank {r} (rc={codes[r]}) ---\n"
                + "".join(
                    (workdir / f"rank{r}.log").read_text(errors="replace").splitlines(True)[-40:]
                )
                for r in range(tp)
                if codes[r] != 0
            )
            raise SystemExit(f"served tp{tp}: rank(s) failed, return codes {codes}\n{tail}")
        print(f"  [served tp{tp}] a rank was killed (out of memory?); going on after a pause",
              flush=True)  # fmt: skip
        time.sleep(30)
    records = _read_records(workdir, tp)
    finished = _finished(records, tp)
    return [r for r in records if finished.get(r.get("row")) == r.get("attempt")]


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def _med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _by_round(records: list[dict], row: str, mode: str, key: str) -> dict[int, float]:
    """Per round: the slowest rank's ``key`` (max over ranks)."""
    out: dict[int, float] = {}
    for r in records:
        if r.get("row") == row and r.get("mode") == mode and r.get(key) is not None:
            out[r["round"]] = max(out.get(r["round"], 0.0), r[key])
    return out


def _ratios(a: dict[int, float], b: dict[int, float]) -> list[float]:
    return [a[k] / b[k] for k in sorted(a) if k in b and b[k] > 0]


def summarise_row(records: list[dict], row: dict[str, Any]) -> dict[str, Any]:
    rid = row["id"]
    m = _by_round(records, rid, "megatron", "seconds")
    e = _by_round(records, rid, "exported", "seconds")
    f = _by_round(records, rid, "floor", "seconds")
    w = _by_round(records, rid, "megatron", "read_s")
    me, mf, wf = _ratios(m, e), _ratios(m, f), _ratios(w, f)
    rec = [r for r in records if r.get("row") == rid and r.get("mode") == "recorded"]
    rss_m = _by_round(records, rid, "megatron", "peak_rss")
    rss_e = _by_round(records, rid, "exported", "peak_rss")
    return {
        **{k: row[k] for k in ("id", "family", "saved", "served")},
        "megatron_s": _med(list(m.values())),
        "exported_s": _med(list(e.values())),
        "floor_s": _med(list(f.values())),
        "read_s": _med(list(w.values())),
        "megatron/exported": _med(me),
        "megatron/exported range": [min(me), max(me)] if me else None,
        "megatron/floor": _med(mf),
        "read/floor": _med(wf),
        "megatron_bytes_per_rank": max((r.get("bytes_total") or 0 for r in rec), default=None),
        "megatron_data_bytes_per_rank": max((r.get("bytes_data") or 0 for r in rec), default=None),
        "recorder": all(r.get("recorder_ok") for r in rec) if rec else False,
        "floor_runs": max((r.get("floor_runs") or 0 for r in rec), default=None),
        "exported_bytes_per_rank": row["exported_bytes"],
        "megatron_peak_rss": _med(list(rss_m.values())),
        "exported_peak_rss": _med(list(rss_e.values())),
        "rounds": {"megatron": m, "exported": e, "floor": f, "read": w},
    }


def summarise_integrity(records: list[dict], tp: int) -> dict[str, Any] | None:
    rows = [r for r in records if r.get("row") == "integrity"]
    if not rows:
        return None
    get = {mode: _by_round(records, "integrity", mode, "seconds")
           for mode in ("off", "first", "later", "off2")}  # fmt: skip
    first, later = _ratios(get["first"], get["off"]), _ratios(get["later"], get["off2"])
    d_first = [get["first"][k] - get["off"][k] for k in get["first"] if k in get["off"]]
    d_later = [get["later"][k] - get["off2"][k] for k in get["later"] if k in get["off2"]]
    return {
        "served": tp,
        "off_s": _med(list(get["off"].values())),
        "first_s": _med(list(get["first"].values())),
        "later_s": _med(list(get["later"].values())),
        "first/off": _med(first),
        "first-off_s": _med(d_first),
        "later/off": _med(later),
        "later-off_s": _med(d_later),
        "rounds": get,
    }


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| saved | served | weights | megatron s | exported s | megatron/exported (min-max) "
            "| floor s | megatron/floor | weight read s | weight read/floor "
            "| GB read/rank megatron / exported | peak RSS GB megatron / exported |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in rows:
        rng = s["megatron/exported range"]
        ratio = f"**{_f(s['megatron/exported'])}** ({_f(rng[0])}-{_f(rng[1])})" if rng else "-"
        mb = s["megatron_bytes_per_rank"]
        lines.append(
            f"| {s['saved'].upper()} | TP{s['served']} | {s['family']} | {_f(s['megatron_s'])} "
            f"| {_f(s['exported_s'])} | {ratio} | {_f(s['floor_s'], '.3f')} "
            f"| {_f(s['megatron/floor'])} | {_f(s['read_s'], '.3f')} | {_f(s['read/floor'])} "
            f"| {_f(mb / 1e9 if mb else None, '.3f')} / {s['exported_bytes_per_rank'] / 1e9:.3f} "
            f"| {_f(s['megatron_peak_rss'] and s['megatron_peak_rss'] / 1e9)} / "
            f"{_f(s['exported_peak_rss'] and s['exported_peak_rss'] / 1e9)} |"
        )
    return "\n".join(lines)


def integrity_lines(items: list[dict[str, Any]], manifest_bytes: int) -> list[str]:
    out = []
    for s in items:
        out.append(
            f"integrity (saved TP1 bf16 + integrity.json, {manifest_bytes / 1e9:.2f} GB hashed, "
            f"served TP{s['served']}): load with verify_integrity auto / off = "
            f"{_f(s['first/off'])} on the first load on this machine "
            f"(+{_f(s['first-off_s'])} s; off {_f(s['off_s'])} s), "
            f"{_f(s['later/off'])} on later loads (+{_f(s['later-off_s'])} s, verdicts kept)"
        )
    return out


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="medium")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--saved", default=",".join(SAVED), help="comma list of " + ",".join(SAVED))
    p.add_argument("--served", default="1,2", help="comma list of served TP sizes (1, 2)")
    p.add_argument("--families", default=",".join(FAMILIES), help=",".join(FAMILIES))
    p.add_argument("--no-optimizer", action="store_true", help="checkpoints without Adam state")
    p.add_argument("--no-integrity", action="store_true", help="skip the integrity rows")
    p.add_argument("--cache", type=Path, default=HERE / ".cache")
    p.add_argument("--work", type=Path, default=REPO / "out" / "bench_matrix")
    p.add_argument("--json", type=Path, help="also write everything here")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per served TP")
    p.add_argument(
        "--threads",
        type=int,
        help="torch/OpenMP threads per rank (default: cores / served TP, as SGLang binds them)",
    )
    ns = p.parse_args(argv)
    saved = [s for s in ns.saved.split(",") if s]
    served = [int(s) for s in ns.served.split(",") if s]
    families = [f for f in ns.families.split(",") if f]
    for bad in [s for s in saved if s not in SAVED] + [f for f in families if f not in FAMILIES]:
        raise SystemExit(f"unknown layout or family {bad!r}")
    shape = {**SHAPE_DEFAULTS, **SIZES[ns.size]}
    params = num_parameters(shape)
    started, load_start = time.perf_counter(), loadavg()
    root = cache_root(ns.cache, ns.size, not ns.no_optimizer)
    per_param = 2 + (15 if not ns.no_optimizer else 2)  # export + run root (Adam: 14 or 16)
    need = params * per_param * len(families) * len(set(saved) | {"tp1"})
    if not (root / "bf16").exists() and shutil.disk_usage(ns.cache.parent).free < need:
        raise SystemExit(f"needs ~{need / 1e9:.0f} GB of disk under {ns.cache}")
    print(f"size {ns.size}: {params / 1e9:.3f} B parameters, cache {root}", flush=True)
    ckpts = ensure_checkpoints(root, ns.size, families, saved, not ns.no_optimizer,
                               not ns.no_integrity)  # fmt: skip
    prepared = time.perf_counter()
    rows = []
    for family in families:
        for layout in saved:
            hf = ckpts[family][layout + ".hf"]
            rows.append({
                "id": f"{family}/{layout}",
                "family": family,
                "saved": layout,
                "megatron": str(ckpts[family][layout]),
                "exported": str(hf),
                "exported_bytes": dir_bytes(hf, ".safetensors"),
            })  # fmt: skip
    integ = str(ckpts["integrity"]) if "integrity" in ckpts else None
    all_records: dict[int, list[dict]] = {}
    for tp in served:
        print(f"served TP{tp}: {len(rows)} rows x {ns.rounds} rounds", flush=True)
        job = {"rows": rows, "rounds": ns.rounds, "dtype": DTYPE, "integrity": integ,
               "weights_bytes": rows[0]["exported_bytes"]}  # fmt: skip
        all_records[tp] = run_world(tp, job, ns.work / f"tp{tp}", ns.timeout, ns.threads)
    summaries = []
    for family in families:
        for tp in served:
            for row in rows:
                if row["family"] == family:
                    summaries.append(summarise_row(all_records[tp], dict(row, served=tp)))
    integrity = [s for tp in served if (s := summarise_integrity(all_records[tp], tp))]
    manifest_bytes = 0
    if integ:
        tracker = (Path(integ) / "latest_checkpointed_iteration.txt").read_text().strip()
        it = Path(integ) / f"iter_{int(tracker):07d}"
        manifest = json.loads((it / "integrity.json").read_text())["files"]
        manifest_bytes = sum((it / n).stat().st_size for n in manifest)
    loads = [r["loadavg"] for recs in all_records.values() for r in recs if r.get("loadavg")]
    text = [table(summaries), ""]
    text += integrity_lines(integrity, manifest_bytes)
    ratios = [s["megatron/exported"] for s in summaries if s["megatron/exported"] is not None]
    text.append(
        f"rows with megatron/exported <= 1.0: {sum(r <= 1.0 for r in ratios)}/{len(ratios)}, "
        f"<= 0.8: {sum(r <= 0.8 for r in ratios)}/{len(ratios)}; worst {max(ratios):.2f}"
        if ratios
        else "no rows"
    )
    on_disk = dir_bytes(Path(rows[0]["megatron"]))
    text.append(
        f"model: {params / 1e9:.3f} B parameters ({ns.size}), {rows[0]['exported_bytes'] / 1e9:.2f}"
        f" GB of weights, {on_disk / 1e9:.2f} GB per run root "
        f"({'with' if not ns.no_optimizer else 'without'} Adam state); {ns.rounds} paired rounds,"
        f" order alternated, warm page cache; seconds are medians of build+load (the slowest "
        "rank), ratios medians of per-round ratios"
    )
    one_min = [x[0] for x in loads] or [0.0]
    text.append(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {_version('torch')}, "
        f"sglang {_version('sglang')}; torch threads per rank: "
        + ", ".join(f"TP{tp} {threads_per_rank(tp, ns.threads)}" for tp in served)
        + "; 1-min load average during the rows "
        f"{min(one_min):.1f}-{max(one_min):.1f} (mean {statistics.mean(one_min):.1f}); "
        f"at start {load_start[0]:.1f}; preparation {prepared - started:.0f} s, "
        f"rows {time.perf_counter() - prepared:.0f} s"
    )
    print("\n" + "\n".join(text))
    if ns.json:
        ns.json.write_text(
            json.dumps(
                {
                    "rows": summaries,
                    "integrity": integrity,
                    "text": "\n".join(text),
                    "preparation": ckpts["timings"],
                    "records": all_records,
                },
                indent=1,
                default=str,
            )
        )
    return 0


# ============================================================================================
# Rank side
# ============================================================================================


class _LoadedLog(logging.Handler):
    """The loader's weight-read time, from its own log: the time between its "... GB to read"
    line (just before the reads) and its "Loaded N parameters ... in X s (Y GB read" line (just
    after); the X it prints (two decimals) where the first line is missing."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.last: tuple[float, float] | None = None
        self.started: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            message = record.getMessage()
            if _TO_READ.search(message):
                self.started = record.created
            match = _LOADED.search(message)
            if match:
                seconds = float(match.group(2))
                if self.started is not None:
                    seconds = record.created - self.started
                self.last = (seconds, float(match.group(3)) * 1e9)
                self.started = None


def _status_kb(field: str) -> int | None:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rchar() -> int:
    match = re.search(r"rchar:\s+(\d+)", Path("/proc/self/io").read_text())
    return int(match.group(1)) if match else 0


@dataclasses.dataclass
class Floor:
    """Byte ranges read into one reused buffer: ``preadv`` per contiguous run, one strided copy
    from a mapping per group of equal runs at a constant stride (a column slice)."""

    files: list[str]
    spans: list[tuple[int, int, int]]  # file index, offset, length (contiguous)
    strided: list[tuple[int, int, int, int, int]]  # file index, offset, length, stride, count
    total: int
    buffer: bytearray

    @classmethod
    def from_runs(cls, runs: list[tuple[str, int, int]], piece: int = 64 * 2**20) -> Floor:
        by_file: dict[str, list[tuple[int, int]]] = {}
        for path, off, n in runs:
            by_file.setdefault(path, []).append((off, off + n))
        files = sorted(by_file)
        merged: list[tuple[int, int, int]] = []
        for i, path in enumerate(files):
            cur: list[list[int]] = []
            for lo, hi in sorted(by_file[path]):
                if cur and lo <= cur[-1][1]:
                    cur[-1][1] = max(cur[-1][1], hi)
                else:
                    cur.append([lo, hi])
            merged += [(i, lo, hi - lo) for lo, hi in cur]
        spans: list[tuple[int, int, int]] = []
        strided: list[tuple[int, int, int, int, int]] = []
        j = 0
        while j < len(merged):
            f, off, n = merged[j]
            k = j + 1
            stride = merged[k][1] - off if k < len(merged) and merged[k][0] == f else 0
            while (k < len(merged) and merged[k][0] == f and merged[k][2] == n
                   and merged[k][1] - merged[k - 1][1] == stride):  # fmt: skip
                k += 1
            if k - j >= 8:
                strided.append((f, off, n, stride, k - j))
                j = k
                continue
            for lo in range(off, off + n, piece):
                spans.append((f, lo, min(piece, off + n - lo)))
            j += 1
        biggest = max([n for _, _, n in spans] + [n * c for _, _, n, _, c in strided] + [1])
        buffer = bytearray(biggest)
        buffer[:] = b"\1" * biggest  # resident before the first timed read
        total = sum(n for _, _, n in spans) + sum(n * c for _, _, n, _, c in strided)
        return cls(files, spans, strided, total, buffer)

    @property
    def runs(self) -> int:
        return len(self.spans) + sum(c for *_, c in self.strided)

    def read(self) -> float:
        import numpy as np

        start = time.perf_counter()
        view = memoryview(self.buffer)
        fds = [os.open(p, os.O_RDONLY) for p in self.files]
        try:
            for f, off, n in self.spans:
                done = 0
                while done < n:
                    got = os.preadv(fds[f], [view[done:n]], off + done)
                    if got <= 0:
                        raise OSError(f"short read in {self.files[f]}")
                    done += got
            if self.strided:
                dest = np.frombuffer(self.buffer, dtype=np.uint8)
                for f, off, n, stride, count in self.strided:
                    page = off - off % mmap.ALLOCATIONGRANULARITY
                    length = off - page + stride * (count - 1) + n
                    mm = mmap.mmap(fds[f], length, prot=mmap.PROT_READ, offset=page)
                    try:
                        src = np.frombuffer(mm, dtype=np.uint8)
                        rows = np.lib.stride_tricks.as_strided(
                            src[off - page :], shape=(count, n), strides=(stride, 1)
                        )
                        np.copyto(dest[: count * n].reshape(count, n), rows)
                        del src, rows
                    finally:
                        mm.close()
        finally:
            for fd in fds:
                os.close(fd)
        return time.perf_counter() - start


class Rank:
    def __init__(self, job: dict[str, Any], rank: int) -> None:
        sys.path[:0] = [str(TP_DIR), str(CPU_STUB)]
        import harness
        import torch.distributed as dist

        self.h, self.dist, self.job, self.rank = harness, dist, job, rank
        self.world = harness.World(**job["world"])
        self.workdir = Path(job["workdir"])
        self.links = self.workdir / "links"
        self.out = open(self.workdir / f"rank{rank}.jsonl", "a")  # noqa: SIM115
        self.loaded = _LoadedLog()
        logger = logging.getLogger("sglang_megatron_loader")
        logger.addHandler(self.loaded)
        logger.setLevel(logging.INFO)
        self.peak_ok = _reset_peak()
        self.count = 0

    # -- plumbing -------------------------------------------------------------------------

    def emit(self, **rec: Any) -> None:
        rec["rank"], rec["attempt"] = self.rank, self.job.get("attempt", 0)
        self.out.write(json.dumps(rec, default=str) + "\n")
        self.out.flush()

    def progress(self, line: str) -> None:
        if self.rank == 0:
            with open(self.workdir / "progress.txt", "a") as fh:
                fh.write(line + "\n")

    def barrier(self) -> None:
        self.dist.barrier()

    def settle(self) -> None:
        """Before a round: wait (untimed, up to 5 min) until the machine has memory to spare,
        so that no timed build runs while the page cache is being evicted."""
        if self.rank == 0:
            need = self.world.tp * 2**30 + 2 * self.job.get("weights_bytes", 0)
            deadline = time.monotonic() + 300
            while mem_available() < need and time.monotonic() < deadline:
                time.sleep(5)
        self.barrier()

    def fresh_copy(self, src: str) -> Path:
        """Rank 0 links ``src`` under a new path; every rank gets the path (after a barrier)."""
        self.count += 1
        dst = self.links / f"c{self.count:05d}" / Path(src).name
        if self.rank == 0:
            from make_bench_layouts import link_tree  # this script's folder: sys.path[0]

            link_tree(Path(src), dst)
        self.barrier()
        return dst

    def drop_copy(self, path: Path) -> None:
        self.barrier()
        if self.rank == 0:
            shutil.rmtree(path.parent, ignore_errors=True)

    def server_args(self, path: Path, load_format: str, extra: dict | None = None) -> Any:
        from sglang.srt.server_args import prepare_server_args

        argv = [
            "--model-path", str(path),
            "--load-format", load_format,
            "--device", "cpu",
            "--dtype", self.job["dtype"],
            "--tp-size", str(self.world.tp),
            "--pp-size", str(self.world.pp),
            "--attention-backend", "torch_native",
            "--skip-tokenizer-init",
        ]  # fmt: skip
        if extra:
            argv += ["--model-loader-extra-config", json.dumps(extra)]
        return prepare_server_args(argv)

    def build(self, path: Path, load_format: str, extra: dict | None = None,
              recorder: Any = None) -> dict[str, Any]:  # fmt: skip
        """One timed SGLang build+load; the model is dropped before returning."""
        args = self.server_args(path, load_format, extra)
        gc.collect()
        self.loaded.last = None
        peak_ok = _reset_peak()
        self.barrier()
        io0, t0 = _rchar(), time.perf_counter()
        if recorder is not None:
            with recorder.active():
                model = self.h._build(args, self.rank)
        else:
            model = self.h._build(args, self.rank)
        seconds = time.perf_counter() - t0
        io1 = _rchar()
        peak = _status_kb("VmHWM") if peak_ok else None
        del model
        gc.collect()
        read = self.loaded.last if load_format == "megatron" else None
        return {
            "seconds": seconds,
            "mem_available": mem_available(),
            "peak_rss": peak,
            "rss_after": _status_kb("VmRSS"),
            "rchar": io1 - io0,
            "read_s": read[0] if read else None,
            "read_bytes_logged": read[1] if read else None,
        }

    # -- one matrix row -----------------------------------------------------------------------

    def recorded(self, row: dict[str, Any]) -> Floor | None:
        """Untimed megatron build under the read recorder: bytes read and the floor's ranges."""
        copy = self.fresh_copy(row["megatron"])
        rec, ok, err = None, False, None
        try:
            from read_recorder import ReadRecorder

            rec = ReadRecorder(str(copy))
            res = self.build(copy, "megatron", recorder=rec)
            ok = True
        except Exception as exc:  # the recorder follows package internals; fall back
            err = f"{type(exc).__name__}: {exc}"
            res = self.build(copy, "megatron")
        self.drop_copy(copy)
        floor = None
        total = data = None
        if ok and rec is not None:
            reads = rec.reads
            total = sum(n for *_, n in reads)
            runs = [
                (str(Path(row["megatron"]) / f), o, n)
                for phase, kind, f, o, n in reads
                if phase == "load" and kind == "data"
            ]
            data = sum(n for *_, n in runs)
            floor = Floor.from_runs(runs) if runs else None
        self.emit(row=row["id"], mode="recorded", recorder_ok=ok, recorder_error=err,
                  bytes_total=total, bytes_data=data, rchar=res["rchar"],
                  floor_runs=floor.runs if floor else None,
                  floor_bytes=floor.total if floor else None)  # fmt: skip
        return floor

    def row(self, row: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        la = loadavg()
        floor = self.recorded(row)
        copy = self.fresh_copy(row["exported"])
        self.build(copy, "auto")  # warm-up of the export (page cache, first-use imports)
        self.drop_copy(copy)
        for rnd in range(self.job["rounds"]):
            self.settle()
            order = ["megatron", "exported", "floor"]
            if rnd % 2:
                order = ["exported", "megatron", "floor"]
            for mode in order:
                if mode == "floor":
                    if floor is None:
                        continue
                    self.barrier()
                    res = {"seconds": floor.read()}
                    self.barrier()
                else:
                    src = row["megatron"] if mode == "megatron" else row["exported"]
                    copy = self.fresh_copy(src)
                    res = self.build(copy, "megatron" if mode == "megatron" else "auto")
                    self.drop_copy(copy)
                self.emit(row=row["id"], mode=mode, round=rnd, **res)
        self.emit(row=row["id"], mode="done", loadavg=la, seconds=time.perf_counter() - t0)
        self.progress(f"{row['id']}: {time.perf_counter() - t0:.0f} s (load avg {la[0]:.1f})")

    # -- integrity ----------------------------------------------------------------------------

    def integrity(self, src: str) -> None:
        t0 = time.perf_counter()
        la = loadavg()
        verdicts = self.workdir / "verdicts"
        if self.rank == 0:
            shutil.rmtree(verdicts, ignore_errors=True)
        for rnd in range(self.job["rounds"]):
            self.settle()
            p_off = self.fresh_copy(src)
            p_auto = self.fresh_copy(src)
            # fresh verdicts for this round: the first load on this machine
            os.environ[VERDICT_ENV] = str(verdicts / f"r{rnd}")
            if self.rank == 0:
                (verdicts / f"r{rnd}").mkdir(parents=True, mode=0o700)
            time.sleep(1.5)  # links change the inodes' ctime: let them settle (kept verdicts)
            self.barrier()
            plan = [("off", p_off, "off"), ("first", p_auto, "auto"),
                    ("later", p_auto, "auto"), ("off2", p_auto, "off")]  # fmt: skip
            if rnd % 2:
                plan = [plan[1], plan[0], plan[3], plan[2]]
            for mode, path, setting in plan:
                res = self.build(path, "megatron", {"verify_integrity": setting})
                self.emit(row="integrity", mode=mode, round=rnd, **res)
            self.drop_copy(p_off)
            self.drop_copy(p_auto)
        os.environ.pop(VERDICT_ENV, None)
        self.emit(row="integrity", mode="done", loadavg=la, seconds=time.perf_counter() - t0)
        self.progress(f"integrity: {time.perf_counter() - t0:.0f} s (load avg {la[0]:.1f})")


def oom_first() -> None:
    """Ask the kernel's OOM killer to pick this process first (the machine is shared)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


def worker(job_path: str, rank: int) -> None:
    oom_first()
    job = json.loads(Path(job_path).read_text())
    r = Rank(job, rank)
    r.h._cpu_sglang_environment()
    first = r.server_args(Path(job["rows"][0]["megatron"]), "megatron")
    r.h._init_world(r.world, rank, job["port"], first)
    if rank == 0:
        shutil.rmtree(r.links, ignore_errors=True)
    r.barrier()
    if not r.peak_ok:
        r.progress("note: /proc/self/clear_refs not writable: peak RSS is the process's")
    skip = set(job.get("skip", []))
    for row in job["rows"]:
        if row["id"] not in skip:
            r.row(row)
    if job.get("integrity") and "integrity" not in skip:
        r.integrity(job["integrity"])
    r.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter and gloo teardown


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        try:
            worker(sys.argv[2], int(sys.argv[3]))
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
    sys.exit(main())
