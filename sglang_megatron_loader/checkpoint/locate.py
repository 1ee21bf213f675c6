"""Find the iteration folder of a Megatron run and tell which checkpoint format it holds."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sglang_megatron_loader.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsupportedCheckpointError,
)

TRACKER = "latest_checkpointed_iteration.txt"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


@dataclass(frozen=True)
class CheckpointLocation:
    """A resolved checkpoint: the iteration folder, its iteration and its on-disk format."""

    path: Path  # what the user gave
    iter_dir: Path
    iteration: int | None  # None for ``release``
    format: str  # "torch_dist", "torch" (legacy mp_rank_* files) or "torch_dcp" (plain DCP)
    metadata_json: dict

    @property
    def iteration_label(self) -> str:
        return "release" if self.iteration is None else str(self.iteration)


def looks_like_megatron(path: str | Path) -> bool:
    """Cheap test used by the config hook: a run root or an iteration folder of Megatron's."""
    p = Path(path)
    if not p.is_dir() or (p / "config.json").exists():
        return False
    if (p / TRACKER).is_file() or (p / "metadata.json").is_file() or (p / ".metadata").is_file():
        return True
    if p.name == "release" or _ITER_RE.match(p.name):
        return True
    return any(_ITER_RE.match(c.name) for c in p.iterdir() if c.is_dir())


def resolve(path: str | Path) -> CheckpointLocation:
    """Resolve a run root (following the tracker file) or an ``iter_*`` folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointNotFoundError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise CheckpointNotFoundError(
            f"{p}: is a file; pass the Megatron run folder (with {TRACKER}) or an iter_* folder"
        )
    iter_dir, iteration = _iteration_dir(p)
    return CheckpointLocation(p, iter_dir, iteration, *_detect_format(iter_dir))


def _iteration_dir(p: Path) -> tuple[Path, int | None]:
    tracker = p / TRACKER
    if tracker.is_file():
        text = tracker.read_text(errors="replace").strip()
        if text == "release":
            target, iteration = p / "release", None
        elif text.isascii() and text.isdigit():
            iteration = int(text)
            target = p / f"iter_{iteration:07d}"
        else:
            raise CorruptCheckpointError(
                f"{tracker}: expected an iteration number or 'release', found {text[:60]!r}"
            )
        if not target.is_dir():
            raise CheckpointNotFoundError(
                f"{tracker} names iteration {text!r} but {target} does not exist; point "
                "--model-path at an existing iter_* folder or fix the tracker file"
            )
        return target, iteration
    match = _ITER_RE.match(p.name)
    if match:
        return p, int(match.group(1))
    if p.name == "release":
        return p, None
    if (p / "metadata.json").is_file() or (p / ".metadata").is_file():
        return p, None
    iters = sorted(c.name for c in p.iterdir() if c.is_dir() and _ITER_RE.match(c.name))
    hint = f" (found {', '.join(iters[-3:])}: pass one of them)" if iters else ""
    raise CheckpointNotFoundError(
        f"{p}: not a Megatron checkpoint: no {TRACKER} and not an iter_* folder{hint}"
    )


def _detect_format(d: Path) -> tuple[str, dict]:
    names = {c.name for c in d.iterdir()}
    meta_json = d / "metadata.json"
    if meta_json.is_file():
        try:
            meta = json.loads(meta_json.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(f"{meta_json}: not valid JSON ({exc})") from exc
        backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
        if backend != "torch_dist":
            raise UnsupportedCheckpointError(
                f"{meta_json}: sharded_backend is {backend!r}; only 'torch_dist' is supported"
            )
        return "torch_dist", meta
    if any(n.startswith("mp_rank_") for n in names):
        return "torch", {}  # legacy per-rank files (--ckpt-format torch): checkpoint/legacy.py
    if ".metadata" in names and _is_plain_dcp_save(d / ".metadata"):
        return "torch_dcp", {}  # Megatron-LM --ckpt-format torch_dcp: checkpoint/torch_dcp.py
    if ".metadata" in names or any(n.endswith(".distcp") for n in names):
        raise IncompleteCheckpointError(
            f"{d}: has DCP data but no metadata.json. Megatron writes metadata.json last, so the "
            "save is incomplete (still running or crashed); wait for it to finish or load an "
            "earlier iteration."
        )
    if not names:
        raise CheckpointNotFoundError(f"{d}: the folder is empty")
    raise CheckpointNotFoundError(
        f"{d}: no metadata.json, .metadata or mp_rank_* inside; not a Megatron checkpoint"
    )


def _is_plain_dcp_save(meta_path: Path) -> bool:
    """True for a complete plain-DCP save of Megatron-LM's state dict (``torch_dcp`` and
    ``fsdp_dtensor``): ``args`` is a top-level DCP item and the weights sit under ``model.``.

    megatron-core's torch_dist keeps args in ``common.pt`` or ``common_state/*`` and never
    prefixes keys, and DCP writes ``.metadata`` only once every data file is complete; so a
    torch_dist folder without ``metadata.json`` stays an incomplete save. Unreadable metadata
    (truncated: a save in progress) counts as not; a hostile one raises UnsafePickleError. Only
    the keys are looked at: a damaged entry is reported by the reader, naming it.
    """
    from sglang_megatron_loader.checkpoint.dcp_standins import MetadataRecord, unpickle_dcp_metadata

    try:
        meta, _ = unpickle_dcp_metadata(meta_path.read_bytes(), source=str(meta_path))
    except (CorruptCheckpointError, OSError):
        return False
    keys = MetadataRecord.state_dict_keys(meta) if isinstance(meta, MetadataRecord) else []
    return "args" in keys and any(isinstance(k, str) and k.startswith("model.") for k in keys)


def find_tokenizer(location: CheckpointLocation, tokenizer_model: object = None) -> Path | None:
    """A tokenizer folder that belongs to the checkpoint: ``tokenizer/`` in the iteration folder
    or the run root (newest Megatron-LM saves one), else ``args.tokenizer_model`` when it names
    a local folder. None when there is none. The run root is also found from an ``iter_*``
    folder given directly (the server pins a run root to its iteration folder at start)."""
    candidates = [location.iter_dir / "tokenizer", location.path / "tokenizer"]
    if location.iter_dir.name == "release" or _ITER_RE.match(location.iter_dir.name):
        candidates.append(location.iter_dir.parent / "tokenizer")
    if isinstance(tokenizer_model, str) and tokenizer_model:
        candidates.append(Path(tokenizer_model).expanduser())
    return next((c for c in candidates if c.is_dir()), None)
