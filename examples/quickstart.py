"""Quickstart: build a tiny real Megatron checkpoint, serve it with SGLang, print a continuation.

    .venv/bin/python examples/quickstart.py [--keep-server]

1. Writes a tiny Llama-style checkpoint with megatron-core (CPU, ~10 s) under out/quickstart/.
2. Starts the unmodified SGLang server on it:
       python -m sglang.launch_server --model-path out/quickstart/tiny_llama \
           --load-format megatron --skip-tokenizer-init ...
   It serves on the CPU (--device cpu --attention-backend torch_native), with tests/cpu_stub on
   PYTHONPATH: a stand-in for sgl-kernel's CPU build, which is not on PyPI. On a GPU machine,
   serve with the plain command in the README instead.
3. Sends token ids to /generate and prints the greedy continuation next to Megatron's own,
   plus the weight-load time the loader logged.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))
sys.path.insert(0, str(REPO / "tests" / "cpu_stub"))

import serve_helpers as sh  # noqa: E402
from make_megatron_checkpoint import ensure_fixture  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "out" / "quickstart")
    parser.add_argument("--variant", default="fp32_tp1", help="fixture variant to build")
    ns = parser.parse_args()

    t0 = time.monotonic()
    run_root = ensure_fixture(ns.out, ns.variant)
    print(f"[1/3] Megatron checkpoint: {run_root} ({time.monotonic() - t0:.1f} s)")
    ref = torch.load(f"{run_root}.reference.pt", weights_only=True)

    print(
        "[2/3] starting: python -m sglang.launch_server --model-path",
        run_root,
        "--load-format megatron --skip-tokenizer-init --device cpu ...",
    )
    t0 = time.monotonic()
    log = ns.out / "server.log"
    proc = sh.start_server(
        run_root, dtype="float32", extra_args=["--load-format", "megatron"], log_path=log
    )
    try:
        print(f"      server healthy after {time.monotonic() - t0:.1f} s (log: {log})")
        prompt, megatron_tokens = ref["prompts"][0], ref["greedy"][0]
        out = sh.generate(proc.port, prompt, max_new_tokens=len(megatron_tokens))
    finally:
        sh.stop_server(proc)
    loaded = re.search(
        r"Loaded (\d+) parameters .* in ([\d.]+) s \(([\d.]+) GB read",
        log.read_text(errors="replace"),
    )
    print("[3/3] prompt token ids:      ", prompt)
    print("      SGLang continuation:   ", out["output_ids"])
    print("      Megatron continuation: ", megatron_tokens)
    if loaded:
        print(
            f"      weights: {loaded.group(1)} parameters loaded in {loaded.group(2)} s "
            f"({loaded.group(3)} GB read from the checkpoint)"
        )
    same = out["output_ids"] == megatron_tokens
    print("      match:", "yes" if same else "NO")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
