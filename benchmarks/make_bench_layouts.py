"""One Llama-shaped model saved by megatron-core in several training layouts, Adam state included.

    python benchmarks/make_bench_layouts.py --out DIR --layout tp2 --base DIR/tp1 \\
        --shape-json '{"num_layers": 12, ...}' [--norms-fp32 --distributed-optimizer]
        [--no-optimizer]

Each call writes ONE run root (``DIR/latest_checkpointed_iteration.txt``, ``iter_0000100/``) as
a Megatron-LM ``pretrain_gpt.py`` bf16 run at that layout writes it at ``--save`` with
``--ckpt-format torch_dist``: one ``dist_checkpointing.save`` of ``args``, the model, megatron's
real optimizer (``Float16OptimizerWithFloat16Params`` in a ``ChainedOptimizer``, or
``DistributedOptimizer`` with ``--distributed-optimizer``; Adam state filled as after
``iteration`` steps), the scheduler, the RNG state (one ``ShardedObject`` per
(pp, tp) rank, as ``get_rng_state``) and the FLOP counter, from ``tp * pp`` gloo processes
(DP 1), through ``FullyParallelSaveStrategyWrapper(TorchDistSaveShardedStrategy)``; then
the run's tokenizer in ``iter_*/tokenizer/`` and the tracker file. The building blocks are
``make_bench_checkpoint.py``'s (megatron's optimizer on a CPU, the view pre-split, the args).

Layouts: ``tp1`` (the base: weights filled from ``--seed``), then ``tp2``, ``tp4``, ``pp2``:
each rank builds its ``GPTModel`` stage and loads the weights from the ``tp1`` run root with
megatron's own ``dist_checkpointing.load`` (megatron's resharding), so every layout holds the
same weights; the Adam moments are filled per rank (they are never read by a loader of weights).

``--norms-fp32``: the RMSNorm weights stay fp32 in the bf16 model (mixed dtypes per key). Needs
``--distributed-optimizer`` (``DistributedOptimizer``, ``dp_reshardable`` buckets, one per
(param dtype, grad dtype)): megatron-core's non-distributed ``Float16OptimizerWithFloat16Params``
cannot save fp32 parameters (its ``sharded_state_dict`` maps only the 16-bit groups: "Param id
N does not match any model sharded param").

``--integrity-copy DIR``: instead of generating, make DIR a hard-linked copy of ``--base`` with
megatron-core's own ``integrity.json`` (``save_integrity_manifest``: what ``dist_checkpointing.save
(..., verify_integrity=True)`` writes, i.e. Megatron-LM ``--verify-integrity``).

The vocabulary must pad to the same number of rows at every layout's TP (Megatron-LM pads to a
multiple of 128 x TP), so one set of weights fits all of them; the caller picks such a size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_bench_checkpoint as mb  # noqa: E402  (also puts tests/fixtures on sys.path)

fx = mb.fx

LAYOUTS: dict[str, tuple[int, int]] = {"tp1": (1, 1), "tp2": (2, 1), "tp4": (4, 1), "pp2": (1, 2)}


@dataclasses.dataclass(frozen=True)
class Job:
    out: str
    layout: str
    shape: dict[str, Any]
    norms_fp32: bool = False
    optimizer: bool = True
    distributed_optimizer: bool = False
    base: str | None = None  # the tp1 run root to load the weights from (None: fill them)
    seed: int = 1234
    iteration: int = 100

    @property
    def tp(self) -> int:
        return LAYOUTS[self.layout][0]

    @property
    def pp(self) -> int:
        return LAYOUTS[self.layout][1]

    def spec(self) -> mb.BenchSpec:
        return mb.BenchSpec(
            name=f"bench_{self.layout}",
            shape=mb.Shape(**self.shape),
            dtype="bf16",
            optimizer=self.optimizer,
            distributed_optimizer=self.distributed_optimizer,
            iteration=self.iteration,
            seed=self.seed,
        )

    def variant(self) -> Any:
        return dataclasses.replace(
            self.spec().variant(), tp=self.tp, pp=self.pp, norms_fp32=self.norms_fp32
        )


def padded_vocab_everywhere(shape: dict[str, Any], layouts: list[str]) -> int:
    """The padded vocabulary, the same at every layout's TP (else ValueError)."""
    sizes = {
        fx.Variant(name="x", tp=LAYOUTS[name][0], **_variant_dims(shape)).padded_vocab_size
        for name in layouts
    }
    if len(sizes) != 1:
        raise ValueError(f"vocab {shape['vocab_size']} pads to {sorted(sizes)} rows across TPs")
    return sizes.pop()


