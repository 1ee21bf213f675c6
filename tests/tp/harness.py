"""Test-only CPU harness: SGLang's real model (``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or
``Qwen3ForCausalLM``) at TP/PP > 1 over gloo, two ways.

The parent side (the pytest process, which never imports SGLang) converts each Megatron
checkpoint the classic way into a Hugging Face folder, reading it with PyTorch's own
``torch.distributed.checkpoint`` (not with this package), and starts one process per rank. Each
rank forms the gloo group once and then, for every source layout, builds the model twice through
SGLang's own loading path (``ModelConfig.from_server_args``, ``build_load_config``,
``model_loader.get_model``): with ``--load-format megatron`` and with the default loader on the
HF folder. It compares the two parameter by parameter, buffers included, with ``torch.equal`` and
records what the Megatron load read from disk (``read_recorder.py``). Results come back as one
JSON file per rank.

Every SGLang-on-CPU adjustment (no PyNccl, no custom all-reduce, the rotary CPU flag) lives in
:func:`_cpu_sglang_environment`; nothing here is part of the package.

Run a rank by hand: ``python tests/tp/harness.py JOB.json RANK`` (JOB written by :func:`run_world`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

TESTS = Path(__file__).resolve().parents[1]
CPU_STUB = TESTS / "cpu_stub"
RANK_TIMEOUT_S = 600.0


# ---------------------------------------------------------------------------------------------
# What runs where
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """Target parallel layout: ``tp * pp`` processes, one gloo group."""

    tp: int
    pp: int = 1
    flags: tuple[str, ...] = ()  # more SGLang server flags, for both builds (DP attention ...)

    def __post_init__(self) -> None:
        object.__setattr__(self, "flags", tuple(self.flags))  # a list after a JSON round trip

    @property
    def size(self) -> int:
        return self.tp * self.pp

    @property
    def label(self) -> str:
        named = "".join(f"-{f.lstrip('-')}" for f in self.flags)
        return f"tp{self.tp}" + (f"pp{self.pp}" if self.pp > 1 else "") + named


@dataclass(frozen=True)
class Case:
    """One source layout: the Megatron run root, its HF conversion and the serving dtype.

    ``itemsize`` is the checkpoint's element size (for byte accounting on the ranks).
    """

    name: str
    megatron: str
    hf: str
    dtype: str
    itemsize: int


# ---------------------------------------------------------------------------------------------
# Parent side: the independent classic conversion (PyTorch DCP -> HF names, full tensors)
# ---------------------------------------------------------------------------------------------


def iteration_dir(run_root: Path) -> Path:
    """``iter_XXXXXXX`` named by Megatron's tracker file."""
    tracker = (run_root / "latest_checkpointed_iteration.txt").read_text().strip()
    return run_root / f"iter_{int(tracker):07d}"


def read_megatron_tensors(iter_dir: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a ``torch_dist`` folder, whole, read by PyTorch's own DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(iter_dir))
    meta = reader.read_metadata()
    state = {
        key: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for key, md in meta.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata) and "_extra_state" not in key
    }
    with warnings.catch_warnings():  # "no process group, assuming a single process": intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def checkpoint_file_bytes(iter_dir: Path) -> int:
    """Size of every data and metadata file of the iteration folder."""
    return sum(p.stat().st_size for p in iter_dir.iterdir() if p.is_file())


