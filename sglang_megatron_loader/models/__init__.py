"""Model-family mapping tables and the sharding rule types.

:func:`table_for` picks the table of the architecture ``config.py`` chose from the args.
"""

from __future__ import annotations

from typing import Any

from sglang_megatron_loader.errors import UnsupportedCheckpointError
from sglang_megatron_loader.models.llama import LLAMA
from sglang_megatron_loader.models.moe import MIXTRAL, QWEN3_MOE
from sglang_megatron_loader.models.qwen import QWEN2, QWEN3
from sglang_megatron_loader.models.table import ModelTable

TABLES: dict[str, ModelTable] = {
    t.architecture: t for t in (LLAMA, QWEN2, QWEN3, MIXTRAL, QWEN3_MOE)
}


def table_for(hf_config: Any) -> ModelTable:
    """The mapping table of ``hf_config.architectures[0]``."""
    arch = (getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"])[0]
    try:
        return TABLES[arch]
    except KeyError:
        raise UnsupportedCheckpointError(
            f"architecture {arch!r} has no Megatron mapping table; known: {sorted(TABLES)}"
        ) from None
