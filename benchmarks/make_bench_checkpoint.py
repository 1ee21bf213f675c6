"""Write a realistic Llama-shaped Megatron-core ``torch_dist`` checkpoint for load benchmarks.

The checkpoint is what a Megatron-LM ``pretrain_gpt.py`` bf16 run (TP1/PP1/DP1, local spec,
``--ckpt-format torch_dist``) writes at ``--save``: model weights AND the Adam optimizer state in
the same ``.distcp`` files, written by ONE ``dist_checkpointing.save`` call built exactly like
``megatron/training/checkpointing.py: save_checkpoint -> generate_state_dict``::

    {"args", "checkpoint_version": 3.0, "iteration", "model", "optimizer",
     "opt_param_scheduler", "rng_state", "num_floating_point_operations_so_far"}

saved with ``TorchDistSaveShardedStrategy`` wrapped in ``FullyParallelSaveStrategyWrapper`` (the
Megatron-LM default ``--ckpt-fully-parallel-save``) and the same content metadata
(``singleton_local_shards=False``, ``chained_optim_avoid_prefix=True``, plus
``distrib_optim_sharding_type='dp_reshardable'`` with ``--distributed-optimizer``). Layout::

    <out>/latest_checkpointed_iteration.txt        # "100"
    <out>/iter_0000100/{.metadata, __0_0.distcp, metadata.json}

With megatron-core 0.19's default single writer thread per rank, the ``.distcp`` file holds the
bytes items, then every model tensor (one contiguous run), then the optimizer tensors, in the
state dict's order. ``--writer-threads N`` (Megatron-LM ``--dist-ckpt-workers``; 0.16 wrote two
files per rank) bins the items by size into N files, which interleaves optimizer and model
tensors inside each file.

Presets (``--size``; ``--layers/--hidden/--ffn/--heads/--groups/--vocab`` override any of them):

* ``tiny``: 2 layers, hidden 128, ffn 384, 4 heads / 2 KV groups, vocab 1000 (padded 1024),
  untied: seconds to write, for smoke tests.
* ``1b``: Llama-3.2-1B: 16 layers, hidden 2048, ffn 8192, 32 heads / 8 KV groups (head dim 64),
  vocab 128256, TIED embeddings, rope base 500000: 1,235,814,400 parameters. bf16 weights are
  2.47 GB; the optimizer adds 12 bytes/param (fp32 master copy + exp_avg + exp_avg_sq) = 14.8 GB.
  Peak RSS is the live training state (weights + optimizer, 17.3 GB) + ~1.1 GB of interpreter.
* ``8b``: Llama-3-8B: 32 layers, hidden 4096, ffn 14336, 32 heads / 8 KV groups, vocab 128256,
  untied: 8,030,261,248 parameters, ~16 GB of weights + ~96 GB of optimizer state. Needs
  ~115 GB of RAM and disk; documented only (the pre-flight check refuses it on a small machine).

Llama-3.2/3.1 use Llama-3 RoPE scaling (factor 32 / 8); the checkpoints here keep
``use_rope_scaling=False`` because it only changes ``args`` (not a single stored byte) and the
loader refuses the flag until it maps it.

How the optimizer state is produced: megatron-core's REAL optimizer, built on the CPU
-------------------------------------------------------------------------------------
The model is wrapped as in Megatron-LM's ``get_model`` (``Float16Module`` for bf16, then
``DistributedDataParallel`` with fp32 gradient buffers), and the optimizer comes from
``megatron.core.optimizer.get_megatron_optimizer(OptimizerConfig(optimizer='adam', bf16=True,
...), [ddp_model])``. Its state is allocated by megatron's own ``init_state_fn`` (the function
Megatron calls before loading a checkpoint), then filled with random values and ``step``; the
optimizer section of the checkpoint is ``optimizer.sharded_state_dict(state_dict, metadata=...)``.
So every key, shape, dtype, ``param_groups`` entry and common object is megatron's own:

* default (``use_distributed_optimizer=False``, ``Float16OptimizerWithFloat16Params`` inside a
  ``ChainedOptimizer``): ``optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<model key>`` with the
  model keys' global shapes (stacked layer axis included, fc1 split by the swiglu factory), fp32,
  plus the common ``optimizer.param_groups`` / ``optimizer.state.common_step``.
* ``--distributed-optimizer`` (``DistributedOptimizer``, ``dp_reshardable`` sharding, the
  Megatron-LM default for ``--use-distributed-optimizer``): flat bucket keys
  ``optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.bfloat16, torch.float32)
  .bucket_idx_{b}.{param,exp_avg,exp_avg_sq}`` (40M-element buckets, ``--overlap-grad-reduce``).
  Its peak is ~1x the bf16 weights above the default: the parameters are views into the DDP
  parameter buffer, which :func:`presplit_views` copies out before releasing the buffer.

Three things stop that optimizer on a machine without CUDA; :func:`cuda_tensor_shims` works
around the first two for the duration of ``get_megatron_optimizer`` only:

1. ``MixedPrecisionOptimizer.__init__`` allocates ``torch.tensor([1.0], device='cuda')``
   (``_scale_one``; with a loss scale also ``found_inf`` and the grad scaler's tensors;
   ``FP32Optimizer`` its ``_scale``) -> ``RuntimeError: Found no NVIDIA driver``. The shim makes
   ``torch.tensor(..., device='cuda')`` allocate on the CPU.
2. ``Float16OptimizerWithFloat16Params`` and ``DistributedOptimizer`` sort parameters by the
   string ``param.type()`` and accept only ``'torch.cuda.{BFloat16,Half,Float}Tensor'``: a CPU
   parameter raises ``TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, ...``.
   The shim makes ``Tensor.type()`` (no arguments) report CPU tensors under their CUDA names.
3. Apex / Transformer Engine ``FusedAdam`` cannot be installed without CUDA, so megatron falls
   back to ``torch.optim.AdamW`` (as it does on any machine without them). Tensor keys, shapes and
   dtypes are unchanged; the pickled ``param_groups`` carry torch's AdamW fields (``foreach``,
   ``fused``, ...) and its per-parameter ``step`` is saved as ``common_step`` (in
   ``param_groups`` under the distributed optimizer).

Checked on the tiny preset: megatron's own ``dist_checkpointing.load`` into a fresh model and
optimizer of either kind restores weights, fp32 master weights, ``exp_avg``, ``exp_avg_sq``, the
step and the scheduler exactly (the checkpoint is resumable, not just readable).

The DDP buffers allocate on ``torch.cuda.current_device()``, which the fixture generator's
shims (``tests/fixtures/make_megatron_checkpoint.py``, reused here) turn into ``"cpu"``; the same
shims stub ``flash_mla``, ``torch.cuda.synchronize`` and the saver's results queue.

Memory: weights are created in bf16 without megatron's initialisation
(``perform_initialization=False``) and filled in place with ``normal(0, 0.02)`` (norm weights
``1 + 0.1 * normal``); the 5 GB fp32 DDP gradient buffer is released right after wrapping
(``DistributedDataParallel.offload_grad_buffers``), since no backward pass runs. What remains is
exactly what a training rank holds at save time minus gradients. ``exp_avg`` is filled with
``normal(0, 1e-4)``, ``exp_avg_sq`` with ``uniform(1e-10, 1e-8)``, ``step`` = iteration.
Megatron's writer clones, all at once before writing, every tensor that is a view of a larger
storage; the SwiGLU factory makes ``linear_fc1.weight`` and its three optimizer tensors such views
(43% of all bytes for the 1b preset, ~7.5 GB), which would not fit. :func:`presplit_views` does
those copies first, one source at a time, releasing each source: same bytes on disk, and the
save adds almost nothing to the peak (it consumes the model and optimizer objects).

Not reproduced: the CUDA RNG state (a 16-byte stand-in in ``rng_state``) and Transformer Engine
``_extra_state`` payloads (the local spec stores ``None``, as the fixtures do).

Usage::

    python benchmarks/make_bench_checkpoint.py --out /work/bench_ckpt/llama_1b --size 1b
    python benchmarks/make_bench_checkpoint.py --out /tmp/t --size tiny --distributed-optimizer
    python benchmarks/make_bench_checkpoint.py --out /tmp/t --size 1b --layers 2 --no-optimizer
    python benchmarks/make_bench_checkpoint.py --out /tmp/t --size 1b --writer-threads 2

Measured for ``--size 1b`` on 2 cores / 24 GB (megatron-core 0.19.2, torch 2.14.1 CPU): 117 s,
peak RSS 17.3 GiB, 17.30 GB on disk (2.47 GB model + 14.83 GB optimizer tensors, one file).

It prints the dimensions, the parameter count, time and peak RSS per phase, and a summary read back
from ``.metadata`` (model vs optimizer bytes); ``--report-json`` also writes that summary.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

_REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO_ROOT / "tests" / "fixtures"))

import make_megatron_checkpoint as fx  # noqa: E402  (the fixture generator: CPU shims, args)

Dtype = Literal["bf16", "fp32"]

GIB = 1024**3
#: RAM beyond the tensors themselves: interpreter, megatron, DCP planning (measured ~1 GB).
RAM_OVERHEAD_BYTES = int(1.5 * GIB)


# --------------------------------------------------------------------------------------------
# Shapes and spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Llama-style model dimensions (``vocab_size`` is the true vocab; Megatron pads it)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    tied_embeddings: bool
    rotary_base: int = 500000
    norm_epsilon: float = 1e-5
    max_position_embeddings: int = 131072
    seq_length: int = 8192
    tokenizer_model: str = "meta-llama/Llama-3.2-1B"

    @property
    def head_dim(self) -> int:
        """``hidden_size // num_attention_heads`` (Megatron's ``kv_channels`` default)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Stored embedding rows: Megatron-LM pads to a multiple of 128 (TP1)."""
        return int(math.ceil(self.vocab_size / 128) * 128)

    def num_parameters(self) -> int:
        """Parameter count of the Megatron ``GPTModel`` (tied embeddings counted once)."""
        h, d = self.hidden_size, self.head_dim
        qkv = (self.num_attention_heads + 2 * self.num_query_groups) * d * h
        proj = h * self.num_attention_heads * d
        mlp = 3 * self.ffn_hidden_size * h  # fc1 = [gate; up], fc2
        per_layer = qkv + proj + mlp + 2 * h  # + two RMSNorm weights
        embeddings = self.padded_vocab_size * h * (1 if self.tied_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h  # + final norm


PRESETS: dict[str, Shape] = {
    "tiny": Shape(
        num_layers=2,
        hidden_size=128,
        ffn_hidden_size=384,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=1000,
        tied_embeddings=False,
        max_position_embeddings=4096,
        seq_length=1024,
        tokenizer_model="bench-tiny-llama",
    ),
    # meta-llama/Llama-3.2-1B config.json (rope_scaling factor 32 not reproduced, see docstring).
    "1b": Shape(
        num_layers=16,
        hidden_size=2048,
        ffn_hidden_size=8192,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=128256,
        tied_embeddings=True,
    ),
    # meta-llama/Meta-Llama-3-8B config.json.
    "8b": Shape(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=128256,
        tied_embeddings=False,
        max_position_embeddings=8192,
        tokenizer_model="meta-llama/Meta-Llama-3-8B",
    ),
}


@dataclass(frozen=True)
class BenchSpec:
    """Everything that determines one generated checkpoint."""

    name: str
    shape: Shape
    dtype: Dtype = "bf16"
    optimizer: bool = True
    distributed_optimizer: bool = False
    iteration: int = 100
    seed: int = 1234
    global_batch_size: int = 256
    init_method_std: float = 0.02
    writer_threads: int = 1

    @property
    def model_bytes(self) -> int:
        """Bytes of model weights (all parameters in ``dtype``, as under ``Float16Module``)."""
        return self.shape.num_parameters() * (2 if self.dtype == "bf16" else 4)

    @property
    def optimizer_bytes(self) -> int:
        """Bytes of optimizer tensors (0 with ``--no-optimizer``)."""
        if not self.optimizer:
            return 0
        # exp_avg + exp_avg_sq, plus the fp32 master copy: bf16 always, fp32 only under DistOpt
        # (its dp_reshardable "param" is a view of the fp32 weights, saved again).
        master = self.dtype == "bf16" or self.distributed_optimizer
        return self.shape.num_parameters() * (12 if master else 8)

    def estimated_peak_ram(self) -> int:
        """Expected peak RSS: every tensor at once, plus the writer's clones under DistOpt."""
        clones = self.model_bytes if self.optimizer and self.distributed_optimizer else 0
        return self.model_bytes + self.optimizer_bytes + clones + RAM_OVERHEAD_BYTES

    def variant(self) -> fx.Variant:
        """The fixture generator's :class:`Variant` with these dims (for args and config)."""
        s = self.shape
        return fx.Variant(
            name=self.name,
            dtype=self.dtype,
            num_layers=s.num_layers,
            hidden_size=s.hidden_size,
            ffn_hidden_size=s.ffn_hidden_size,
            num_attention_heads=s.num_attention_heads,
            num_query_groups=s.num_query_groups,
            vocab_size=s.vocab_size,
            make_vocab_size_divisible_by=128,
            tied_embeddings=s.tied_embeddings,
            seed=self.seed,
            iteration=self.iteration,
            rotary_base=s.rotary_base,
            norm_epsilon=s.norm_epsilon,
            max_position_embeddings=s.max_position_embeddings,
            seq_length=s.seq_length,
            init_method_std=self.init_method_std,
        )


# --------------------------------------------------------------------------------------------
# Progress and memory accounting
# --------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Current resident set size, from ``/proc/self/statm``."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize()


class Progress:
    """Prints each phase with its duration, the current RSS and the peak RSS so far."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last = self.start
        self.phases: dict[str, float] = {}

    def done(self, phase: str) -> None:
        """Record that ``phase`` finished now."""
        now = time.perf_counter()
        self.phases[phase] = now - self.last
        self.last = now
        print(
            f"[{now - self.start:7.1f}s] {phase:<28} {self.phases[phase]:7.1f}s  "
            f"rss {current_rss_bytes() / GIB:5.2f} GiB  peak {peak_rss_bytes() / GIB:5.2f} GiB",
            flush=True,
        )

    @property
    def total(self) -> float:
        """Seconds since start."""
        return time.perf_counter() - self.start


# --------------------------------------------------------------------------------------------
# Megatron side
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cuda_tensor_shims() -> Iterator[None]:
    """Let megatron's optimizer classes construct on a CPU (see the module docstring, 1 and 2).

    * ``torch.tensor(..., device='cuda...')`` allocates on the CPU instead.
    * ``Tensor.type()`` without arguments reports a CPU tensor as ``torch.cuda.<T>Tensor``.

    Both are process-wide monkeypatches, restored on exit; only ``get_megatron_optimizer`` runs
    under them.
    """
    orig_tensor: Callable[..., torch.Tensor] = torch.tensor
    orig_type = torch.Tensor.type

    def tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return orig_tensor(*args, **kwargs)

    def tensor_type(self: torch.Tensor, dtype: Any = None, *args: Any, **kwargs: Any) -> Any:
        if dtype is None and not args and not kwargs and self.device.type == "cpu":
            return orig_type(self).replace("torch.", "torch.cuda.", 1)
        return orig_type(self, dtype, *args, **kwargs)

    torch.tensor = tensor  # type: ignore[assignment]
    torch.Tensor.type = tensor_type  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.tensor = orig_tensor  # type: ignore[assignment]
        torch.Tensor.type = orig_type  # type: ignore[method-assign]


def bench_args(spec: BenchSpec, save_dir: Path) -> argparse.Namespace:
    """Megatron-LM ``args`` for this run: the fixture's realistic Namespace plus training fields.

    Corresponds to ``pretrain_gpt.py ... --bf16 --use-distributed-optimizer? --overlap-grad-reduce
    --ckpt-format torch_dist --save <save_dir>`` without ``--no-save-optim/--no-save-rng``.
    """
    args = fx.megatron_args(spec.variant())
    s, gbs = spec.shape, spec.global_batch_size
    train_iters = max(1000, spec.iteration)
    args.__dict__.update(
        tokenizer_model=s.tokenizer_model,
        save=str(save_dir),
        no_save_optim=not spec.optimizer,
        no_save_rng=False,
        use_distributed_optimizer=spec.distributed_optimizer,
        overlap_grad_reduce=True,
        overlap_param_gather=spec.distributed_optimizer,
        ddp_bucket_size=None,
        dist_ckpt_optim_fully_reshardable=False,
        ckpt_fully_parallel_save=True,
        ckpt_fully_parallel_load=False,
        ckpt_assume_constant_structure=False,
        dist_ckpt_workers=spec.writer_threads,
        global_batch_size=gbs,
        micro_batch_size=4,
        train_iters=train_iters,
        lr_decay_iters=train_iters,
        lr_warmup_iters=min(50, spec.iteration),
        save_interval=spec.iteration,
        consumed_train_samples=spec.iteration * gbs,
        check_for_nan_in_loss_and_grad=True,
        rerun_mode="disabled",
    )
    return args


def build_model(spec: BenchSpec) -> tuple[Any, Any]:
    """Build the ``GPTModel`` (uninitialised ``params_dtype`` storage) and its training wrapper.

    Returns ``(gpt_model, wrapped)`` where ``wrapped`` is ``Float16Module(gpt_model)`` for bf16 (as
    Megatron-LM's ``get_model``; its ``bfloat16()`` casts the RMSNorm weights too) or the model.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module

    variant = spec.variant()
    config = fx._transformer_config(variant, 1, 1)
    config.perform_initialization = False  # weights are filled by fill_parameters()
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=variant.padded_vocab_size,
        max_sequence_length=variant.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=variant.tied_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=variant.rotary_base,
    )
    wrapped = Float16Module(config, model) if spec.dtype == "bf16" else model
    return model, wrapped


@torch.no_grad()
def fill_parameters(model: Any, seed: int, std: float) -> None:
    """Fill every weight in place: ``normal(0, std)``; norm weights ``1 + 0.1 * normal``."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.normal_(1.0, 0.1, generator=gen)
        else:
            param.normal_(0.0, std, generator=gen)


def build_optimizer(spec: BenchSpec, wrapped: Any) -> tuple[Any, Any]:
    """Wrap in ``DistributedDataParallel`` and build megatron's optimizer for it.

    Returns ``(ddp_model, optimizer)``. The gradient buffers are released at once: nothing runs a
    backward pass, and they would otherwise hold 4 bytes per parameter.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    args = bench_args(spec, Path("."))
    bf16 = spec.dtype == "bf16"
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=bf16,  # Megatron-LM: --bf16 implies fp32 grad accumulation
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=spec.distributed_optimizer,
        check_for_nan_in_grad=True,
        bucket_size=args.ddp_bucket_size,
    )
    ddp = DistributedDataParallel(wrapped.config, ddp_config, wrapped)
    ddp.offload_grad_buffers(synchronize=False, empty_cache=False)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=bf16,
        params_dtype=args.params_dtype,
        use_distributed_optimizer=spec.distributed_optimizer,
    )
    with cuda_tensor_shims():
        optimizer = get_megatron_optimizer(opt_config, [ddp])
    return ddp, optimizer