def split_qkv(fused: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's per-group rows ``[q_g (nq/ng heads); k_g; v_g]`` for g = 0..ng-1 -> HF's q, k, v.

    Works on the qkv weight ``[rows, hidden]`` and on the qkv bias ``[rows]`` alike.
    """
    nq, ng, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_group, tail = nq // ng, fused.shape[1:]
    groups = fused.reshape(ng, (per_group + 2) * h, *tail)
    return (
        groups[:, : per_group * h].reshape(nq * h, *tail),
        groups[:, per_group * h : -h].reshape(ng * h, *tail),
        groups[:, -h:].reshape(ng * h, *tail),
    )


def megatron_to_hf(t: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """The classic Megatron GPT -> HF Llama / Qwen2 / Qwen3 conversion, on full tensors.

    Qwen2's qkv bias is regrouped like the weight; Qwen3's ``q_layernorm`` / ``k_layernorm``
    become ``self_attn.q_norm`` / ``k_norm``. Every Megatron tensor must be used.
    """
    f, vocab, used = cfg.intermediate_size, cfg.vocab_size, set()

    def get(key: str) -> torch.Tensor:
        used.add(key)
        return t[key]

    def layer(name: str, i: int) -> torch.Tensor | None:
        per_layer, stacked = f"decoder.layers.{i}.{name}", f"decoder.layers.{name}"
        if per_layer in t:
            return get(per_layer)
        return get(stacked)[i] if stacked in t else None

    hf = {"model.embed_tokens.weight": get("embedding.word_embeddings.weight")[:vocab]}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        hf.update(
            {
                p + "input_layernorm.weight": layer(
                    "self_attention.linear_qkv.layer_norm_weight", i
                ),
                p + "self_attn.o_proj.weight": layer("self_attention.linear_proj.weight", i),
                p + "post_attention_layernorm.weight": layer("mlp.linear_fc1.layer_norm_weight", i),
            }
        )
        fc1 = layer("mlp.linear_fc1.weight", i)
        if fc1 is not None:
            hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"] = fc1[:f], fc1[f:]
            hf[p + "mlp.down_proj.weight"] = layer("mlp.linear_fc2.weight", i)
        else:
            hf.update(moe_to_hf(lambda name, i=i: layer(name, i), p, cfg))
        for leaf in ("weight", "bias"):
            fused = layer(f"self_attention.linear_qkv.{leaf}", i)
            if fused is not None:
                q, k, v = split_qkv(fused, cfg)
                hf.update({p + f"self_attn.{n}_proj.{leaf}": x for n, x in zip("qkv", (q, k, v))})
        for n in "qk":
            norm = layer(f"self_attention.{n}_layernorm.weight", i)
            if norm is not None:
                hf[p + f"self_attn.{n}_norm.weight"] = norm
    hf["model.norm.weight"] = get("decoder.final_layernorm.weight")
    if not cfg.tie_word_embeddings:
        hf["lm_head.weight"] = get("output_layer.weight")[:vocab]
    unused = sorted(set(t) - used)
    if unused:
        raise ValueError(f"the classic conversion does not know {unused}")
    return {k: v.contiguous() for k, v in hf.items()}


# HF expert names (gate, up, down) and block of the MoE families
HF_EXPERTS = {
    "MixtralForCausalLM": ("block_sparse_moe", "w1", "w3", "w2"),
    "Qwen3MoeForCausalLM": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


def moe_to_hf(layer: Any, p: str, cfg: Any) -> dict[str, torch.Tensor]:
    """One MoE layer: the router -> ``gate``, each expert's fc1 ``[gate; up]`` and fc2 -> the
    HF per-expert tensors (Megatron stacks experts on a global axis, ``experts.experts.*``)."""
    block, gate, up, down = HF_EXPERTS[cfg.architectures[0]]
    fc1 = layer("mlp.experts.experts.linear_fc1.weight")
    fc2 = layer("mlp.experts.experts.linear_fc2.weight")
    f = fc1.shape[1] // 2
    out = {f"{p}{block}.gate.weight": layer("mlp.router.weight")}
    for e in range(fc1.shape[0]):
        q = f"{p}{block}.experts.{e}."
        out[q + f"{gate}.weight"], out[q + f"{up}.weight"] = fc1[e, :f], fc1[e, f:]
        out[q + f"{down}.weight"] = fc2[e]
    return out


# Megatron's ``RotaryEmbedding._apply_scaling`` defaults; only the factor is an argument.
LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def hf_config_for_variant(variant: Any) -> Any:
    """The transformers config from the fixture's own variant definition: Qwen3 for q/k
    layernorm, Qwen2 for qkv bias, else Llama; Llama-3.x rope scaling when trained with it."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(variant.rotary_base)}
    if variant.rope_scaling_factor is not None:
        # the model was built as Megatron-LM's GPT builder builds it: rope_scaling on, the
        # factor not passed (GPTModel's default 8), whatever args.rope_scaling_factor records
        rope.update(rope_type="llama3", factor=8.0, **LLAMA3_ROPE)
    moe = {"num_experts_per_tok": variant.moe_router_topk} if variant.num_experts else {}
    ffn = variant.ffn_hidden_size
    if variant.num_experts and variant.qk_layernorm:
        cls, extra = Qwen3MoeConfig, {"attention_bias": False, "num_experts": variant.num_experts}
        extra.update(moe, moe_intermediate_size=variant.moe_ffn_hidden_size or ffn)
        extra.update(norm_topk_prob=not variant.moe_router_pre_softmax)
    elif variant.num_experts:
        cls, extra = MixtralConfig, {"num_local_experts": variant.num_experts, **moe}
        ffn = variant.moe_ffn_hidden_size or ffn
    elif variant.qk_layernorm:
        cls, extra = Qwen3Config, {"attention_bias": False}
    elif variant.qkv_bias:
        cls, extra = Qwen2Config, {}
    else:
        cls, extra = LlamaConfig, {"attention_bias": False, "mlp_bias": False}
    return cls(
        architectures=[cls.__name__.replace("Config", "ForCausalLM")],
        vocab_size=variant.vocab_size,
        hidden_size=variant.hidden_size,
        intermediate_size=ffn,
        num_hidden_layers=variant.num_layers,
        num_attention_heads=variant.num_attention_heads,
        num_key_value_heads=variant.num_query_groups,
        head_dim=variant.head_dim,
        max_position_embeddings=variant.max_position_embeddings,
        rms_norm_eps=variant.norm_epsilon,
        rope_parameters=rope,
        tie_word_embeddings=variant.tied_embeddings,
        hidden_act="silu",
        dtype=HF_DTYPES[variant.dtype],
        **extra,
    )


def prepare_case(run_root: Path, variant: Any, out: Path) -> tuple[Case, dict[str, int]]:
    """Write the HF folder for ``run_root``; return the case and its size facts (bytes)."""
    from safetensors.torch import save_file

    iter_dir = iteration_dir(run_root)
    tensors = read_megatron_tensors(iter_dir)
    cfg = hf_config_for_variant(variant)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    save_file(megatron_to_hf(tensors, cfg), str(out / "model.safetensors"))
    itemsize = next(iter(tensors.values())).element_size()
    case = Case(
        variant.name, str(run_root), str(out), str(cfg.dtype).removeprefix("torch."), itemsize
    )
    sizes = {
        "model_bytes": sum(v.numel() * v.element_size() for v in tensors.values()),
        "file_bytes": checkpoint_file_bytes(iter_dir),
    }
    return case, sizes


# ---------------------------------------------------------------------------------------------
# Parent side: start the ranks
# ---------------------------------------------------------------------------------------------


def _serve_helpers() -> Any:
    if str(CPU_STUB) not in sys.path:
        sys.path.insert(0, str(CPU_STUB))
    import serve_helpers

    return serve_helpers


def rank_env() -> dict[str, str]:
    """The environment of a rank: the ``sgl_kernel`` stub, CPU engine, no inductor."""
    env = dict(os.environ)
    env.update(_serve_helpers().cpu_server_env())
    env["TORCHDYNAMO_DISABLE"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_world(world: World, cases: list[Case], workdir: Path) -> list[dict[str, Any]]:
    """Run every case on every rank of ``world``; returns the per-rank result dicts."""
    workdir.mkdir(parents=True, exist_ok=True)
    job = workdir / "job.json"
    spec = {
        "world": asdict(world),
        "port": _serve_helpers().free_port(),
        "cases": [asdict(c) for c in cases],
    }
    job.write_text(json.dumps(spec, indent=1))
    env = rank_env()
    procs = []
    for rank in range(world.size):
        log = open(workdir / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed below
        cmd = [sys.executable, __file__, str(job), str(rank)]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    deadline = time.monotonic() + RANK_TIMEOUT_S
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    failed = [r for r, (p, _) in enumerate(procs) if p.returncode != 0]
    if failed:
        tails = "\n".join(
            f"--- rank {r} (rc={procs[r][0].returncode}) ---\n" + _tail(workdir / f"rank{r}.log")
            for r in failed
        )
        raise RuntimeError(f"{world.label}: rank(s) {failed} failed\n{tails}")
    return [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(world.size)]


def _tail(path: Path, n: int = 40) -> str:
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-n:])


# ---------------------------------------------------------------------------------------------
# Rank side
# ---------------------------------------------------------------------------------------------


def _cpu_sglang_environment() -> None:
    """SGLang on a CPU-only gloo group: every adjustment the package must never need."""
    from sglang.srt.distributed import parallel_state
    from sglang.srt.layers.rotary_embedding import base as rotary_base
    from sglang.srt.plugins import load_plugins

    load_plugins()  # the package's hooks, as SGLang's scheduler process does
    original = parallel_state.init_model_parallel_group

    def no_pynccl(*args: Any, **kwargs: Any) -> Any:
        kwargs["use_pynccl"] = False  # PyNcclCommunicator wants a CUDA device
        return original(*args, **kwargs)

    parallel_state.init_model_parallel_group = no_pynccl
    parallel_state.set_custom_all_reduce(False)
    rotary_base._is_cpu = True  # otherwise RotaryEmbedding imports vllm


def _server_args(model_path: str, world: World, dtype: str, load_format: str) -> Any:
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(
        [
            "--model-path", model_path,
            "--load-format", load_format,
            "--device", "cpu",
            "--dtype", dtype,
            "--tp-size", str(world.tp),
            "--pp-size", str(world.pp),
            "--attention-backend", "torch_native",
            "--skip-tokenizer-init",
            *world.flags,
        ]
    )  # fmt: skip


def _publish(server_args: Any, rank: int) -> None:
    from sglang.srt.runtime_context import SpawnRanks, publish

    publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=rank, gpu_id=rank))


