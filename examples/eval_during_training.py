"""Evaluate each new iteration of a training run on a running server, without restarting it.

    python examples/eval_during_training.py --url http://127.0.0.1:30000 --run-root /ckpts/run

Watches ``latest_checkpointed_iteration.txt``; when it names a new iteration, asks the server to
reload (``/update_weights_from_disk`` with the run root: the server resolves the tracker file
once for all its ranks), then runs a small evaluation (greedy continuation and mean log-prob of
fixed token ids) and prints one line per iteration, labelled with the iteration the server says
it serves (``/model_info``: the ``iter_*`` folder it loaded; training may have moved on since the
tracker was read). Stops after ``--evaluations`` evaluations (0: run forever).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path

EVAL_IDS = [1, 17, 42, 99, 3]  # replace with your evaluation set


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def served_iteration(url: str) -> str:
    """The iteration the server serves: its ``model_path`` is the ``iter_*`` folder it loaded."""
    with urllib.request.urlopen(f"{url}/model_info", timeout=60) as r:
        name = Path(json.loads(r.read())["model_path"]).name
    return str(int(name.removeprefix("iter_"))) if name.startswith("iter_") else name


def evaluate(url: str) -> tuple[list[int], float]:
    out = post(
        f"{url}/generate",
        {
            "input_ids": EVAL_IDS,
            "return_logprob": True,
            "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
        },
    )
    logprobs = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"] if lp is not None]
    return out["output_ids"], sum(logprobs) / max(len(logprobs), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--run-root", type=Path, required=True)
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between checks")
    parser.add_argument("--evaluations", type=int, default=0)
    ns = parser.parse_args()

    tracker, seen, done = ns.run_root / "latest_checkpointed_iteration.txt", None, 0
    while ns.evaluations == 0 or done < ns.evaluations:
        iteration = tracker.read_text().strip() if tracker.exists() else None
        if iteration is not None and iteration != seen:
            if seen is not None:  # the server already serves the first one it saw
                res = post(f"{ns.url}/update_weights_from_disk", {"model_path": str(ns.run_root)})
                if not res.get("success"):
                    print(f"iteration {iteration}: reload refused: {res.get('message')}")
                    seen = iteration
                    continue
            tokens, mean_lp = evaluate(ns.url)
            served = served_iteration(ns.url)
            print(f"iteration {served}: greedy {tokens} mean logprob {mean_lp:.4f}", flush=True)
            seen, done = iteration, done + 1
        time.sleep(ns.poll)


if __name__ == "__main__":
    main()
