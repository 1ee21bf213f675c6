"""Hot reload: ``/update_weights_from_disk`` (and ``Engine.update_weights_from_disk``) with a
Megatron checkpoint path reloads the weights in place, without a restart.

A checkpoint whose model differs from the one being served is refused before any weight is
touched; a failure while copying rolls back to the checkpoint that was being served.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from sglang_megatron_loader.checkpoint import MegatronCheckpoint, looks_like_megatron
from sglang_megatron_loader.config import ModelDims, hf_config_from_args
from sglang_megatron_loader.engine import dims_for
from sglang_megatron_loader.errors import MegatronLoaderError

logger = logging.getLogger("sglang_megatron_loader")

LOAD_FORMAT = "megatron"


def wants_megatron(load_format: Any, model_path: str) -> bool:
    if isinstance(load_format, type):
        from sglang_megatron_loader.sglang.loader import MegatronModelLoader

        return issubclass(load_format, MegatronModelLoader)
    if load_format is None:
        return looks_like_megatron(model_path)
    return str(load_format).lower() == LOAD_FORMAT


def update_weights_from_disk(
    original: Any, updater: Any, model_path: str, load_format: Any, *args: Any, **kwargs: Any
) -> tuple[bool, str]:
    """AROUND hook on SGLang's ``WeightUpdater.update_weights_from_disk``."""
    if not wants_megatron(load_format, model_path):
        return original(updater, model_path, load_format, *args, **kwargs)
    return reload_megatron(updater, model_path)


def incompatibilities(serving: ModelDims, new: ModelDims) -> list[str]:
    fields = [
        f.name
        for f in dataclasses.fields(ModelDims)
        if f.name not in ("padded_vocab_size", "vocab_size")
    ]
    out = [
        f"{f}: serving {getattr(serving, f)}, checkpoint {getattr(new, f)}"
        for f in fields
        if getattr(serving, f) != getattr(new, f)
    ]
    if serving.vocab_size > new.padded_vocab_size:
        out.append(
            f"vocab_size: serving {serving.vocab_size}, checkpoint stores only "
            f"{new.padded_vocab_size} rows"
        )
    return out


def config_incompatibilities(serving: Any, new: Any) -> list[str]:
    """Differences built into the served model's layers rather than its weights: the
    architecture (which tensors exist) and the rotary embedding (base, scaling)."""
    out = []
    arch = [(c.architectures or ["?"])[0] for c in (serving, new)]
    if arch[0] != arch[1]:
        out.append(f"architecture: serving {arch[0]}, checkpoint {arch[1]}")
    keys = ("rope_type", "rope_theta", "factor")
    rope = [
        {k: (getattr(c, "rope_parameters", None) or {}).get(k) for k in keys}
        for c in (serving, new)
    ]
    if rope[0] != rope[1]:
        out.append(f"rope: serving {rope[0]}, checkpoint {rope[1]}")
    return out


def reload_megatron(updater: Any, model_path: str) -> tuple[bool, str]:
    """Reload ``updater``'s model from ``model_path``; (success, message) as SGLang expects."""
    from sglang_megatron_loader.sglang.loader import load_weights_into

    model_config = updater.model_config
    old_path = model_config.model_path
    try:
        with MegatronCheckpoint(model_path) as ckpt:
            overrides = dict(getattr(model_config, "model_override_args", None) or {})
            new_config = hf_config_from_args(ckpt.args, source=ckpt.source, overrides=overrides)
            new = dims_for(ckpt, new_config)
            serving = ModelDims.from_hf_config(model_config.hf_config, new.padded_vocab_size)
            problems = config_incompatibilities(model_config.hf_config, new_config)
            problems += incompatibilities(serving, new)
            if problems:
                message = (
                    f"{ckpt.source}: refusing to reload, the checkpoint's model differs "
                    "from the one being served (" + "; ".join(problems) + "). "
                    "Still serving " + str(old_path)
                )
                logger.error(message)
                return False, message
            label = ckpt.location.iteration_label
            try:
                load_weights_into(updater.get_model(), ckpt, serving)
            except Exception as exc:
                logger.error("reload from %s failed (%s); restoring %s", model_path, exc, old_path)
                with MegatronCheckpoint(old_path) as previous:
                    load_weights_into(updater.get_model(), previous, serving)
                return (
                    False,
                    f"Failed to update weights from {model_path}: {exc}. "
                    f"Rolled back to {old_path}.",
                )
    except MegatronLoaderError as exc:
        logger.error("sglang-megatron-loader: %s", exc)
        return False, f"{exc}. Still serving {old_path}"
    model_config.model_path = model_path
    message = (
        f"Succeeded to update model weights from Megatron checkpoint {model_path} "
        f"(iteration {label})."
    )
    logger.info(message)
    return True, message