def _init_world(world: World, rank: int, port: int, first: Any) -> None:
    from sglang.srt.distributed import parallel_state

    _publish(first, rank)
    parallel_state.init_distributed_environment(
        backend="gloo",
        world_size=world.size,
        rank=rank,
        local_rank=rank,
        distributed_init_method=f"tcp://127.0.0.1:{port}",
    )
    parallel_state.initialize_model_parallel(backend="gloo")


def _build(server_args: Any, rank: int) -> torch.nn.Module:
    """SGLang's own path from server args to a loaded model (as the model runner does it)."""
    return build_with_configs(server_args, rank)[0]


def build_with_configs(server_args: Any, rank: int) -> tuple[torch.nn.Module, Any, Any]:
    """:func:`_build`, also returning the ``ModelConfig`` and ``LoadConfig`` it used."""
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.model_runner_components.load_model_utils import (
        build_load_config,
    )
    from sglang.srt.model_loader import get_model
    from sglang.srt.runtime_context import get_model as model_ns
    from sglang.srt.runtime_context import get_parallel

    _publish(server_args, rank)
    model_config = ModelConfig.from_server_args(server_args)
    load_config = build_load_config(
        server_args=server_args,
        tp_rank=get_parallel().tp_rank,
        remote_instance_weight_transporter_engine=None,
        remote_instance_weight_transporter_session_id="",
        draft_model_idx=None,
        weight_cache_mode=model_ns().weight_cache_mode,
        weight_cache_socket=model_ns().weight_cache_socket,
    )
    model = get_model(
        model_config=model_config, load_config=load_config, device_config=DeviceConfig("cpu")
    )
    return model, model_config, load_config


