"""Test-only: the ranks of ``test_iteration_consistency.py``, SGLang's real model over gloo.

Two steps, each a separate process, as SGLang runs them:

- ``launch JOB``: the launcher. Resolves the server arguments once (``ServerArgs.resolve_once``,
  what ``Engine`` does before it starts the schedulers) and pickles them, as SGLang hands them to
  the scheduler processes.
- ``JOB RANK``: one scheduler rank. Builds the model from the pickled arguments through
  SGLang's loading path; rank 0 then moves the run's tracker on and rank 1 waits for that
  before it builds (training published a new iteration while the ranks started). Then both
  reload through SGLang's own ``WeightUpdater.update_weights_from_disk`` (which the plugin
  hooks): first an iteration whose data file is cut short in a part only rank 1 reads, then a
  good one. After each step every parameter is compared with SGLang's default loader on the
  Hugging Face export of the iteration expected to be served.

Every SGLang-on-CPU adjustment is ``harness._cpu_sglang_environment``; results go to
``rankN.json``.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from harness import (
    World,
    _build,
    _cpu_sglang_environment,
    _init_world,
    _publish,
    _server_args,
    build_with_configs,
    compare,
)

TRACKER = "latest_checkpointed_iteration.txt"
WAIT_S = 300.0


def launch(job: dict[str, Any]) -> None:
    """The launcher: resolve the arguments once, pickle them for the ranks."""
    _cpu_sglang_environment()
    args = _server_args(job["run_root"], World(**job["world"]), job["dtype"], "megatron")
    args.resolve_once()
    Path(job["server_args"]).write_bytes(pickle.dumps(args))


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.2)


def _updater(model: torch.nn.Module, model_config: Any, load_config: Any, rank: int) -> Any:
    """SGLang's own ``WeightUpdater``, wired to this model as the model runner wires it."""
    from sglang.srt.model_executor.model_runner_components.weight_updater import WeightUpdater

    runner = SimpleNamespace(load_config=load_config, is_draft_worker=False, recorded=[])
    return WeightUpdater(
        tp_rank=rank,
        device="cpu",
        gpu_id=rank,
        model_config=model_config,
        custom_weight_loaders={},
        get_model=lambda: model,
        update_model_fields=lambda new, **fields: runner.recorded.append(fields["model_path"]),
        recapture_cuda_graph=lambda: None,
        get_model_runner=lambda: runner,
    )


def _move_tracker(run_root: Path, rank: int, value: str) -> None:
    """Every rank waits until rank 0 has written the tracker (then it is ``value`` for all)."""
    dist.barrier()
    if rank == 0:
        (run_root / TRACKER).write_text(value)
    dist.barrier()


def main(job_path: str, rank: int) -> None:
    job = json.loads(Path(job_path).read_text())
    world, run_root, workdir = World(**job["world"]), Path(job["run_root"]), Path(job_path).parent
    _cpu_sglang_environment()
    args = pickle.loads(Path(job["server_args"]).read_bytes())
    _init_world(world, rank, job["port"], args)
    out: dict[str, Any] = {"rank": rank}

    if rank > 0:  # a later rank starts after training published the next iteration
        _wait_for(workdir / "rank0_built")
    model, model_config, load_config = build_with_configs(args, rank)
    if rank == 0:
        (run_root / TRACKER).write_text(job["published_while_starting"])
        (workdir / "rank0_built").touch()
    hf = {
        name: _build(_server_args(path, world, job["dtype"], "safetensors"), rank)
        for name, path in job["hf"].items()
    }
    _publish(args, rank)
    out["start"] = {"model_path": model_config.model_path, "vs": compare(model, hf["start"])}

    updater = _updater(model, model_config, load_config, rank)
    for step in job["reloads"]:
        _move_tracker(run_root, rank, step["tracker"])
        ok, message = updater.update_weights_from_disk(str(run_root), "megatron")
        out[step["name"]] = {
            "ok": ok,
            "message": message,
            "model_path": model_config.model_path,
            "vs": compare(model, hf[step["expect"]]),
        }
    (workdir / f"rank{rank}.json").write_text(json.dumps(out, indent=1))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter and gloo teardown


if __name__ == "__main__":
    if sys.argv[1] == "launch":
        launch(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main(sys.argv[1], int(sys.argv[2]))