@torch.no_grad()
def fill_adam_state(optimizer: Any, step: int, seed: int) -> None:
    """Allocate the Adam state with megatron's ``init_state_fn`` and fill it as after ``step``."""
    gen = torch.Generator().manual_seed(seed + 2)
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if sub.optimizer is None:
            continue
        sub.init_state_fn(sub.optimizer, sub.config)
        for state in sub.optimizer.state.values():
            state["exp_avg"].normal_(0.0, 1e-4, generator=gen)
            state["exp_avg_sq"].uniform_(1e-10, 1e-8, generator=gen)
            state["step"] = torch.tensor(float(step))


def build_scheduler(optimizer: Any, args: argparse.Namespace, iteration: int) -> Any:
    """Megatron-LM's ``get_optimizer_param_scheduler`` (sample-based steps), advanced to
    ``iteration`` (it also sets each param group's current ``lr``/``weight_decay``)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = args.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant",
    )
    scheduler.step(increment=iteration * gbs)
    return scheduler


def rng_state_object() -> Any:
    """``get_rng_state('torch_dist', ...)`` of Megatron-LM for TP1/PP1/DP1.

    ``cuda_rng_state`` is a 16-byte stand-in (seed + offset, the size of a CUDA generator state).
    """
    import numpy as np
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rng_state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject("rng_state", [rng_state], (1, 1), (0, 0), replica_id=0)


def presplit_views(sharded_state_dict: dict[str, Any]) -> tuple[int, int]:
    """Give every view-backed ShardedTensor its own storage, one source tensor at a time.

    Megatron's writer (``FileSystemWriterAsync.prepare_write_data``) clones every CPU tensor whose
    storage is larger than the tensor, for ALL items before writing the first byte. The SwiGLU
    factory stores ``linear_fc1.weight`` (and each of its optimizer tensors) as two views,
    ``[gate; up]``; with the distributed optimizer every parameter is a view of the DDP buffer.
    For the 1b preset that is 43% of all model and optimizer bytes (~7.5 GB) cloned on top of the
    live state. Here the factories are applied first (``dist_checkpointing.save`` would do the
    same), each storage used only through views has them cloned and is then released
    (``untyped_storage().resize_(0)``, as ``offload_grad_buffers`` does), so the peak grows by one
    source tensor at most. The written bytes are identical; the model and optimizer objects are
    unusable afterwards (their storage is gone). Returns ``(views cloned, bytes released)``.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)
    by_storage: dict[int, list[Any]] = defaultdict(list)
    for item in nested_values(sharded_state_dict):
        data = getattr(item, "data", None) if isinstance(item, ShardedTensor) else None
        if isinstance(data, torch.Tensor) and data.device.type == "cpu" and data.numel() > 0:
            by_storage[data.untyped_storage().data_ptr()].append(item)
    cloned = released = 0
    for items in by_storage.values():
        storage = items[0].data.untyped_storage()
        size = storage.size()
        if any(it.data.numel() * it.data.element_size() == size for it in items):
            continue  # a ShardedTensor owns the whole storage: the writer does not clone it
        for it in items:
            it.data = it.data.clone()
            cloned += 1
        storage.resize_(0)
        released += size
    return cloned, released


