"""The TP ranks of one served model, agreeing over SGLang's TP CPU (gloo) group.

SGLang runs ``update_weights_from_disk`` on every TP rank of a scheduler and answers from the
first one alone; a decision that every rank must follow (which iteration to read, whether the
reload held everywhere) is taken here: the first rank decides, or every rank's outcome is
gathered so that all of them see the same verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class Outcome:
    """One rank's result of a step: ``ok`` and, when not, why (for the user)."""

    ok: bool
    message: str = ""


class TpRanks:
    """This process's TP group (``get_parallel().tp_group``); a no-op at TP=1."""

    def __init__(self, group: Any = None) -> None:
        if group is None:
            from sglang.srt.runtime_context import get_parallel

            group = get_parallel().tp_group
        self.rank = int(group.rank_in_group)
        self.size = int(group.world_size)
        self._cpu = group.cpu_group if self.size > 1 else None

    def from_first(self, value: Any) -> Any:
        """``value`` as the first TP rank has it, on every rank."""
        if self._cpu is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, group=self._cpu, group_src=0)
        return box[0]

    def agree(self, outcome: Outcome) -> Outcome:
        """Ok only if ok on every rank; otherwise each failing rank's message, by rank."""
        if self._cpu is None:
            return outcome
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, outcome, group=self._cpu)
        failed = [(r, o) for r, o in enumerate(gathered) if not o.ok]
        if not failed:
            return Outcome(True)
        if len({o.message for _, o in failed}) == 1 and len(failed) == self.size:
            return Outcome(False, failed[0][1].message)  # the same on every rank
        return Outcome(False, "; ".join(f"TP rank {r}: {o.message}" for r, o in failed))
