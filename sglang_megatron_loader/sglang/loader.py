"""Loader room: knows only SGLang. Builds SGLang's model and fills it through a rank plan."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_loader.loader import (
    BaseModelLoader,
    DefaultModelLoader,
    _get_quantization_config,
    _initialize_model,
    post_load_weights,
)
from sglang.srt.model_loader.utils import set_default_torch_dtype
from torch import nn

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.checkpoint.integrity import MODES, verify_integrity
from sglang_megatron_loader.engine import (
    THREADS,
    default_threads,
    execute_plan,
    plan_checkpoint,
)
from sglang_megatron_loader.errors import (
    MegatronLoaderError,
    UnsupportedCheckpointError,
    WeightMismatchError,
)
from sglang_megatron_loader.gcpause import paused_gc
from sglang_megatron_loader.models import table_for
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import RankPlan, plan_parameter, plan_rank
from sglang_megatron_loader.sglang.reload import SERVED_ATTR

logger = logging.getLogger("sglang_megatron_loader")

EXTRA_CONFIG_KEYS = frozenset({"ignore_args", "progress", "threads", "verify_integrity"})


def current_tp() -> Tp:
    """This process's tensor-parallel rank and size, as SGLang's runtime context reports them,
    with its MoE expert-parallel position (``--ep-size``; MoE data parallelism is refused)."""
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    ep_size = int(getattr(parallel, "moe_ep_size", 1) or 1)
    if ep_size > 1 and parallel.tp_size // ep_size != getattr(parallel, "moe_tp_size", None):
        raise UnsupportedCheckpointError(
            f"MoE layout tp_size={parallel.tp_size}, ep_size={ep_size}, moe_tp_size="
            f"{getattr(parallel, 'moe_tp_size', None)} (MoE data parallelism?): "
            "--load-format megatron plans experts for tp_size = ep_size * moe_tp_size only"
        )
    ep_rank = int(getattr(parallel, "moe_ep_rank", 0) or 0) if ep_size > 1 else 0
    return Tp(parallel.tp_rank, parallel.tp_size, ep_rank, ep_size)


def current_pp_size() -> int:
    """SGLang's pipeline-parallel size for this process."""
    from sglang.srt.runtime_context import get_parallel

    return int(get_parallel().pp_size)


# SGLang models whose last pipeline stage builds its own ``lm_head`` when embeddings are tied
# (Qwen2ForCausalLM / Qwen3ForCausalLM: ``ParallelLMHead`` unless ``pp_size == 1``), filled from
# the embedding rows; SGLang's Llama aliases ``lm_head`` to ``embed_tokens`` instead.
TIED_HEAD_ON_LAST_STAGE = frozenset({"Qwen2ForCausalLM", "Qwen3ForCausalLM"})
TIED_HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def refuse_tied_embeddings_with_pp(
    tied: bool, pp_size: int, source: str, architecture: str = "LlamaForCausalLM"
) -> None:
    """Tied embeddings with PP > 1 are refused at start for architectures whose SGLang model
    has no output layer on the last pipeline stage then: SGLang 0.5.23's Llama makes
    ``lm_head`` an alias of ``embed_tokens``, which only the first stage has, so it would fail
    at the first request (its default loader has the same gap). Qwen2/Qwen3 give the last
    stage its own ``lm_head``, filled here from the embedding rows (:func:`plan_params`)."""
    if tied and pp_size > 1 and architecture not in TIED_HEAD_ON_LAST_STAGE:
        raise UnsupportedCheckpointError(
            f"{source}: embeddings are tied (args.untie_embeddings_and_output_weights=False) "
            f"and --pp-size is {pp_size}: not supported for {architecture} (SGLang's model has "
            "no output layer on the last pipeline stage when embeddings are tied). Serve with "
            "--pp-size 1 (use --tp-size to spread the model over more devices)."
        )


