"""SGLang server flags that ``--load-format megatron`` cannot honour, refused at start.

Checked in the launcher while SGLang resolves its arguments (before any download or scheduler),
each with why and what to do instead. What works with the loader is listed in the README
("SGLang features with --load-format megatron").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as Hugging Face Hub ids are


def model_path_refusal(path: str) -> str | None:
    """A remote URL or a Hub id instead of a local folder: why it cannot be read, what to do."""
    url = _URL.match(path)
    if url:
        return (
            f"--model-path {path}: a {url.group(1)}:// URL; --load-format megatron reads "
            "Megatron checkpoints from a local (or mounted) folder only. Copy the run folder "
            "locally (e.g. `aws s3 sync`, `gcloud storage cp -r`) or mount the bucket, then pass "
            "that folder."
        )
    if not Path(path).expanduser().exists() and _HUB_ID.match(path):
        return (
            f"--model-path {path}: no such local folder, and it looks like a Hugging Face Hub "
            "id; --load-format megatron does not download. Download the checkpoint first (e.g. "
            f"`huggingface-cli download {path} --local-dir DIR`) and pass DIR, or drop "
            "--load-format megatron for a Hugging Face model."
        )
    return None


def flag_refusals(cfg: Any) -> list[str]:
    """Every flag of ``cfg`` (SGLang's resolving view) the loader does not honour."""
    out = []
    refused_path = model_path_refusal(str(cfg.model_path))
    if refused_path:
        out.append(refused_path)
    if cfg.revision:
        out.append(
            f"--revision {cfg.revision}: selects a Hugging Face Hub revision, but a Megatron "
            "checkpoint is a local folder whose iteration is chosen by its tracker file or by "
            "the iter_* folder given. Drop --revision and pass the iter_* folder you want."
        )
    if cfg.modelopt_quant or cfg.quantize_and_serve:
        out.append(
            f"--modelopt-quant {cfg.modelopt_quant}: ModelOpt quantizes in SGLang's ModelOpt "
            "loader, which --load-format megatron replaces. Export the checkpoint to Hugging "
            "Face (`sglang-megatron export CKPT OUT`) and serve OUT with --modelopt-quant, or "
            "use an online --quantization such as fp8 with --load-format megatron."
        )
    return out