def _variant_dims(shape: dict[str, Any]) -> dict[str, Any]:
    return {
        "num_layers": shape["num_layers"],
        "hidden_size": shape["hidden_size"],
        "ffn_hidden_size": shape["ffn_hidden_size"],
        "num_attention_heads": shape["num_attention_heads"],
        "num_query_groups": shape["num_query_groups"],
        "vocab_size": shape["vocab_size"],
        "max_position_embeddings": shape.get("max_position_embeddings", 4096),
    }


# --------------------------------------------------------------------------------------------
# Rank side (spawned processes; megatron imported here only)
# --------------------------------------------------------------------------------------------


def _args_for(job: Job, run_root: Path) -> argparse.Namespace:
    args = mb.bench_args(job.spec(), run_root)
    v = job.variant()
    args.__dict__.update(
        tensor_model_parallel_size=v.tp,
        pipeline_model_parallel_size=v.pp,
        expert_tensor_parallel_size=v.tp,
        world_size=v.world_size,
        padded_vocab_size=v.padded_vocab_size,
    )
    return args


def _build(job: Job) -> tuple[Any, Any]:
    """This rank's ``GPTModel`` stage, uninitialised storage, wrapped as Megatron-LM does."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module

    v = job.variant()
    config = fx._transformer_config(v, v.tp, v.pp)
    config.perform_initialization = False  # filled, or loaded from the base
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=v.padded_vocab_size,
        max_sequence_length=v.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=v.tied_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=v.rotary_base,
    )
    wrapped = Float16Module(config, model)  # casts every parameter to bf16
    if job.norms_fp32:
        for name, param in model.named_parameters():
            if "norm" in name:
                param.data = param.data.float()
    return model, wrapped


def _content_metadata(job: Job) -> dict[str, Any]:
    """Megatron-LM's ``_build_sharded_state_dict_metadata(args)``."""
    from megatron.core import parallel_state

    extra = {"distrib_optim_sharding_type": "dp_reshardable"} if job.distributed_optimizer else {}
    return {
        **extra,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }


