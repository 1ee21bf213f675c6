"""Loader room: knows only SGLang. Builds SGLang's model and fills it through a rank plan."""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_loader.loader import (
    BaseModelLoader,
    DefaultModelLoader,
    _initialize_model,
    post_load_weights,
)
from sglang.srt.model_loader.utils import set_default_torch_dtype
from torch import nn

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.checkpoint.integrity import MODES, verify_integrity
from sglang_megatron_loader.engine import dims_for, execute_plan
from sglang_megatron_loader.errors import (
    MegatronLoaderError,
    UnsupportedCheckpointError,
    WeightMismatchError,
)
from sglang_megatron_loader.models import table_for
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import plan_rank

logger = logging.getLogger("sglang_megatron_loader")

EXTRA_CONFIG_KEYS = frozenset({"progress", "verify_integrity"})


def current_tp() -> Tp:
    """This process's tensor-parallel rank and size, as SGLang's runtime context reports them."""
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    return Tp(parallel.tp_rank, parallel.tp_size)


def current_pp_size() -> int:
    """SGLang's pipeline-parallel size for this process."""
    from sglang.srt.runtime_context import get_parallel

    return int(get_parallel().pp_size)


def refuse_tied_embeddings_with_pp(tied: bool, pp_size: int, source: str) -> None:
    """Tied embeddings with PP > 1 are refused at start. SGLang 0.5.23's Llama makes ``lm_head``
    an alias of ``embed_tokens``, which only the first pipeline stage has, so its last stage has
    no output layer and fails at the first request (its default loader has the same gap). Its
    Qwen2/Qwen3 give the last stage its own ``lm_head`` copy of the embedding, which the mapping
    tables (``lm_head`` is untied-only) do not fill yet."""
    if tied and pp_size > 1:
        raise UnsupportedCheckpointError(
            f"{source}: embeddings are tied (args.untie_embeddings_and_output_weights=False) "
            f"and --pp-size is {pp_size}: not supported (SGLang's Llama has no output layer on "
            "the last pipeline stage when embeddings are tied, and this loader does not fill "
            "Qwen2/Qwen3's last-stage copy of the embedding yet). Serve with --pp-size 1 (use "
            "--tp-size to spread the model over more devices)."
        )


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
        self.extra = extra

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download: Megatron checkpoints are local folders."""

    def load_model(self, *, model_config: ModelConfig, device_config: DeviceConfig) -> nn.Module:
        try:
            return self._load_model(model_config, device_config)
        except MegatronLoaderError as exc:
            # one clear line in the scheduler's log, above SGLang's traceback of the same error
            logger.error("sglang-megatron-loader: %s", exc)
            raise

    def _load_model(self, model_config: ModelConfig, device_config: DeviceConfig) -> nn.Module:
        if getattr(model_config, "quantization", None):
            raise UnsupportedCheckpointError(
                f"--quantization {model_config.quantization} is not supported with "
                "--load-format megatron"
            )
        target = torch.device(device_config.device)
        with MegatronCheckpoint(model_config.model_path) as ckpt:
            verify_integrity(ckpt.location.iter_dir, self.extra.get("verify_integrity", "auto"))
            dims = dims_for(ckpt, model_config.hf_config)
            refuse_tied_embeddings_with_pp(dims.tied_embeddings, current_pp_size(), ckpt.source)
            # metadata only: a TP size that cannot split the model is refused here, with the
            # dimension named, before SGLang's own layer constructors assert on it
            plan_rank(table_for(model_config.hf_config), dims, ckpt.tensors, current_tp())
            with set_default_torch_dtype(model_config.dtype), target:
                model = _initialize_model(model_config, self.load_config, None)
            self.load_weights_into(model, ckpt, dims)
        DefaultModelLoader.postprocess_weights(model, target)
        return model.eval()

    def load_weights_into(self, model: nn.Module, ckpt: MegatronCheckpoint, dims: Any) -> None:
        load_weights_into(model, ckpt, dims, progress=bool(self.extra.get("progress", True)))


def load_weights_into(
    model: nn.Module, ckpt: MegatronCheckpoint, dims: Any, *, progress: bool = True
) -> None:
    """Fill every parameter of ``model`` (this rank's shards) from ``ckpt``, through the mapping
    table of the model's own architecture (``model.config``).

    Every read is planned (and every shape checked) before the first byte is copied. Each read
    is cast from the key's stored dtype to the parameter's (fp32 norms into a bf16 model).
    """
    tp = current_tp()
    params = dict(model.named_parameters())
    plan = plan_rank(table_for(model.config), dims, ckpt.tensors, tp, params)
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
        ckpt, plan, lambda p: params[p.name].data, progress=progress and tp.rank == 0
    )
    filled = {p.name for p in plan.params}
    if filled != set(params):
        raise WeightMismatchError(f"parameters not filled: {sorted(set(params) - filled)}")
    post_load_weights(model)
    logger.info(
        "Loaded %d parameters from %s in %.2f s (%.3f GB read, %.2f GB/s)",
        report.params,
        loc.iter_dir,
        report.seconds,
        report.bytes_read / 1e9,
        report.gbps,
    )
