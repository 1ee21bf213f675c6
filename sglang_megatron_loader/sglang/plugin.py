"""SGLang plugin: registers ``--load-format megatron`` and the Megatron config source.

Runs in every SGLang process through the ``sglang.srt.plugins`` entry point. Only SGLang's own
extension points are used: the load-format choice list and ``HookRegistry`` hooks on
``LoadConfig._verify_load_format`` (string -> loader class), ``get_config`` (a Megatron folder
has no config.json), and the two places that resolve a config from server args (argument
resolution in the launcher, ``ModelConfig.from_server_args`` in the scheduler), which route
every config lookup to the Megatron reader when ``--load-format megatron`` is given, and
``WeightUpdater.update_weights_from_disk`` and ``TokenizerManager.update_weights_from_disk`` for
hot reload (see ``reload.py``). A run root is pinned to one ``iter_*`` folder in the launcher
(``_pin_iteration``) and at each reload request, so every rank loads the same iteration.
"""

from __future__ import annotations

import contextvars
import json
import logging
from typing import Any

from sglang_megatron_loader.errors import (
    CheckpointNotFoundError,
    MegatronLoaderError,
    UnsupportedCheckpointError,
)

logger = logging.getLogger("sglang_megatron_loader")

LOAD_FORMAT = "megatron"
# Inside a config lookup for --load-format megatron server args: the paths that are NOT forced
# through the Megatron reader (a speculative draft model has its own format). None: not inside.
_FORCE_MEGATRON: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar(
    "force_megatron", default=None
)
# The tokenizer the server was given (--tokenizer-path): it sets the true vocabulary of a
# checkpoint that does not record it. None: the checkpoint's own tokenizer, if any.
_TOKENIZER: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "megatron_tokenizer", default=None
)
# Args the user chose to serve despite the loader refusing them
# (--model-loader-extra-config '{"ignore_args": [...]}').
_IGNORE_ARGS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "megatron_ignore_args", default=()
)