_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def loadable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a load fills: all but those SGLang marks ``_skip_weight_check`` (a
    quantization scheme's KV-cache scales, which keep their built value when the checkpoint
    has none, as with SGLang's default loader)."""
    return {
        name: param
        for name, param in model.named_parameters()
        if not getattr(param, "_skip_weight_check", False)
    }


def quantization_config(model_config: ModelConfig, load_config: LoadConfig) -> Any:
    """SGLang's config for ``--quantization`` (None without it), made as its default loader
    makes it. An online scheme needs nothing from the checkpoint; one that reads its
    quantization config from the checkpoint folder is refused with the reason."""
    if not model_config.quantization:
        return None
    try:
        return _get_quantization_config(model_config, load_config)
    except (ValueError, OSError) as exc:
        raise UnsupportedCheckpointError(
            f"--quantization {model_config.quantization}: SGLang could not set it up for this "
            f"Megatron checkpoint: {exc}. A scheme that reads its config or quantized tensors "
            "from the checkpoint cannot serve a Megatron checkpoint (it holds neither); online "
            "schemes (e.g. --quantization fp8 with a bf16/fp16 --dtype) quantize after loading."
        ) from exc


def refuse_prequantized(model: nn.Module, quantization: str | None) -> None:
    """``--quantization`` is served when SGLang's scheme quantizes the checkpoint's 16/32-bit
    weights after loading (online schemes: ``fp8``, ``mxfp8`` ...): every parameter is then one
    of the mapping table's, in a floating dtype, and SGLang's post-load step quantizes it. A
    scheme whose layers expect quantized tensors in the checkpoint (scales, packed integer
    weights: AWQ, GPTQ, ModelOpt, w8a8 ...) is refused: a Megatron checkpoint holds none."""
    if not quantization:
        return
    table = table_for(model.config)
    odd = [
        f"{name} ({param.dtype})"
        for name, param in loadable_parameters(model).items()
        if table.match_target(name) is None or param.dtype not in _WEIGHT_DTYPES
    ]
    if odd:
        raise UnsupportedCheckpointError(
            f"--quantization {quantization}: SGLang's {quantization} layers expect pre-quantized "
            f"tensors ({', '.join(odd[:4])}{' ...' if len(odd) > 4 else ''}) that a Megatron "
            "checkpoint does not hold. Use a scheme that quantizes after loading (e.g. "
            "--quantization fp8), or serve without --quantization."
        )


def plan_params(
    table: Any, dims: Any, tensors: dict[str, Any], tp: Tp, names: list[str]
) -> RankPlan:
    """:func:`plan_rank` for ``names``; with tied embeddings, a last pipeline stage's own
    ``lm_head`` (Qwen2/Qwen3) is planned as a copy of the embedding rows, sharded the same way."""
    if not (dims.tied_embeddings and TIED_HEAD in names):
        return plan_rank(table, dims, tensors, tp, names)
    plan = plan_rank(table, dims, tensors, tp, [n for n in names if n != TIED_HEAD])
    head = dataclasses.replace(plan_parameter(table, EMBED, dims, tensors, tp), name=TIED_HEAD)
    return RankPlan(tp, (*plan.params, head))


class MegatronModelLoader(BaseModelLoader):
    """``--load-format megatron``: reads Megatron ``torch_dist`` checkpoints directly."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        unknown = sorted(set(extra) - EXTRA_CONFIG_KEYS)
        if unknown:
            raise UnsupportedCheckpointError(
                f"--model-loader-extra-config: unknown key(s) {unknown} for --load-format "
                f"megatron; accepted: {sorted(EXTRA_CONFIG_KEYS)}"
            )
        if extra.get("verify_integrity", "auto") not in MODES:
            raise UnsupportedCheckpointError(
                f"--model-loader-extra-config: verify_integrity={extra['verify_integrity']!r}, "
                f"expected one of {list(MODES)}"
            )
        ignore = extra.get("ignore_args", [])
        if not (isinstance(ignore, list) and all(isinstance(n, str) for n in ignore)):
            raise UnsupportedCheckpointError(
                f"--model-loader-extra-config: ignore_args={ignore!r}, expected a list of arg "
                "names the loader refuses, to serve anyway"
            )
        threads = extra.get("threads", THREADS)
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise UnsupportedCheckpointError(
                f"--model-loader-extra-config: threads={threads!r}, expected a positive integer "
                "(reader threads per rank)"
            )
        self.extra = extra

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download: Megatron checkpoints are local folders."""

    def load_model(self, *, model_config: ModelConfig, device_config: DeviceConfig) -> nn.Module:
        try:
            with paused_gc():
                return self._load_model(model_config, device_config)
        except MegatronLoaderError as exc:
            # one clear line in the scheduler's log, above SGLang's traceback of the same error
            logger.error("sglang-megatron-loader: %s", exc)
            raise

    def _load_model(self, model_config: ModelConfig, device_config: DeviceConfig) -> nn.Module:
        target = torch.device(device_config.device)
        quant_config = quantization_config(model_config, self.load_config)
        with MegatronCheckpoint(model_config.model_path) as ckpt:
            verify_integrity(ckpt.location.iter_dir, self.extra.get("verify_integrity", "auto"))
            # metadata only: every stored shape is checked and a TP size that cannot split the
            # model refused (the dimension named) before SGLang's layer constructors assert;
            # the plan made on the way is the one the load executes
            dims, plan = plan_checkpoint(ckpt, model_config.hf_config, current_tp())
            refuse_tied_embeddings_with_pp(
                dims.tied_embeddings,
                current_pp_size(),
                ckpt.source,
                (model_config.hf_config.architectures or ["?"])[0],
            )
            with set_default_torch_dtype(model_config.dtype), target:
                model = _initialize_model(model_config, self.load_config, quant_config)
            refuse_prequantized(model, model_config.quantization)
            self.load_weights_into(model, ckpt, dims, plan)
        DefaultModelLoader.postprocess_weights(model, target)
        return model.eval()

    def load_weights_into(
        self, model: nn.Module, ckpt: MegatronCheckpoint, dims: Any, plan: RankPlan | None = None
    ) -> None:
        load_weights_into(
            model,
            ckpt,
            dims,
            progress=bool(self.extra.get("progress", True)),
            threads=self.extra.get("threads"),
            plan=plan,
        )


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def layer_groups(model: nn.Module) -> dict[str, Tp]:
    """Each parameter's TP rank and size as its SGLang layer was built with (``tp_group``): the
    TP group, the attention-TP group for the layers SGLang shards there (``--enable-dp-lm-head``
    for ``lm_head``; under DP attention Qwen2/Qwen3's embedding and Qwen3's attention), or none
    (replicated). Parameters of layers without a group are replicated (norms)."""
    from sglang.srt.distributed.utils import get_group_rank_size

    out: dict[str, Tp] = {}
    for prefix, module in model.named_modules():
        own = [leaf for leaf, _ in module.named_parameters(recurse=False)]
        if not own or not hasattr(module, "tp_group"):
            continue
        tp = Tp(*get_group_rank_size(module.tp_group))
        kv = getattr(module, "kv_tp_group", module.tp_group)
        if Tp(*get_group_rank_size(kv)) != tp:
            raise UnsupportedCheckpointError(
                f"SGLang layer '{prefix}' splits its KV heads over another group than its query "
                "heads; --load-format megatron does not plan that layout"
            )
        out.update({f"{prefix}.{leaf}" if prefix else leaf: tp for leaf in own})
    return out


def replan_layer_groups(
    plan: RankPlan, model: nn.Module, dims: Any, tensors: dict[str, Any]
) -> RankPlan:
    """``plan`` (made for this rank's TP position) with the parameters whose layer is split over
    another group (:func:`layer_groups`) planned for that group's position instead."""
    groups = layer_groups(model)
    table = table_for(model.config)
    params = tuple(
        p
        if groups.get(p.name, plan.tp) == plan.tp
        else plan_params(table, dims, tensors, groups[p.name], [p.name]).params[0]
        for p in plan.params
    )
    return RankPlan(plan.tp, params)


def load_weights_into(
    model: nn.Module,
    ckpt: MegatronCheckpoint,
    dims: Any,
    *,
    progress: bool = True,
    threads: int | None = None,
    plan: RankPlan | None = None,
    prefault: bool = True,
) -> None:
    """Fill every parameter of ``model`` (this rank's shards) from ``ckpt``, through the mapping
    table of the model's own architecture (``model.config``). ``threads``: reader threads, by
    default :func:`default_threads` of the model's device (at start and on reload alike).
    ``prefault=False``: the parameters are already in memory (a reload); see
    :func:`execute_plan`.

    Every read is planned (and every shape checked) before the first byte is copied; ``plan``,
    this rank's plan of the whole model (:func:`plan_checkpoint`), is used when it covers the
    model's parameters (a pipeline stage holds some of them). Each read is cast from the key's
    stored dtype to the parameter's (fp32 norms into a bf16 model).
    """
    tp = current_tp()
    params = loadable_parameters(model)
    planned = {p.name: p for p in plan.params} if plan is not None and plan.tp == tp else {}
    if planned and set(params) <= set(planned):
        plan = RankPlan(tp, tuple(planned[name] for name in params))
    else:
        plan = plan_params(table_for(model.config), dims, ckpt.tensors, tp, list(params))
    plan = replan_layer_groups(plan, model, dims, ckpt.tensors)
    loc = ckpt.location
    to_read = plan.bytes_to_read(ckpt.tensors)
    logger.info(
        "Megatron checkpoint %s (iteration %s, %s): TP rank %d/%d, %d parameters, %.3f GB to read",
        loc.iter_dir,
        loc.iteration_label,
        loc.format,
        tp.rank,
        tp.size,
        len(plan.params),
        to_read / 1e9,
    )
    report = execute_plan(
        ckpt,
        plan,
        lambda p: params[p.name].data,
        progress=progress and tp.rank == 0,
        threads=threads or default_threads(_device_of(model)),
        prefault=prefault,
    )
    filled = {p.name for p in plan.params}
    if filled != set(params):
        raise WeightMismatchError(f"parameters not filled: {sorted(set(params) - filled)}")
    post_load_weights(model)
    setattr(model, SERVED_ATTR, loc)  # what rollback returns to and messages name
    logger.info(
        "Loaded %d parameters from %s in %.2f s (%.3f GB read, %.2f GB/s)",
        report.params,
        loc.iter_dir,
        report.seconds,
        report.bytes_read / 1e9,
        report.gbps,
    )
