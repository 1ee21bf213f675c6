"""Hot reload: ``/update_weights_from_disk`` (and ``Engine.update_weights_from_disk``) with a
Megatron checkpoint path reloads the weights in place, without a restart.

One iteration per reload, decided in one place: the tokenizer manager pins a run root to the
``iter_*`` folder its tracker names when the request arrives, and the TP ranks follow their
first rank's resolution. A checkpoint whose model differs from the one being served is refused
before any weight is touched; a reload succeeds on every TP rank or on none (a failure on any
rank rolls every rank back to the iteration that was being served, not to the user's path),
and the reply names the iteration served afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from typing import Any

from sglang_megatron_loader.checkpoint import (
    CheckpointLocation,
    MegatronCheckpoint,
    looks_like_megatron,
    resolve,
)
from sglang_megatron_loader.checkpoint.integrity import verify_integrity
from sglang_megatron_loader.config import ModelDims
from sglang_megatron_loader.engine import checkpoint_hf_config, dims_for
from sglang_megatron_loader.errors import MegatronLoaderError
from sglang_megatron_loader.sglang.ranks import Outcome, TpRanks

logger = logging.getLogger("sglang_megatron_loader")

LOAD_FORMAT = "megatron"
# The loader records on the model the CheckpointLocation it filled it from: what is served.
SERVED_ATTR = "megatron_checkpoint"


def wants_megatron(load_format: Any, model_path: str) -> bool:
    if isinstance(load_format, type):
        from sglang_megatron_loader.sglang.loader import MegatronModelLoader

        return issubclass(load_format, MegatronModelLoader)
    if load_format is None:
        return looks_like_megatron(model_path)
    return str(load_format).lower() == LOAD_FORMAT


def update_weights_from_disk(
    original: Any,
    updater: Any,
    model_path: str,
    load_format: Any,
    weight_name_filter: Any = None,
    recapture_cuda_graph: bool = False,
) -> tuple[bool, str]:
    """AROUND hook on SGLang's ``WeightUpdater.update_weights_from_disk`` (run on every TP rank)."""
    if not wants_megatron(load_format, model_path):
        return original(
            updater,
            model_path,
            load_format,
            weight_name_filter=weight_name_filter,
            recapture_cuda_graph=recapture_cuda_graph,
        )
    if getattr(updater.get_model_runner(), "is_draft_worker", False):
        return True, keep_draft(updater)
    ok, message = reload_megatron(
        updater,
        model_path,
        weight_name_filter=weight_name_filter,
        recapture_cuda_graph=recapture_cuda_graph,
    )
    _LAST_REPLY[:] = [message]
    return ok, message


# The target's reply to the reload in progress: SGLang then runs the draft runner (if any) and
# answers with the draft's message, which repeats it.
_LAST_REPLY: list[str] = []


def keep_draft(updater: Any) -> str:
    """A speculative draft runner's part of a Megatron reload: SGLang calls it (after the
    target succeeded) with the target's path, which is not the draft's checkpoint; the draft
    keeps its weights (speculative decoding stays exact; only its acceptance rate may change)."""
    message = (
        f"The speculative draft model ({updater.model_config.model_path}) is kept: a reload "
        "from a Megatron checkpoint replaces the target model's weights only."
    )
    logger.info(message)
    return " ".join(_LAST_REPLY + [message])


async def pin_reload_iteration(original: Any, manager: Any, obj: Any, *args: Any, **kw: Any) -> Any:
    """AROUND hook on SGLang's ``TokenizerManager.update_weights_from_disk``, the one place a
    reload request enters the server: a run root is pinned here to the ``iter_*`` folder its
    tracker names now, before the request reaches any scheduler, so every rank reads that folder
    and the server records it as the one served (``/model_info``'s ``model_path``; the
    served model name stays the path the user asked for, as SGLang sets it).

    With ``--dp-size`` > 1 every data-parallel replica reloads on its own and SGLang joins their
    answers; if some loaded the new iteration and others did not, all are sent back to the
    iteration served before, so the replicas never serve two iterations."""
    load_format = obj.load_format
    if load_format is None:
        load_format = manager.config_value("load_format")
    asked, served = obj.model_path, manager.model_path
    if not wants_megatron(load_format, asked):
        return await original(manager, obj, *args, **kw)
    try:
        location = resolve(asked)
    except MegatronLoaderError:
        pass  # every rank reports it (they follow the first rank's resolution)
    else:
        logger.info("Reload requested from %s: %s", asked, describe(location))
        obj.model_path = str(location.iter_dir)
    result = await original(manager, obj, *args, **kw)
    if result[0] and obj.model_path != asked:
        manager.served_model_name = asked
    if not result[0] and SUCCEEDED in result[1]:
        result = await _restore_replicas(original, manager, obj, served, result, *args, **kw)
    return result