def useful_bytes(model: torch.nn.Module, itemsize: int) -> int:
    """Checkpoint bytes this rank's parameters hold (vocab padding rows excluded)."""
    from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding

    total, seen = 0, set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, VocabParallelEmbedding):
                total += module.shard_indices.num_org_elements * param.shape[1] * itemsize
            else:
                total += param.numel() * itemsize
    return total


def _diffs(xs: dict[str, torch.Tensor], ys: dict[str, torch.Tensor]) -> list[str]:
    out = []
    for name in sorted(set(xs) & set(ys)):
        x, y = xs[name].data, ys[name].data
        if x.dtype != y.dtype or x.shape != y.shape:
            out.append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
        elif not torch.equal(x, y):
            out.append(f"{name}: max |diff| {(x.float() - y.float()).abs().max().item():.3g}")
    return out


def compare(a: torch.nn.Module, b: torch.nn.Module) -> dict[str, Any]:
    """Parameter by parameter: same names, shapes, dtypes and ``torch.equal`` values. Buffers
    too: the rotary ``cos_sin_cache`` is where the two configs' RoPE (and its scaling) shows."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    return {
        "params": sorted(pa),
        "buffers": sorted(ba),
        "only_megatron": sorted(set(pa) - set(pb)) + sorted(set(ba) - set(bb)),
        "only_hf": sorted(set(pb) - set(pa)) + sorted(set(bb) - set(ba)),
        "diffs": _diffs(pa, pb) + _diffs(ba, bb),
        "all_zero": sorted(n for n, x in pa.items() if not x.data.count_nonzero()),
    }


def assert_equal_loads(result: dict[str, Any], where: str) -> None:
    """One case on one rank: both builds succeeded, with the same parameters and buffers, each
    ``torch.equal`` to the other, and none left all zero (never filled)."""
    for side in ("megatron_error", "hf_error"):
        assert side not in result, f"{where}: {side} {result[side]}"
    cmp = result["compare"]
    assert cmp["params"] and not cmp["only_megatron"] and not cmp["only_hf"], (where, cmp)
    assert not cmp["diffs"], f"{where}: parameters differ: {cmp['diffs']}"
    assert not cmp["all_zero"], f"{where}: never filled: {cmp['all_zero']}"


def _error(exc: BaseException) -> dict[str, str]:
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "where": "".join(traceback.format_exception(exc)[-3:]),
    }


def _run_case(case: Case, world: World, rank: int) -> dict[str, Any]:
    from read_recorder import ReadRecorder
    from sglang.srt.runtime_context import get_parallel

    result: dict[str, Any] = {}
    rec = ReadRecorder(case.megatron)
    start = time.perf_counter()
    megatron = hf = None
    try:
        with rec.active():
            megatron = _build(_server_args(case.megatron, world, case.dtype, "megatron"), rank)
        result["reads"] = rec.summary()
        result["useful_bytes"] = useful_bytes(megatron, case.itemsize)
        result["layers"] = [megatron.model.start_layer, megatron.model.end_layer]
    except Exception as exc:  # recorded; the test decides whether it was expected
        result["megatron_error"] = _error(exc)
    result["megatron_s"] = time.perf_counter() - start
    try:
        hf = _build(_server_args(case.hf, world, case.dtype, "safetensors"), rank)
    except Exception as exc:
        result["hf_error"] = _error(exc)
    if megatron is not None and hf is not None:
        result["compare"] = compare(megatron, hf)
    parallel = get_parallel()
    result["tp_rank"], result["pp_rank"] = parallel.tp_rank, parallel.pp_rank
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv: list[str]) -> None:
    job, rank = json.loads(Path(argv[0]).read_text()), int(argv[1])
    world = World(**job["world"])
    cases = [Case(**c) for c in job["cases"]]
    _cpu_sglang_environment()
    first = _server_args(cases[0].megatron, world, cases[0].dtype, "megatron")
    _init_world(world, rank, job["port"], first)
    out = {"rank": rank, "cases": {}}
    for case in cases:
        out["cases"][case.name] = _run_case(case, world, rank)
        print(f"rank {rank}: {case.name} done", flush=True)
    Path(argv[0]).with_name(f"rank{rank}.json").write_text(json.dumps(out, indent=1))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter and gloo teardown


if __name__ == "__main__":
    main(sys.argv[1:])