def _verify_load_format(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(self.load_format, str) and self.load_format.lower() == LOAD_FORMAT:
        from sglang_megatron_loader.sglang.loader import MegatronModelLoader

        self.load_format = MegatronModelLoader
        return None
    return original(self, *args, **kwargs)


def _get_config(original: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
    from sglang_megatron_loader.checkpoint import looks_like_megatron

    exempt = _FORCE_MEGATRON.get()
    forced = exempt is not None and str(model) not in exempt
    if not (forced or looks_like_megatron(model)):
        return original(model, *args, **kwargs)
    from sglang_megatron_loader.engine import hf_config_for

    overrides = kwargs.get("model_override_args") or (args[2] if len(args) > 2 else None)
    return _user_facing(
        hf_config_for, str(model), dict(overrides or {}), _TOKENIZER.get(), _IGNORE_ARGS.get()
    )


def _with_server_args(original: Any, server_args: Any, *args: Any, **kwargs: Any) -> Any:
    """Around anything that reads the model config for ``server_args``: with ``--load-format
    megatron`` every config lookup inside goes to the Megatron reader (even for a folder that
    does not look like a checkpoint, so the user gets our error, not "Unrecognized model").
    The speculative draft model is the exception: its config is read in its own format (the
    Megatron reader when it is a Megatron checkpoint, SGLang's otherwise)."""
    if str(getattr(server_args, "load_format", "")).lower() != LOAD_FORMAT:
        return original(server_args, *args, **kwargs)
    tokenizer = getattr(server_args, "tokenizer_path", None)
    if tokenizer is not None and str(tokenizer) == str(getattr(server_args, "model_path", "")):
        tokenizer = None  # defaulted to the model path: the checkpoint's own tokenizer
    token = _FORCE_MEGATRON.set(_draft_paths(server_args, kwargs.get("model_path")))
    tok_token = _TOKENIZER.set(str(tokenizer) if tokenizer is not None else None)
    extra = getattr(server_args, "model_loader_extra_config", None)
    ignore_token = _IGNORE_ARGS.set(_ignore_args(extra))
    try:
        return original(server_args, *args, **kwargs)
    finally:
        _IGNORE_ARGS.reset(ignore_token)
        _TOKENIZER.reset(tok_token)
        _FORCE_MEGATRON.reset(token)


def _ignore_args(extra: Any) -> tuple[str, ...]:
    """``ignore_args`` of --model-loader-extra-config (a JSON string or an already parsed
    dict); the loader validates the whole dict when it is built."""
    if isinstance(extra, str):
        try:
            extra = json.loads(extra or "{}")
        except json.JSONDecodeError:
            return ()
    names = extra.get("ignore_args") if isinstance(extra, dict) else None
    return tuple(str(n) for n in names) if isinstance(names, list | tuple) else ()


def _draft_paths(server_args: Any, asked: Any) -> frozenset[str]:
    """The speculative draft model's path(s), as given and as resolved, unless it is the target
    itself (MTP / NextN drafts); ``asked``: the path ``ModelConfig.from_server_args`` was asked
    for (the draft's, when the scheduler builds the draft's config)."""
    from sglang.srt.arg_groups.model_override_base import resolving_view

    target = {str(getattr(server_args, "model_path", None))}
    target.add(str(resolving_view(server_args).model_path))
    drafts = {
        str(getattr(server_args, "speculative_draft_model_path", None)),
        str(resolving_view(server_args).speculative_draft_model_path),
        str(asked),
    }
    return frozenset(drafts - target - {"None"})


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


def _pin_iteration(server_args: Any, previous: Any) -> None:
    """Resolution step ``handle_model_source_paths``, run once in the launcher before any
    scheduler process starts: a run root is pinned to the ``iter_*`` folder its tracker names
    now, so every TP/PP rank loads that one folder even if training publishes a newer iteration
    while the ranks start. The name the server answers to stays the user's path."""
    from sglang.srt.arg_groups.model_override_base import resolving_view
    from sglang.srt.arg_groups.overrides import declare_resolution

    from sglang_megatron_loader.checkpoint import resolve
    from sglang_megatron_loader.sglang.server_flags import flag_refusals

    cfg = resolving_view(server_args)
    if str(cfg.load_format).lower() != LOAD_FORMAT:
        return previous(server_args)
    refused = flag_refusals(cfg)  # before SGLang downloads anything for a remote path
    if refused:
        message = "; ".join(refused)
        logger.error("sglang-megatron-loader: %s", message)
        raise UnsupportedCheckpointError(message)
    previous(server_args)
    location = _user_facing(resolve, str(cfg.model_path))
    logger.info(
        "Serving Megatron checkpoint %s: iteration %s (%s), the same folder on every rank",
        cfg.model_path,
        location.iteration_label,
        location.iter_dir,
    )
    pinned: dict[str, Any] = {}
    if location.iter_dir != location.path:
        pinned["model_path"] = str(location.iter_dir)
        if cfg.served_model_name is None:
            pinned["served_model_name"] = str(cfg.model_path)
    pinned.update(_draft_source(cfg))
    if pinned:
        declare_resolution(server_args, "sglang_megatron_loader", **pinned)


def _draft_source(cfg: Any) -> dict[str, Any]:
    """A speculative draft model in Megatron format is pinned to its iteration like the target;
    any other draft is read by SGLang's default loader (it would otherwise inherit
    ``--load-format megatron``) unless ``--speculative-draft-load-format`` names one."""
    from sglang_megatron_loader.checkpoint import looks_like_megatron, resolve

    draft, fmt = cfg.speculative_draft_model_path, cfg.speculative_draft_load_format
    if not draft or str(draft) == str(cfg.model_path):
        return {}
    if looks_like_megatron(draft) and str(fmt or LOAD_FORMAT).lower() == LOAD_FORMAT:
        location = _user_facing(resolve, str(draft))
        logger.info(
            "Speculative draft model %s: Megatron checkpoint, iteration %s (%s)",
            draft,
            location.iteration_label,
            location.iter_dir,
        )
        return {"speculative_draft_model_path": str(location.iter_dir)}
    if fmt is None:
        logger.info(
            "Speculative draft model %s is not a Megatron checkpoint: SGLang's default loader "
            "reads it (--speculative-draft-load-format auto)",
            draft,
        )
        return {"speculative_draft_load_format": "auto"}
    return {}


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
    register_resolution_hook("handle_model_source_paths")(_pin_iteration)
    register_resolution_hook("handle_missing_default_values")(_resolve_tokenizer)
    from sglang_megatron_loader.sglang.adapters import initialize_adapter_weights
    from sglang_megatron_loader.sglang.reload import pin_reload_iteration, update_weights_from_disk

    updater = "sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater"
    manager = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
    hooks = {
        f"{updater}.update_weights_from_disk": update_weights_from_disk,
        f"{manager}.update_weights_from_disk": pin_reload_iteration,
        "sglang.srt.lora.lora.LoRAAdapter.initialize_weights": initialize_adapter_weights,
        "sglang.srt.configs.load_config.LoadConfig._verify_load_format": _verify_load_format,
        "sglang.srt.utils.hf_transformers.config.get_config": _get_config,
        "sglang.srt.arg_groups.pipeline.run_resolution_pipeline": _with_server_args,
        "sglang.srt.configs.model_config.ModelConfig.from_server_args": _with_server_args,
    }
    for target, hook in hooks.items():
        HookRegistry.register(target, hook, HookType.AROUND)