SUCCEEDED = "now serving"  # in the reply of a rank set that loaded the new iteration


async def _restore_replicas(
    original: Any, manager: Any, obj: Any, served: str, result: Any, *args: Any, **kw: Any
) -> Any:
    """Some DP replicas loaded the new iteration, others failed: reload ``served`` on all."""
    logger.error("reload held on some DP replicas only; restoring %s on all of them", served)
    restore = copy.copy(obj)
    restore.model_path, restore.weight_version, restore.abort_all_requests = served, None, False
    back = await original(manager, restore, *args, **kw)
    if back[0]:
        verdict = f"every DP replica was sent back to {served}: {back[1]}"
    else:
        verdict = f"restoring {served} failed too ({back[1]}): restart the server"
    message = f"{result[1]} || The reload held on some DP replicas only; {verdict}"
    return (False, message, *result[2:])


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


def describe(location: CheckpointLocation) -> str:
    """``iteration 20 (/run/iter_0000020)``: what a message says is (or would be) served."""
    return f"iteration {location.iteration_label} ({location.iter_dir})"


def served_checkpoint(updater: Any) -> tuple[str, str]:
    """The folder being served and its description. The loader records the resolved location
    on the model (``SERVED_ATTR``), so a rollback returns to that iteration even when the
    user's path is a run root whose tracker has moved on."""
    location = getattr(updater.get_model(), SERVED_ATTR, None)
    if location is not None:
        return str(location.iter_dir), describe(location)
    path = str(updater.model_config.model_path)
    return path, path


def refusal(updater: Any, weight_name_filter: Any) -> str | None:
    """Why this reload is refused before any rank reads anything (every input here is the same
    on every rank, so they all refuse together), or None."""
    from sglang.srt.model_executor.model_runner_components.weight_updater import (
        _unsupported_derived_weight_cache_error,
    )
    from sglang.srt.runtime_context import get_parallel

    if weight_name_filter is not None:
        return (
            "weight_name_filter is not supported with --load-format megatron: a reload fills "
            "every parameter from one checkpoint iteration (a filtered one would serve two "
            "iterations at once); reload without a filter."
        )
    pp_size = int(get_parallel().pp_size)
    if pp_size > 1:
        return (
            f"hot reload is refused with --pp-size {pp_size}: SGLang applies "
            "update_weights_from_disk to the pipeline stages one after another and answers "
            "from the first stage before the later ones have loaded, so a failure on a later "
            "stage could neither be undone on the others nor be reported. Restart the server "
            "on the new iteration instead."
        )
    try:
        updater._assert_weight_cache_inactive("update_weights_from_disk")
    except RuntimeError as exc:
        return str(exc)
    return _unsupported_derived_weight_cache_error(updater.get_model())


def _locate(model_path: str) -> CheckpointLocation | str:
    try:
        return resolve(model_path)
    except MegatronLoaderError as exc:
        return str(exc)


def reload_megatron(
    updater: Any,
    model_path: str,
    *,
    weight_name_filter: Any = None,
    recapture_cuda_graph: bool = False,
) -> tuple[bool, str]:
    """Reload ``updater``'s model from ``model_path`` on every TP rank or on none.

    The first TP rank resolves the iteration and every rank follows it; the checkpoint is
    checked against the served model, then loaded with SGLang's own restore / post-process
    steps around the copy; if any rank fails, every rank reloads the iteration that was being
    served. Returns (success, message) as SGLang expects; the message names what is served.
    """
    served_dir, served = served_checkpoint(updater)
    refused = refusal(updater, weight_name_filter)
    if refused:
        return _failed(f"{refused} Still serving {served}.")
    ranks = TpRanks()
    target = ranks.from_first(_locate(model_path) if ranks.rank == 0 else None)
    if isinstance(target, str):
        return _failed(f"{target}. Still serving {served}.")
    with contextlib.ExitStack() as stack:
        checked = _check(updater, target, stack)
        verdict = ranks.agree(checked.outcome)
        if not verdict.ok:
            return _failed(f"{verdict.message}. Still serving {served}.")
        verdict = ranks.agree(_load(updater, checked.ckpt, checked.dims))
    if verdict.ok:
        return _commit(updater, model_path, target, recapture_cuda_graph)
    failure = f"Failed to update weights from {model_path} ({describe(target)}): {verdict.message}"
    logger.error("%s; restoring %s on every rank", failure, served)
    restored = ranks.agree(_restore(updater, served_dir))
    if restored.ok:
        return _failed(f"{failure}. Rolled back on every rank: still serving {served}.")
    return _failed(
        f"{failure}. Restoring {served} failed as well ({restored.message}): the weights of "
        "this server are now inconsistent; restart it."
    )


