"""Load-time benchmark: SGLang on a Megatron checkpoint directly vs on its HF export.

    python benchmarks/bench_load.py CKPT [--reps 3] [--json out.json] [--work DIR]

Measured in one run, alternated (megatron, exported, megatron, exported, ...), medians reported:

* ``megatron``:     SGLang serving CKPT with ``--load-format megatron``;
* ``exported``:     SGLang's default loader on the HF safetensors export of CKPT (export untimed);
* ``convert+load``: export time + the exported load (today's workflow);
* ``raw read``:     the floor: the same model byte ranges read with plain sequential preads,
  into one reused buffer (page-cache bandwidth) and into freshly allocated memory each time.

For the servers: seconds until ``/health`` answers, SGLang's own weight-load time (its
``Load weight end. elapsed=`` log line, the same measurement for both loaders), bytes read from
the checkpoint files, and the scheduler process's peak RSS (``VmHWM``). Warm page cache; the
cold-cache variant runs only where ``/proc/sys/vm/drop_caches`` is writable (``--cold``).

The server runs on the CPU here (tests/cpu_stub, as in the tests); pass ``--gpu`` on a machine
with SGLang's CUDA kernels to serve on the GPU instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cpu_stub"))

import serve_helpers as sh  # noqa: E402

from sglang_megatron_loader.checkpoint import MegatronCheckpoint  # noqa: E402
from sglang_megatron_loader.export.stream import HfStream  # noqa: E402
from sglang_megatron_loader.export.writers import export_hf  # noqa: E402

_LOAD_END = re.compile(r"Load weight end\. elapsed=([\d.]+) s")
_OURS = re.compile(r"Loaded \d+ parameters from .* \(([\d.]+) GB read")


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def scheduler_peak_rss(proc) -> int:
    """Peak RSS (VmHWM) of the launcher's children: the scheduler holds the model."""
    import psutil

    peak = 0
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        if match:
            peak = max(peak, int(match.group(1)) * 1024)
    return peak


def serve_once(model_path: Path, extra: list[str], dtype: str, log: Path) -> dict:
    start = time.monotonic()
    proc = sh.start_server(model_path, dtype=dtype, extra_args=extra, log_path=log, timeout=900)
    health = time.monotonic() - start
    try:
        peak = scheduler_peak_rss(proc)
    finally:
        sh.stop_server(proc)
    text = log.read_text(errors="replace")
    load = _LOAD_END.search(text)
    ours = _OURS.search(text)
    return {
        "health_s": health,
        "load_s": float(load.group(1)) if load else None,
        "peak_rss": peak,
        "bytes_read": float(ours.group(1)) * 1e9 if ours else None,
    }


def model_ranges(ckpt_path: Path) -> list[tuple[str, int, int]]:
    """(file, offset, length) of every byte range the TP=1 plan reads, in file order."""
    from sglang_megatron_loader.engine import dims_for, hf_config_for
    from sglang_megatron_loader.models.llama import LLAMA
    from sglang_megatron_loader.models.rules import Tp
    from sglang_megatron_loader.planner import plan_rank

    cfg = hf_config_for(ckpt_path)
    with MegatronCheckpoint(ckpt_path) as ckpt:
        plan = plan_rank(LLAMA, dims_for(ckpt, cfg), ckpt.tensors, Tp(0, 1))
        out = []
        for key in sorted(plan.keys()):
            for c in ckpt.tensors[key].chunks:
                out.append((str(ckpt.location.iter_dir / c.relative_path), c.offset, c.length))
    return sorted(set(out), key=lambda r: (r[0], r[1]))


def raw_read(ranges: list[tuple[str, int, int]], fresh: bool) -> dict:
    """Sequential preads of ``ranges``; one reused buffer, or a new allocation per range."""
    biggest = max(n for _, _, n in ranges)
    reused = bytearray(biggest) if not fresh else None
    total, start = 0, time.perf_counter()
    files = {f: os.open(f, os.O_RDONLY) for f in {f for f, _, _ in ranges}}
    try:
        for f, off, n in ranges:
            buf = memoryview(bytearray(n) if fresh else reused)[:n]  # type: ignore[arg-type]
            done = 0
            while done < n:
                done += os.preadv(files[f], [buf[done:]], off + done)
            total += n
    finally:
        for fd in files.values():
            os.close(fd)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": total, "gbps": total / seconds / 1e9}