def save_checkpoint(
    spec: BenchSpec,
    run_root: Path,
    model: Any,
    optimizer: Any | None,
    scheduler: Any | None,
    args: argparse.Namespace,
) -> Path:
    """One ``dist_checkpointing.save`` of the whole training state, then the tracker file.

    Mirrors ``save_checkpoint``/``generate_state_dict`` of Megatron-LM for ``torch_dist``.
    Returns the iteration folder.
    """
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
    from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    # _build_sharded_state_dict_metadata(args)
    metadata: dict[str, Any] = {}
    if spec.distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "dp_reshardable"
    metadata["singleton_local_shards"] = False
    metadata["chained_optim_avoid_prefix"] = True
    metadata["dp_cp_group"] = dp_cp_group

    # generate_state_dict(...)
    state_dict: dict[str, Any] = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": spec.iteration,
        "model": model.sharded_state_dict(metadata=metadata),
    }
    if optimizer is not None:
        state_dict["optimizer"] = optimizer.sharded_state_dict(state_dict, metadata=metadata)
        state_dict["opt_param_scheduler"] = scheduler.state_dict()
    rerun_state = get_rerun_state_machine().state_dict(data_iterator=None, ckpt_format="torch_dist")
    if rerun_state:
        state_dict["rerun_state_machine"] = rerun_state
    state_dict["rng_state"] = rng_state_object()
    tokens = spec.iteration * spec.global_batch_size * spec.shape.seq_length
    state_dict["num_floating_point_operations_so_far"] = float(
        6 * spec.shape.num_parameters() * tokens
    )

    cloned, released = presplit_views(state_dict)
    print(f"presplit_views: {cloned} views copied, {released / GIB:.2f} GiB released", flush=True)

    iter_dir = run_root / spec.variant().iter_dirname
    iter_dir.mkdir(parents=True, exist_ok=True)
    strategy = FullyParallelSaveStrategyWrapper(
        TorchDistSaveShardedStrategy(thread_count=spec.writer_threads),
        dp_cp_group,
        args.ckpt_assume_constant_structure,
    )
    dist_checkpointing.save(
        state_dict,
        str(iter_dir),
        strategy,
        validate_access_integrity=True,
        content_metadata=_clean_metadata_for_serialization(metadata),
    )
    # the run's tokenizer, as newer Megatron-LM saves it (args.vocab_size is unset in such runs;
    # the loader takes the true vocabulary from here)
    from make_tokenizer import make_tokenizer

    make_tokenizer(iter_dir / "tokenizer", spec.shape.vocab_size)
    (run_root / fx.TRACKER_FILENAME).write_text(str(spec.iteration))
    return iter_dir