@dataclasses.dataclass
class _Checked:
    outcome: Outcome
    ckpt: MegatronCheckpoint | None = None
    dims: ModelDims | None = None


def _check(updater: Any, target: CheckpointLocation, stack: contextlib.ExitStack) -> _Checked:
    """Open ``target`` and refuse it if its model differs from the served one (metadata only;
    ``integrity.json`` is verified as at start)."""
    model_config = updater.model_config
    try:
        ckpt = stack.enter_context(MegatronCheckpoint(target.iter_dir))
        overrides = dict(getattr(model_config, "model_override_args", None) or {})
        # the served tokenizer does not change on reload: neither does the vocabulary
        overrides["vocab_size"] = model_config.hf_config.vocab_size
        new_config = checkpoint_hf_config(ckpt, overrides)
        new = dims_for(ckpt, new_config)
        serving = ModelDims.from_hf_config(model_config.hf_config, new.padded_vocab_size)
        problems = config_incompatibilities(model_config.hf_config, new_config)
        problems += incompatibilities(serving, new)
        if problems:
            return _Checked(
                Outcome(
                    False,
                    f"{ckpt.source}: refusing to reload, the checkpoint's model differs from "
                    "the one being served (" + "; ".join(problems) + ")",
                )
            )
        verify_integrity(target.iter_dir, _extra(updater).get("verify_integrity", "auto"))
    except MegatronLoaderError as exc:
        return _Checked(Outcome(False, str(exc)))
    return _Checked(Outcome(True), ckpt, serving)


def _extra(updater: Any) -> dict[str, Any]:
    """The loader's ``--model-loader-extra-config`` the server was started with."""
    load_config = getattr(updater.get_model_runner(), "load_config", None)
    return dict(getattr(load_config, "model_loader_extra_config", None) or {})


def _load(updater: Any, ckpt: MegatronCheckpoint | None, dims: ModelDims | None) -> Outcome:
    """SGLang's reload steps (``WeightUpdater.update_weights_from_disk``): undo quantization
    packing, fill every parameter, post-process; any failure is this rank's outcome."""
    import torch
    from sglang.srt.model_loader.loader import DefaultModelLoader
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    from sglang_megatron_loader.sglang.loader import load_weights_into

    model, device = updater.get_model(), torch.device(updater.device)
    extra = _extra(updater)
    progress, threads = bool(extra.get("progress", True)), extra.get("threads")  # as at start
    try:
        with set_default_torch_dtype(updater.model_config.dtype):
            DefaultModelLoader.restore_weights_before_loading(model, device)
            # the served parameters are in memory already: no pre-faulting walk over them
            load_weights_into(model, ckpt, dims, progress=progress, threads=threads, prefault=False)
            DefaultModelLoader.postprocess_weights(model, device)
    except Exception as exc:  # any failure, on any rank, is rolled back on every rank
        logger.exception("loading %s failed on this rank", ckpt.location.iter_dir)
        return Outcome(False, f"{type(exc).__name__}: {exc}")
    return Outcome(True)


def _restore(updater: Any, served_dir: str) -> Outcome:
    try:
        with MegatronCheckpoint(served_dir) as ckpt:
            dims = dims_for(ckpt, updater.model_config.hf_config)
            return _load(updater, ckpt, dims)
    except MegatronLoaderError as exc:
        return Outcome(False, str(exc))


def _commit(
    updater: Any, model_path: str, target: CheckpointLocation, recapture_cuda_graph: bool
) -> tuple[bool, str]:
    """What SGLang does after a successful reload: record the served path on the runner (for
    ``/model_info``), and recapture CUDA graphs when asked."""
    from sglang.srt.platforms import current_platform

    updater.model_config.model_path = str(target.iter_dir)
    updater.update_model_fields(
        updater.get_model(),
        model_path=str(target.iter_dir),
        load_format=LOAD_FORMAT,
        load_config=updater.get_model_runner().load_config,
    )
    graphs = updater.device in ("cuda", "musa") or (
        current_platform.is_out_of_tree() and current_platform.capabilities.graph_capture
    )
    if recapture_cuda_graph and graphs:
        updater.recapture_cuda_graph()
    message = (
        f"Succeeded to update model weights from Megatron checkpoint {model_path}: now "
        f"serving {describe(target)} on every TP rank."
    )
    logger.info(message)
    return True, message


def _failed(message: str) -> tuple[bool, str]:
    logger.error("sglang-megatron-loader: %s", message)
    return False, message
