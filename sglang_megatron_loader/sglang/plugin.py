"""SGLang plugin: registers ``--load-format megatron`` and the Megatron config source.

Runs in every SGLang process through the ``sglang.srt.plugins`` entry point. Only SGLang's own
extension points are used: the load-format choice list and ``HookRegistry`` hooks on
``LoadConfig._verify_load_format`` (string -> loader class), ``get_config`` (a Megatron folder
has no config.json), and the two places that resolve a config from server args (argument
resolution in the launcher, ``ModelConfig.from_server_args`` in the scheduler), which route
every config lookup to the Megatron reader when ``--load-format megatron`` is given, and
``WeightUpdater.update_weights_from_disk`` for hot reload (see ``reload.py``).
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from sglang_megatron_loader.errors import CheckpointNotFoundError, MegatronLoaderError

logger = logging.getLogger("sglang_megatron_loader")

LOAD_FORMAT = "megatron"
_FORCE_MEGATRON: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "force_megatron", default=False
)


def _verify_load_format(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(self.load_format, str) and self.load_format.lower() == LOAD_FORMAT:
        from sglang_megatron_loader.sglang.loader import MegatronModelLoader

        self.load_format = MegatronModelLoader
        return None
    return original(self, *args, **kwargs)


def _get_config(original: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
    from sglang_megatron_loader.checkpoint import looks_like_megatron

    if not (_FORCE_MEGATRON.get() or looks_like_megatron(model)):
        return original(model, *args, **kwargs)
    from sglang_megatron_loader.engine import hf_config_for

    overrides = kwargs.get("model_override_args") or (args[2] if len(args) > 2 else None)
    return _user_facing(hf_config_for, str(model), dict(overrides or {}))


def _with_server_args(original: Any, server_args: Any, *args: Any, **kwargs: Any) -> Any:
    """Around anything that reads the model config for ``server_args``: with ``--load-format
    megatron`` every config lookup inside goes to the Megatron reader (even for a folder that
    does not look like a checkpoint, so the user gets our error, not "Unrecognized model")."""
    if str(getattr(server_args, "load_format", "")).lower() != LOAD_FORMAT:
        return original(server_args, *args, **kwargs)
    token = _FORCE_MEGATRON.set(True)
    try:
        return original(server_args, *args, **kwargs)
    finally:
        _FORCE_MEGATRON.reset(token)


def _resolve_tokenizer(server_args: Any, previous: Any) -> None:
    """Resolution step ``handle_missing_default_values``: when the tokenizer defaulted to the
    model path of a Megatron checkpoint (which holds no tokenizer files at its root), use the
    checkpoint's own tokenizer folder, or stop with the flag to add."""
    from sglang.srt.arg_groups.model_override_base import resolving_view
    from sglang.srt.arg_groups.overrides import declare_resolution

    previous(server_args)
    cfg = resolving_view(server_args)
    if str(cfg.load_format).lower() != LOAD_FORMAT or cfg.skip_tokenizer_init:
        return
    if cfg.tokenizer_path != cfg.model_path:
        return  # --tokenizer-path wins
    found = _user_facing(_checkpoint_tokenizer, str(cfg.model_path))
    if found is None:
        message = (
            f"{cfg.model_path}: no tokenizer found with the Megatron checkpoint (no tokenizer/ "
            "folder, and args.tokenizer_model is not a local folder). Add --tokenizer-path "
            "<HF tokenizer folder>, or --skip-tokenizer-init and send input_ids."
        )
        logger.error("sglang-megatron-loader: %s", message)
        raise CheckpointNotFoundError(message)
    logger.info("Using the checkpoint's tokenizer %s", found)
    declare_resolution(server_args, "sglang_megatron_loader", tokenizer_path=str(found))


def _checkpoint_tokenizer(model_path: str) -> Any:
    from sglang_megatron_loader.checkpoint import MegatronCheckpoint
    from sglang_megatron_loader.checkpoint.locate import find_tokenizer

    with MegatronCheckpoint(model_path) as ckpt:
        return find_tokenizer(ckpt.location, getattr(ckpt.args, "tokenizer_model", None))


def _user_facing(fn: Any, *args: Any) -> Any:
    """Log our errors as one clear line before they propagate through SGLang."""
    try:
        return fn(*args)
    except MegatronLoaderError as exc:
        logger.error("sglang-megatron-loader: %s", exc)
        raise


_registered = False


def register() -> None:
    """Entry point of the ``sglang.srt.plugins`` group (idempotent)."""
    from sglang.srt.arg_groups.choices import LOAD_FORMAT_CHOICES, add_load_format_choices
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    global _registered
    if _registered:
        return
    _registered = True
    if LOAD_FORMAT not in LOAD_FORMAT_CHOICES:
        add_load_format_choices([LOAD_FORMAT])
    register_resolution_hook("handle_missing_default_values")(_resolve_tokenizer)
    from sglang_megatron_loader.sglang.reload import update_weights_from_disk

    updater = "sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater"
    hooks = {
        f"{updater}.update_weights_from_disk": update_weights_from_disk,
        "sglang.srt.configs.load_config.LoadConfig._verify_load_format": _verify_load_format,
        "sglang.srt.utils.hf_transformers.config.get_config": _get_config,
        "sglang.srt.arg_groups.pipeline.run_resolution_pipeline": _with_server_args,
        "sglang.srt.configs.model_config.ModelConfig.from_server_args": _with_server_args,
    }
    for target, hook in hooks.items():
        HookRegistry.register(target, hook, HookType.AROUND)
