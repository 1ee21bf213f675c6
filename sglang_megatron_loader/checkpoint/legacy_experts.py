"""Expert parallelism in Megatron-LM's legacy ``torch`` format: which per-rank files a save
writes, which expert tensor-parallel (expert-TP) rank each holds, and how megatron-core's
expert modules name their per-expert tensors. Pure: no I/O.

Files. Megatron-LM's ``save_checkpoint`` with ``ckpt_format='torch'`` writes one file per rank
of expert-data-parallel rank 0 (``mpu.get_expert_data_parallel_rank() == 0``), named by
``get_checkpoint_name``: ``mp_rank_{tp:02d}``, then ``_{pp:03d}`` with PP > 1 and ``_{ep:03d}``
with EP > 1, ``tp`` being the rank's *dense* TP rank. megatron-core's ``parallel_state`` orders
both rank grids ``tp-cp-ep-dp-pp`` (dense: TP fastest, no EP; experts: expert-TP fastest, then
EP, then expert-DP), so in a pipeline stage the local rank ``l`` has dense TP rank ``l % tp``,
expert-TP rank ``l % etp`` and EP rank ``(l // etp) % ep``, and the saving ranks are
``l < etp * ep``. Two expert-TP sizes follow from that and are served:

- ``etp == tp`` (megatron-core's default): every ``mp_rank_TT[_PPP]_EEE`` exists and holds the
  experts of EP rank ``EEE`` split over expert-TP rank ``TT``;
- ``etp == 1``: ``ep`` files per stage, ``mp_rank_{e % tp}[_PPP]_{e}``, each with whole experts;
  the dense weights of TP rank ``t`` are in the files with ``e % tp == t`` (``ep >= tp``).

Keys, after ``decoder.layers.{i}.`` (``j`` local to the EP rank; global expert
``ep_rank * num_experts / ep + j``); each expert's local fc1 is ``[gate_r; up_r]`` and its fc2
is split on dim 1, as a dense MLP's:

- ``SequentialMLP``: ``mlp.experts.local_experts.{j}.linear_fc1.weight`` / ``linear_fc2.weight``;
- ``TEGroupedMLP``: ``mlp.experts.linear_fc1.weight{j}`` / ``linear_fc2.weight{j}`` (Transformer
  Engine's ``GroupedLinear`` registers one ``weight{j}`` per GEMM). Its ``sharded_state_dict``
  maps ``weight{j}`` to the same global expert, with the same ``[gate; up]`` factory and TP axes,
  as ``SequentialMLP`` maps ``local_experts.{j}``, so the local tensors are laid out alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from sglang_megatron_loader.errors import CorruptCheckpointError, UnsupportedCheckpointError

# the global name torch_dist stores the experts under, after ``decoder.layers.``
EXPERTS = "mlp.experts.experts."
_PER_EXPERT = (
    re.compile(r"^mlp\.experts\.local_experts\.(?P<j>\d+)\.(?P<name>linear_fc[12]\.weight)$"),
    re.compile(r"^mlp\.experts\.(?P<name>linear_fc[12]\.weight)(?P<j>\d+)$"),
)
_IGNORED = re.compile(r"(^|\.)_extra_state\d*$")
# (pattern over the key after the layer index, why it is refused); the first match wins
_REFUSED = tuple(
    (re.compile(p), why)
    for p, why in (
        (
            r"^mlp\.experts\.weight[12]$",
            "megatron-core's non-Transformer-Engine GroupedMLP stores all local experts in one "
            "weight1/weight2 pair, a layout this loader does not read; re-save with "
            "--ckpt-format torch_dist or with SequentialMLP / TEGroupedMLP experts",
        ),
        (
            r"^mlp\.experts\.linear_fc[12]\.(weight|bias)$",
            "one grouped tensor for all local experts (moe_single_grouped_weight / "
            "moe_single_grouped_bias) is not served",
        ),
        (
            r"^mlp\.experts\.(local_experts\.\d+\.)?linear_fc[12]\.bias\d*$",
            "expert biases (add_bias_linear) are not served",
        ),
        (r"^mlp\.experts\.", "an expert tensor whose layout this loader does not know"),
        (
            r"^mlp\.router\.(?!weight$)",
            "router tensors other than mlp.router.weight (expert bias, quantile-balancing "
            "bias, router bias) change routing in a way this loader does not serve",
        ),
        (r"^mlp\.shared_experts\.", "shared experts are not served"),
    )
)


def expert_key(rest: str) -> tuple[str, int] | None:
    """``(global name after decoder.layers., local expert index)`` of a per-expert key (``rest``:
    the key after its layer index), else None."""
    for pattern in _PER_EXPERT:
        hit = pattern.match(rest)
        if hit:
            return EXPERTS + hit.group("name"), int(hit.group("j"))
    return None


def refusal(rest: str) -> str | None:
    """Why a MoE key (after its layer index) that is not a served per-expert tensor is refused;
    None for any other key (``_extra_state`` included)."""
    if _IGNORED.search(rest):
        return None
    return next((why for pattern, why in _REFUSED if pattern.search(rest)), None)


def with_local_index(stored_key: str, j: int) -> str:
    """``stored_key`` (a per-expert key of either module) naming local expert ``j`` instead."""
    key = re.sub(r"\.local_experts\.\d+\.", f".local_experts.{j}.", stored_key)
    return re.sub(r"(\.linear_fc[12]\.weight)\d+$", rf"\g<1>{j}", key)


@dataclass(frozen=True)
class RankLayout:
    """The training layout a legacy save's args give and the files Megatron-LM writes for it.

    ``etp`` None means megatron-core's default, the TP size.
    """

    tp: int
    pp: int
    ep: int = 1
    etp: int | None = None
    num_experts: int = 0

    def __post_init__(self) -> None:
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)
        if min(self.tp, self.pp, self.ep, self.expert_tp) < 1:
            raise CorruptCheckpointError(f"invalid parallel sizes in args ({self.describe()})")
        if self.expert_tp not in (self.tp, 1):
            raise UnsupportedCheckpointError(
                f"{self.describe()}: a legacy save with an expert tensor-parallel size other "
                "than the TP size or 1 is not supported (which file holds which expert shard "
                "is not established for it); re-save with --ckpt-format torch_dist"
            )
        if self.num_experts % self.ep:
            raise CorruptCheckpointError(
                f"num_experts={self.num_experts} is not a multiple of "
                f"expert_model_parallel_size={self.ep}"
            )
        held = {t for t, _, _ in self.files}
        missing = sorted(set(range(self.tp)) - held)
        if missing:
            raise UnsupportedCheckpointError(
                f"{self.describe()}: Megatron-LM's legacy save writes only the files of "
                f"expert-data-parallel rank 0, which hold dense TP rank(s) {sorted(held)}; the "
                f"dense weights of TP rank(s) {missing} are in no file. Re-save with "
                "--ckpt-format torch_dist"
            )

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def local_experts(self) -> int:
        """Experts per EP rank."""
        return self.num_experts // self.ep

    def describe(self) -> str:
        out = f"tensor_model_parallel_size={self.tp}, pipeline_model_parallel_size={self.pp}"
        if self.ep > 1 or self.expert_tp != self.tp:
            out += (
                f", expert_model_parallel_size={self.ep}, "
                f"expert_tensor_parallel_size={self.expert_tp}"
            )
        return out

    @cached_property
    def files(self) -> dict[tuple[int, int, int], int]:
        """``(tp rank, pp rank, ep rank)`` of every file -> the expert-TP rank of its experts."""
        etp, ep = self.expert_tp, self.ep
        return {
            (rank % self.tp, p, (rank // etp) % ep): rank % etp
            for p in range(self.pp)
            for rank in range(etp * ep)
        }

    def folder(self, tp: int, pp: int, ep: int) -> str:
        """The file's folder name (Megatron-LM's ``get_checkpoint_name``)."""
        return (
            f"mp_rank_{tp:02d}"
            + (f"_{pp:03d}" if self.pp > 1 else "")
            + (f"_{ep:03d}" if self.ep > 1 else "")
        )

    def dense_sources(self) -> dict[tuple[int, int], int]:
        """``(tp rank, pp rank)`` -> the EP rank of the file whose dense tensors are used (the
        lowest; every file of a TP rank holds the same dense partition)."""
        out: dict[tuple[int, int], int] = {}
        for t, p, e in sorted(self.files):
            out.setdefault((t, p), e)
        return out

    def holder(self, pp: int, expert: int, expert_tp_rank: int) -> tuple[int, int, int]:
        """``(tp, pp, ep)`` of the file holding ``expert``'s expert-TP shard in stage ``pp``."""
        ep = expert // self.local_experts
        files = self.files
        return next(k for k in sorted(files) if k[1:] == (pp, ep) and files[k] == expert_tp_rank)