def _optimizer_description(optimizer: Any) -> list[str]:
    """``['ChainedOptimizer', '<megatron class>', '<inner torch class>']`` for the report."""
    if optimizer is None:
        return []
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [
        type(optimizer).__name__,
        *sorted({type(o).__name__ for o in subs}),
        *sorted({type(o.optimizer).__name__ for o in subs if o.optimizer is not None}),
    ]


def generate(spec: BenchSpec, run_root: Path) -> dict[str, Any]:
    """Generate the checkpoint of ``spec`` at ``run_root`` in this process.

    Installs the fixture generator's process-wide CPU shims (the process must be ours alone).
    Returns the iteration folder, parameter count, optimizer classes, timings and peak RSS.
    """
    fx._install_cpu_shims()
    progress = Progress()
    run_root.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="bench-ckpt-") as work,
        fx._process_group(Path(work) / "pg", 0, 1, 1, 1),
    ):
        torch.manual_seed(spec.seed)
        args = bench_args(spec, run_root)
        model, wrapped = build_model(spec)
        n_params = sum(p.numel() for p in model.parameters())
        progress.done("build model (empty)")
        fill_parameters(model, spec.seed, spec.init_method_std)
        progress.done("fill weights")
        optimizer = scheduler = None
        if spec.optimizer:
            _, optimizer = build_optimizer(spec, wrapped)
            progress.done("DDP + megatron optimizer")
            fill_adam_state(optimizer, spec.iteration, spec.seed)
            scheduler = build_scheduler(optimizer, args, spec.iteration)
            progress.done("fill Adam state")
        iter_dir = save_checkpoint(spec, run_root, model, optimizer, scheduler, args)
        progress.done("dist_checkpointing.save")
    return {
        "iter_dir": str(iter_dir),
        "num_parameters": n_params,
        "optimizer_classes": _optimizer_description(optimizer),
        "phases_s": progress.phases,
        "total_s": progress.total,
        "peak_rss_bytes": peak_rss_bytes(),
    }


