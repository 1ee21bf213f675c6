"""LoRA adapters on a Megatron base model.

SGLang reads an adapter (a Hugging Face PEFT folder) with its default loader, configured by the
server's load config; with ``--load-format megatron`` that config names this package's loader,
which reads Megatron checkpoints only ("Unknown load_format"). The adapter is read in SGLang's
default format (``auto``: safetensors or .bin) instead; the base model stays as loaded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sglang_megatron_loader.sglang.reload import wants_megatron


def initialize_adapter_weights(original: Any, adapter: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook on SGLang's ``LoRAAdapter.initialize_weights``."""
    from sglang.srt.configs.load_config import LoadFormat

    load_config = adapter.load_config
    if not wants_megatron(load_config.load_format, ""):
        return original(adapter, *args, **kwargs)
    adapter.load_config = dataclasses.replace(
        load_config, load_format=LoadFormat.AUTO, model_loader_extra_config={}
    )
    try:
        return original(adapter, *args, **kwargs)
    finally:
        adapter.load_config = load_config