def _rng_state() -> Any:
    """Megatron-LM ``get_rng_state(ckpt_format='torch_dist')``: one shard per (pp, tp) rank."""
    import random

    import numpy as np
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    ps = parallel_state
    return ShardedObject(
        "rng_state",
        [state],
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _save(job: Job, model: Any, optimizer: Any, scheduler: Any) -> Path:
    """``save_checkpoint`` -> ``generate_state_dict`` of Megatron-LM, at this layout."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
    from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    run_root = Path(job.out)
    spec, v = job.spec(), job.variant()
    metadata = _content_metadata(job)
    state_dict: dict[str, Any] = {
        "args": _args_for(job, run_root),
        "checkpoint_version": 3.0,
        "iteration": job.iteration,
        "model": model.sharded_state_dict(metadata=metadata),
    }
    if optimizer is not None:
        state_dict["optimizer"] = optimizer.sharded_state_dict(state_dict, metadata=metadata)
        state_dict["opt_param_scheduler"] = scheduler.state_dict()
    rerun = get_rerun_state_machine().state_dict(data_iterator=None, ckpt_format="torch_dist")
    if rerun:
        state_dict["rerun_state_machine"] = rerun
    state_dict["rng_state"] = _rng_state()
    tokens = job.iteration * spec.global_batch_size * spec.shape.seq_length
    state_dict["num_floating_point_operations_so_far"] = float(
        6 * spec.shape.num_parameters() * tokens
    )
    mb.presplit_views(state_dict)
    iter_dir = run_root / v.iter_dirname
    if dist.get_rank() == 0:
        iter_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    strategy = FullyParallelSaveStrategyWrapper(
        TorchDistSaveShardedStrategy(thread_count=1),
        metadata["dp_cp_group"],
        False,
    )
    dist_checkpointing.save(
        state_dict,
        str(iter_dir),
        strategy,
        validate_access_integrity=True,
        content_metadata=_clean_metadata_for_serialization(metadata),
    )
    dist.barrier()
    if dist.get_rank() == 0:
        from make_tokenizer import make_tokenizer

        make_tokenizer(iter_dir / "tokenizer", spec.shape.vocab_size)
        (run_root / fx.TRACKER_FILENAME).write_text(str(job.iteration))
    dist.barrier()
    return iter_dir


def _rank(rank: int, job_dict: dict[str, Any], init: str) -> None:
    with contextlib.suppress(OSError):  # a shared machine: the OOM killer takes us first
        Path("/proc/self/oom_score_adj").write_text("1000")
    fx._install_cpu_shims()
    torch.set_num_threads(1)
    job = Job(**job_dict)
    start = time.perf_counter()
    with fx._process_group(Path(init), rank, job.tp * job.pp, job.tp, job.pp):
        from megatron.core import dist_checkpointing

        torch.manual_seed(job.seed)
        model, wrapped = _build(job)
        if job.base is None:
            mb.fill_parameters(model, job.seed, job.spec().init_method_std)
        else:
            base_iter = Path(job.base) / job.variant().iter_dirname
            sharded = {"model": model.sharded_state_dict(metadata=_content_metadata(job))}
            loaded = dist_checkpointing.load(sharded, str(base_iter))
            model.load_state_dict(loaded["model"], strict=True)
            del loaded, sharded
        optimizer = scheduler = None
        if job.optimizer:
            _, optimizer = mb.build_optimizer(job.spec(), wrapped)
            mb.fill_adam_state(optimizer, job.iteration, job.seed + 7919 * (rank + 1))
            scheduler = mb.build_scheduler(optimizer, _args_for(job, Path(job.out)), job.iteration)
        _save(job, model, optimizer, scheduler)
    if rank == 0:
        print(
            f"{job.layout}: saved in {time.perf_counter() - start:.1f}s, rank 0 peak RSS "
            f"{mb.peak_rss_bytes() / mb.GIB:.2f} GiB",
            flush=True,
        )
    fx._fast_exit(0)


def generate(job: Job) -> None:
    """Write ``job.out`` (replaced if it is an earlier run root) from ``tp * pp`` processes."""
    import torch.multiprocessing as mp

    out = Path(job.out)
    if out.exists():
        if not (out / fx.TRACKER_FILENAME).is_file() and any(out.iterdir()):
            raise SystemExit(f"{out} is not empty and not a run root; refusing to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="bench-layouts-") as work:
        mp.start_processes(
            _rank,
            args=(dataclasses.asdict(job), str(Path(work) / "pg")),
            nprocs=job.tp * job.pp,
            join=True,
            start_method="spawn",
        )


def link_tree(src: Path, dst: Path) -> None:
    """``cp -al``: the same files (same inodes, same page cache) under another path."""
    for root, _, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            os.link(Path(root) / name, dst / rel / name)


def integrity_copy(base: Path, out: Path) -> None:
    """``out``: hard links to ``base``'s files plus megatron-core's ``integrity.json``."""
    from megatron.core.dist_checkpointing.validation import save_integrity_manifest

    if out.exists():
        shutil.rmtree(out)
    link_tree(base, out)
    tracker = (out / fx.TRACKER_FILENAME).read_text().strip()
    save_integrity_manifest(str(out / f"iter_{int(tracker):07d}"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="the run root to write")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="tp1")
    p.add_argument("--base", type=Path, help="the tp1 run root to reshard (layouts other than tp1)")
    p.add_argument("--shape-json", help="make_bench_checkpoint.Shape fields (JSON)")
    p.add_argument("--norms-fp32", action="store_true")
    p.add_argument("--no-optimizer", action="store_true")
    p.add_argument(
        "--distributed-optimizer",
        action="store_true",
        help="DistributedOptimizer (dp_reshardable buckets); needed with --norms-fp32",
    )
    p.add_argument("--integrity-copy", type=Path, help="link --base here with integrity.json")
    ns = p.parse_args(argv)
    if ns.integrity_copy:
        fx._install_cpu_shims()
        integrity_copy(ns.base.resolve(), ns.integrity_copy.resolve())
        return 0
    if ns.out is None or ns.shape_json is None:
        raise SystemExit("--out and --shape-json are required (except with --integrity-copy)")
    if (ns.layout == "tp1") != (ns.base is None):
        raise SystemExit("--base is required for every layout but tp1 (and refused for tp1)")
    shape = json.loads(ns.shape_json)
    padded_vocab_everywhere(shape, list(LAYOUTS))
    job = Job(
        out=str(ns.out.resolve()),
        layout=ns.layout,
        shape=shape,
        norms_fp32=ns.norms_fp32,
        optimizer=not ns.no_optimizer,
        distributed_optimizer=ns.distributed_optimizer,
        base=str(ns.base.resolve()) if ns.base else None,
    )
    generate(job)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except BaseException as exc:  # report, then skip megatron's crash-prone teardown
        if isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        else:
            traceback.print_exc()
            code = 1
    fx._fast_exit(code)