# --------------------------------------------------------------------------------------------
# Summary (plain torch: reads .metadata back)
# --------------------------------------------------------------------------------------------


def _key_group(key: str) -> str:
    """Coarse grouping of a DCP key for the byte breakdown."""
    parts = key.split(".")
    if key.startswith("optimizer.state."):
        return ".".join(parts[:3])
    if key.startswith("optimizer.distributed."):
        return "optimizer.distributed.*." + parts[-1].split("/")[0]
    if key.startswith("optimizer."):
        return "optimizer.(other)"
    if key.endswith("_extra_state") or "._extra_state/" in key:
        return "model._extra_state"
    return parts[0].split("/")[0]


def summarize(iter_dir: Path) -> dict[str, Any]:
    """Bytes by category from ``.metadata`` (logical tensor bytes and stored byte ranges).

    ``model_tensor_bytes`` counts model tensor keys (no ``optimizer.`` prefix),
    ``optimizer_tensor_bytes`` the ``optimizer.*`` tensor keys; bytes items (common state,
    ``rng_state``, ``_extra_state``, optimizer common objects) are listed separately.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(iter_dir)).read_metadata()
    stored: dict[str, int] = defaultdict(int)
    for index, info in md.storage_data.items():
        stored[index.fqn] += info.length
    groups: dict[str, dict[str, int]] = defaultdict(lambda: {"keys": 0, "bytes": 0, "stored": 0})
    model_bytes = optimizer_bytes = bytes_items = 0
    dtypes: dict[str, str] = {}
    for key, meta in md.state_dict_metadata.items():
        g = groups[_key_group(key)]
        g["keys"] += 1
        g["stored"] += stored.get(key, 0)
        if isinstance(meta, TensorStorageMetadata):
            nbytes = math.prod(meta.size) * meta.properties.dtype.itemsize
            g["bytes"] += nbytes
            dtypes[_key_group(key)] = str(meta.properties.dtype).removeprefix("torch.")
            if key.startswith("optimizer."):
                optimizer_bytes += nbytes
            else:
                model_bytes += nbytes
        else:
            bytes_items += stored.get(key, 0)
            g["bytes"] += stored.get(key, 0)
    files = sorted(p.name for p in iter_dir.iterdir() if p.suffix == ".distcp")
    on_disk = sum(p.stat().st_size for p in iter_dir.iterdir() if p.is_file())
    return {
        "model_tensor_bytes": model_bytes,
        "optimizer_tensor_bytes": optimizer_bytes,
        "bytes_items_stored": bytes_items,
        "distcp_files": files,
        "on_disk_bytes": on_disk,
        "dcp_keys": len(md.state_dict_metadata),
        "groups": {k: dict(v, dtype=dtypes.get(k, "bytes")) for k, v in sorted(groups.items())},
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _human(n: float) -> str:
    return f"{n / GIB:.2f} GiB ({n / 1e9:.2f} GB)"


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless it is an earlier run root and ``overwrite`` is set."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / fx.TRACKER_FILENAME).is_file():
        raise SystemExit(f"{out} is not empty and not a Megatron run root; refusing to touch it")
    if not overwrite:
        raise SystemExit(f"{out} already holds a checkpoint; pass --overwrite to replace it")
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _preflight(spec: BenchSpec, out: Path) -> None:
    """Refuse runs that cannot fit this machine's RAM or the output disk."""
    import psutil

    need_ram = spec.estimated_peak_ram()
    have_ram = psutil.virtual_memory().total
    if need_ram > 0.92 * have_ram:
        raise SystemExit(
            f"needs ~{_human(need_ram)} of RAM, machine has {_human(have_ram)} "
            "(--skip-checks to try anyway)"
        )
    probe = out
    while not probe.exists():
        probe = probe.parent
    need_disk = int((spec.model_bytes + spec.optimizer_bytes) * 1.02) + GIB
    free = shutil.disk_usage(probe).free
    if need_disk > free:
        raise SystemExit(
            f"needs ~{_human(need_disk)} of disk at {probe}, {_human(free)} free "
            "(--skip-checks to try anyway)"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="run root to create")
    p.add_argument("--size", choices=sorted(PRESETS), default="tiny", help="shape preset")
    p.add_argument("--layers", type=int, help="override num_layers")
    p.add_argument("--hidden", type=int, help="override hidden_size")
    p.add_argument("--ffn", type=int, help="override ffn_hidden_size")
    p.add_argument("--heads", type=int, help="override num_attention_heads")
    p.add_argument("--groups", type=int, help="override num_query_groups (KV heads)")
    p.add_argument("--vocab", type=int, help="override the true vocab size")
    tie = p.add_mutually_exclusive_group()
    tie.add_argument("--tied", dest="tied", action="store_true", default=None)
    tie.add_argument("--untied", dest="tied", action="store_false")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="params_dtype")
    p.add_argument("--no-optimizer", action="store_true", help="model only (--no-save-optim)")
    p.add_argument(
        "--distributed-optimizer",
        action="store_true",
        help="DistributedOptimizer, dp_reshardable buckets (needs ~1x weights more RAM)",
    )
    p.add_argument(
        "--writer-threads",
        type=int,
        default=1,
        help="files per rank (megatron-core 0.19 default 1: model keys, then optimizer keys; "
        ">1 bins items by size, interleaving optimizer and model tensors, as 0.16 did with 2)",
    )
    p.add_argument("--iteration", type=int, default=100)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run root at --out")
    p.add_argument("--skip-checks", action="store_true", help="skip the RAM / disk pre-flight")
    p.add_argument("--report-json", type=Path, help="also write the summary here")
    return p.parse_args(argv)