def median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--cold", action="store_true", help="also drop the page cache")
    ns = parser.parse_args()
    ns.work.mkdir(parents=True, exist_ok=True)
    export_dir = ns.work / "hf_export"

    with MegatronCheckpoint(ns.checkpoint) as ckpt:
        stream = HfStream(ckpt)
        dtype = str(stream.config.dtype).removeprefix("torch.")
        model_bytes = stream.total_bytes
        files_bytes = sum(ckpt.dcp.file_sizes().values())
        if not export_dir.exists():
            export_hf(stream, export_dir)
    print(
        f"checkpoint {ns.checkpoint}: {files_bytes / 1e9:.2f} GB on disk, "
        f"{model_bytes / 1e9:.2f} GB of model weights ({dtype})",
        flush=True,
    )

    runs: dict[str, list[dict]] = {"megatron": [], "exported": [], "convert+load": []}
    raws: dict[str, list[dict]] = {"raw read (reused buffer)": [], "raw read (fresh memory)": []}
    ranges = model_ranges(ns.checkpoint)
    cold_ok = drop_caches() if ns.cold else False
    if cold_ok:  # warm the cache again for the warm reps
        raw_read(ranges, fresh=False)
    for rep in range(ns.reps):
        order = ["megatron", "exported"] if rep % 2 == 0 else ["exported", "megatron"]
        for mode in order:
            if mode == "megatron":
                r = serve_once(
                    ns.checkpoint,
                    ["--load-format", "megatron"],
                    dtype,
                    ns.work / f"megatron_{rep}.log",
                )
            else:
                r = serve_once(export_dir, [], dtype, ns.work / f"exported_{rep}.log")
                r["bytes_read"] = model_bytes  # safetensors files hold exactly the weights
            runs[mode].append(r)
            print(
                f"rep {rep} {mode:9s} health {r['health_s']:.1f}s load {r['load_s']}s "
                f"peak RSS {r['peak_rss'] / 1e9:.2f} GB",
                flush=True,
            )
        t0 = time.perf_counter()
        fresh_export = ns.work / f"convert_{rep}"
        with MegatronCheckpoint(ns.checkpoint) as ckpt:
            export_hf(HfStream(ckpt), fresh_export, force=True, progress=False)
        convert_s = time.perf_counter() - t0
        import shutil

        shutil.rmtree(fresh_export)
        last = runs["exported"][-1]
        runs["convert+load"].append(
            {
                "health_s": convert_s + last["health_s"],
                "load_s": convert_s + last["load_s"],
                "peak_rss": last["peak_rss"],
                "convert_s": convert_s,
                "bytes_read": model_bytes,
            }
        )
        raws["raw read (reused buffer)"].append(raw_read(ranges, fresh=False))
        raws["raw read (fresh memory)"].append(raw_read(ranges, fresh=True))

    if cold_ok:  # one cold pass per mode: the page cache dropped right before each
        for mode, path, extra in (
            ("megatron (cold)", ns.checkpoint, ["--load-format", "megatron"]),
            ("exported (cold)", export_dir, []),
        ):
            drop_caches()
            r = serve_once(path, extra, dtype, ns.work / f"{mode.split()[0]}_cold.log")
            r["bytes_read"] = r["bytes_read"] or model_bytes
            runs[mode] = [r]
            print(f"cold {mode:9s} load {r['load_s']}s", flush=True)
        drop_caches()
        raws["raw read (cold, fresh memory)"] = [raw_read(ranges, fresh=True)]
    result = summarise(ns, runs, raws, model_bytes, files_bytes, dtype, cold_ok)
    print(result["table"])
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


def summarise(ns, runs, raws, model_bytes, files_bytes, dtype, cold_ok) -> dict:
    rows, med = [], {}
    for mode, rs in runs.items():
        med[mode] = {k: median(rs, k) for k in ("health_s", "load_s", "peak_rss", "bytes_read")}
    for mode, rs in raws.items():
        med[mode] = {"load_s": median(rs, "seconds"), "bytes_read": median(rs, "bytes")}
    head = (
        f"{'':28s}{'load s':>9s}{'GB/s':>8s}{'server /health s':>18s}{'GB read':>9s}"
        f"{'peak RSS GB':>13s}"
    )
    rows.append(head)
    for mode, m in med.items():
        gbps = model_bytes / m["load_s"] / 1e9 if m["load_s"] else float("nan")
        health = f"{m['health_s']:.1f}" if m.get("health_s") else "-"
        rss = f"{m['peak_rss'] / 1e9:.2f}" if m.get("peak_rss") else "-"
        rows.append(
            f"{mode:28s}{m['load_s']:9.2f}{gbps:8.2f}{health:>18s}"
            f"{(m['bytes_read'] or 0) / 1e9:9.2f}{rss:>13s}"
        )
    ratios = {
        "megatron/exported (load)": med["megatron"]["load_s"] / med["exported"]["load_s"],
        "megatron/exported (server start)": med["megatron"]["health_s"]
        / med["exported"]["health_s"],
        "megatron/convert+load (load)": med["megatron"]["load_s"] / med["convert+load"]["load_s"],
        "megatron/raw read reused (load)": med["megatron"]["load_s"]
        / med["raw read (reused buffer)"]["load_s"],
        "megatron/raw read fresh (load)": med["megatron"]["load_s"]
        / med["raw read (fresh memory)"]["load_s"],
    }
    rows += [f"{k}: {v:.2f}" for k, v in ratios.items()]
    rows.append(
        f"medians of {ns.reps} alternated warm-cache reps"
        + (
            "; (cold) rows: one run each right after dropping the page cache"
            if cold_ok
            else "; cold cache: not measured (drop_caches not writable here)"
            if ns.cold
            else ""
        )
    )
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    rows.append(
        f"machine: {machine}; checkpoint {files_bytes / 1e9:.2f} GB on disk, "
        f"{model_bytes / 1e9:.2f} GB model ({dtype})"
    )
    return {
        "medians": med,
        "ratios": ratios,
        "runs": runs,
        "raw": raws,
        "machine": machine,
        "table": "\n".join(rows),
    }


if __name__ == "__main__":
    sys.exit(main())