def spec_from_args(ns: argparse.Namespace) -> BenchSpec:
    """Preset plus overrides -> :class:`BenchSpec` (validated by the fixture's ``Variant``)."""
    overrides = {
        "num_layers": ns.layers,
        "hidden_size": ns.hidden,
        "ffn_hidden_size": ns.ffn,
        "num_attention_heads": ns.heads,
        "num_query_groups": ns.groups,
        "vocab_size": ns.vocab,
        "tied_embeddings": ns.tied,
    }
    shape = dataclasses.replace(
        PRESETS[ns.size], **{k: v for k, v in overrides.items() if v is not None}
    )
    spec = BenchSpec(
        name=f"llama_{ns.size}",
        shape=shape,
        dtype=ns.dtype,
        optimizer=not ns.no_optimizer,
        distributed_optimizer=ns.distributed_optimizer,
        iteration=ns.iteration,
        seed=ns.seed,
        writer_threads=ns.writer_threads,
    )
    if shape.hidden_size % shape.num_attention_heads:
        raise SystemExit("hidden must be a multiple of heads")
    try:
        spec.variant()
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    ns = parse_args(argv)
    out: Path = ns.out.resolve()
    spec = spec_from_args(ns)
    s = spec.shape
    print(
        f"{spec.name}: layers={s.num_layers} hidden={s.hidden_size} ffn={s.ffn_hidden_size} "
        f"heads={s.num_attention_heads} groups={s.num_query_groups} head_dim={s.head_dim} "
        f"vocab={s.vocab_size} (padded {s.padded_vocab_size}) tied={s.tied_embeddings} "
        f"dtype={spec.dtype}\n"
        f"params={s.num_parameters():,}  model ~{_human(spec.model_bytes)}  "
        f"optimizer ~{_human(spec.optimizer_bytes)}  est. peak RAM "
        f"~{_human(spec.estimated_peak_ram())}",
        flush=True,
    )
    _prepare_out_dir(out, ns.overwrite)
    if not ns.skip_checks:
        _preflight(spec, out)
    result = generate(spec, out)
    summary = summarize(Path(result["iter_dir"]))
    report = {
        "spec": dataclasses.asdict(spec),
        "padded_vocab_size": s.padded_vocab_size,
        **result,
        **summary,
    }
    print(f"\nwrote {result['iter_dir']}")
    print(f"parameters:        {result['num_parameters']:,}")
    print(f"optimizer:         {' / '.join(result['optimizer_classes']) or 'none'}")
    print(f"model tensors:     {_human(summary['model_tensor_bytes'])}")
    print(f"optimizer tensors: {_human(summary['optimizer_tensor_bytes'])}")
    print(f"bytes items:       {summary['bytes_items_stored']:,} B")
    print(f"on disk:           {_human(summary['on_disk_bytes'])}")
    print(f"distcp files:      {summary['distcp_files']}")
    print(f"time:              {result['total_s']:.1f}s")
    print(f"peak RSS:          {_human(result['peak_rss_bytes'])}")
    print("by key group:      (keys, logical bytes, stored bytes, dtype)")
    for name, g in summary["groups"].items():
        print(f"  {name:<44} {g['keys']:4d} {g['bytes']:>16,} {g['stored']:>16,} {g['dtype']}")
    if ns.report_json:
        ns.report_json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    try:
        exit_code = main()
    except BaseException as exc:  # report, then skip megatron's crash-prone teardown
        if isinstance(exc, SystemExit):
            exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        else:
            traceback.print_exc()
            exit_code = 1
    fx._fast_exit(exit_code)
