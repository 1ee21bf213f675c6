"""Mixture-of-experts checkpoints in Megatron-LM's legacy ``torch`` format, expert-parallel saves
included: which files a save writes (against megatron-core's own rank generator), the merge of
per-rank, per-expert tensors into torch_dist's global expert tensors (pure, from shapes), and
real saves (``make_legacy_checkpoint.py``): TEGroupedMLP's key names, refusals and damage named
by file and key. That every global tensor of each legacy MoE save equals the torch_dist save of
the same weights is ``test_legacy.py::test_global_tensors_equal_torch_dist`` (all variants).
"""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch
from test_legacy import _copy, _rewrite

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.checkpoint import legacy_layout as layout
from sglang_megatron_loader.checkpoint.legacy_experts import RankLayout
from sglang_megatron_loader.errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsupportedCheckpointError,
)

_L, _E, _F, _H = 2, 4, 8, 3
FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
ROUTER = "decoder.layers.mlp.router.weight"
TP2EP2 = "legacy_moe_mixtral_fp32_tp2ep2"
EP2 = "legacy_moe_qwen3_fp32_ep2"
ITER = "iter_0000010"
EXPERT = "decoder.layers.{}.mlp.experts.local_experts.{}.linear_fc{}.weight"

# (tp, pp, ep, etp) -> {folder: expert TP rank of its experts}
FILES = {
    (2, 1, 2, 2): {"mp_rank_00_000": 0, "mp_rank_01_000": 1, "mp_rank_00_001": 0,
                   "mp_rank_01_001": 1},
    (1, 1, 2, 1): {"mp_rank_00_000": 0, "mp_rank_00_001": 0},
    (2, 1, 2, 1): {"mp_rank_00_000": 0, "mp_rank_01_001": 0},
    (2, 1, 4, 1): {"mp_rank_00_000": 0, "mp_rank_01_001": 0, "mp_rank_00_002": 0,
                   "mp_rank_01_003": 0},
    (2, 1, 1, 2): {"mp_rank_00": 0, "mp_rank_01": 1},
    (1, 2, 2, 1): {"mp_rank_00_000_000": 0, "mp_rank_00_000_001": 0, "mp_rank_00_001_000": 0,
                   "mp_rank_00_001_001": 0},
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Which files a save writes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tp", "pp", "ep", "etp"), list(FILES))
def test_files_are_those_megatron_writes(tp: int, pp: int, ep: int, etp: int) -> None:
    ranks = RankLayout(tp, pp, ep, etp, num_experts=4)
    assert {ranks.folder(*k): r for k, r in ranks.files.items()} == FILES[(tp, pp, ep, etp)]


def _position(groups: list[list[int]], rank: int) -> int:
    return next(g.index(rank) for g in groups if rank in g)


@pytest.mark.parametrize(("tp", "pp", "ep", "etp"), [*FILES, (4, 1, 2, 4), (2, 2, 4, 1)])
def test_files_match_megatron_core_rank_generator(tp: int, pp: int, ep: int, etp: int) -> None:
    """Megatron-LM saves on expert-data-parallel rank 0 into ``mp_rank_{tp}[_{pp}][_{ep}]``;
    the ranks come from megatron-core's own ``RankGenerator`` (default order)."""
    ps = pytest.importorskip("megatron.core.parallel_state")
    world = math.lcm(tp, ep * etp) * pp
    order = "tp-cp-ep-dp-pp"
    dense = ps.RankGenerator(tp=tp, ep=1, dp=world // (tp * pp), pp=pp, cp=1, order=order)
    expert = ps.RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1, order=order)
    saved = {}
    for r in range(world):
        if _position(expert.get_ranks("dp"), r) == 0:
            name = (
                _position(dense.get_ranks("tp"), r),
                _position(dense.get_ranks("pp"), r),
                _position(expert.get_ranks("ep"), r) if ep > 1 else 0,
            )
            assert name not in saved, f"two ranks write {name}"
            saved[name] = _position(expert.get_ranks("tp"), r)
    assert RankLayout(tp, pp, ep, etp, num_experts=8).files == saved


def test_layouts_not_established_are_refused_by_name() -> None:
    with pytest.raises(UnsupportedCheckpointError, match=r"expert_tensor_parallel_size=4.*other"):
        RankLayout(2, 1, 2, 4, num_experts=4)
    with pytest.raises(UnsupportedCheckpointError, match=r"dense weights of TP rank\(s\) \[1\]"):
        RankLayout(2, 1, 1, 1, num_experts=4)  # expert TP 1 without EP: only mp_rank_00 saved
    with pytest.raises(CorruptCheckpointError, match=r"num_experts=6 .* expert_model_parallel"):
        RankLayout(1, 1, 4, 1, num_experts=6)


# ---------------------------------------------------------------------------------------------
# Pure merge: what every file holds -> torch_dist's [L, E, ...] expert tensors
# ---------------------------------------------------------------------------------------------

SEQUENTIAL = "decoder.layers.{i}.mlp.experts.local_experts.{j}.{fc}.weight"
TE_GROUPED = "decoder.layers.{i}.mlp.experts.{fc}.weight{j}"  # GroupedLinear's weight{j}


def _save(
    ranks: RankLayout, form: str
) -> tuple[dict[layout.LocalTensor, torch.Tensor], dict[str, torch.Tensor]]:
    """Random global expert weights and router, as each file of ``ranks`` stores them
    (``form``: the per-expert key names), and the global tensors torch_dist would store."""
    gen = torch.Generator().manual_seed(0)
    fc1, fc2 = (
        torch.randn(_L, _E, 2 * _F, _H, generator=gen),
        torch.randn(_L, _E, _H, _F, generator=gen),
    )
    router = torch.randn(_L, _E, _H, generator=gen)
    n, out = _F // ranks.expert_tp, {}
    for (t, p, e), r in ranks.files.items():
        name = f"{ranks.folder(t, p, e)}/model_optim_rng.pt"
        for i in range(_L):
            held = {f"decoder.layers.{i}.mlp.router.weight": router[i]}
            for j in range(ranks.local_experts):
                g = e * ranks.local_experts + j
                gate, up = fc1[i, g, r * n : (r + 1) * n], fc1[i, g, _F + r * n : _F + (r + 1) * n]
                held[form.format(i=i, j=j, fc="linear_fc1")] = torch.cat([gate, up])
                held[form.format(i=i, j=j, fc="linear_fc2")] = fc2[i, g, :, r * n : (r + 1) * n]
            for key, x in held.items():
                lt = layout.LocalTensor(t, p, 0, key, x.dtype, tuple(x.shape), name, e)
                out[lt] = x.contiguous()
    return out, {FC1: fc1, FC2: fc2, ROUTER: router}


def _assemble(g: layout.GlobalTensor, data: dict[layout.LocalTensor, torch.Tensor]) -> torch.Tensor:
    out, seen = torch.full(g.shape, float("nan")), torch.zeros(g.shape, dtype=torch.int32)
    for p in g.pieces:
        src = data[p.source]
        rows = math.prod(p.sizes) // math.prod(src.shape[1:])
        box = tuple(slice(o, o + s) for o, s in zip(p.offsets, p.sizes, strict=True))
        out[box] = src[p.row0 : p.row0 + rows].reshape(p.sizes)
        seen[box] += 1
    assert torch.all(seen == 1), "pieces overlap or leave holes"
    return out


@pytest.mark.parametrize("form", [SEQUENTIAL, TE_GROUPED], ids=["sequential", "te_grouped"])
@pytest.mark.parametrize(("tp", "ep", "etp"), [(1, 1, 1), (1, 2, 1), (2, 2, 2), (2, 2, 1),
                                               (2, 1, 2), (2, 4, 1)])  # fmt: skip
def test_merge_rebuilds_the_global_expert_tensors(tp: int, ep: int, etp: int, form: str) -> None:
    ranks = RankLayout(tp, 1, ep, etp, num_experts=_E)
    data, want = _save(ranks, form)
    merged = layout.merge(
        list(data), tp=tp, pp=1, vpp=1, num_layers=_L, gated=True, ep=ep, etp=etp, num_experts=_E
    )
    assert set(merged) == set(want)
    for key, full in want.items():
        assert merged[key].shape == full.shape, key
        assert torch.equal(_assemble(merged[key], data), full), key
    assert {p.source.ep for p in merged[ROUTER].pieces} == {0}  # one copy of the replicated


def _one_key(rest: str) -> list[layout.LocalTensor]:
    return [
        layout.LocalTensor(0, 0, 0, f"decoder.layers.0.{rest}", torch.float32, (4, 4), f, e)
        for e, f in enumerate(("mp_rank_00_000/model_optim_rng.pt", "mp_rank_00_001/x.pt"))
    ]


@pytest.mark.parametrize(
    ("rest", "why"),
    [
        ("mlp.experts.weight1", "non-Transformer-Engine GroupedMLP"),
        ("mlp.experts.linear_fc1.weight", "moe_single_grouped_weight"),
        ("mlp.experts.local_experts.0.linear_fc2.bias", "expert biases"),
        ("mlp.experts.linear_fc1.bias1", "expert biases"),
        ("mlp.router.expert_bias", "router tensors other than mlp.router.weight"),
        ("mlp.shared_experts.linear_fc1.weight", "shared experts"),
        ("mlp.experts.local_experts.0.linear_fc3.weight", "layout this loader does not know"),
    ],
)
def test_expert_layouts_not_served_are_refused_by_key(rest: str, why: str) -> None:
    with pytest.raises(UnsupportedCheckpointError) as err:
        layout.merge(
            _one_key(rest), tp=1, pp=1, vpp=1, num_layers=1, gated=True, ep=2, num_experts=4
        )
    msg = str(err.value)
    assert "mp_rank_00_000/model_optim_rng.pt" in msg and f"'decoder.layers.0.{rest}'" in msg
    assert why in msg


# ---------------------------------------------------------------------------------------------
# Real saves
# ---------------------------------------------------------------------------------------------


def _whole(ckpt: MegatronCheckpoint, key: str) -> torch.Tensor:
    return ckpt.dcp.read_slice(key, tuple((0, n) for n in ckpt.tensors[key].shape))


def test_te_grouped_key_names_read_as_sequential(legacy_ckpt, tmp_path) -> None:
    """TEGroupedMLP's ``linear_fc1.weight{j}`` in place of SequentialMLP's
    ``local_experts.{j}.linear_fc1.weight``: megatron-core maps both to the same global expert
    with the same TP layout (``TEGroupedMLP.sharded_state_dict``), so the renamed save must
    give the same global tensors."""
    src = legacy_ckpt(TP2EP2)
    root = _copy(src, tmp_path)
    seq = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.(\w+)\.weight$")

    def to_te(state: dict) -> None:
        state["model"] = {seq.sub(r"\1\3.weight\2", k): v for k, v in state["model"].items()}

    for path in sorted((root / ITER).glob("mp_rank_*/model_optim_rng.pt")):
        _rewrite(path, to_te)
    renamed = torch.load(path, weights_only=False)["model"]
    assert "decoder.layers.1.mlp.experts.linear_fc2.weight1" in renamed
    with MegatronCheckpoint(root) as te, MegatronCheckpoint(src) as sq:
        assert set(te.tensors) == set(sq.tensors) and FC1 in te.tensors
        for key in sorted(te.tensors):
            assert torch.equal(_whole(te, key), _whole(sq, key)), key


def test_missing_expert_parallel_folder_is_named(legacy_ckpt, tmp_path) -> None:
    root = _copy(legacy_ckpt(TP2EP2), tmp_path)
    shutil.rmtree(root / ITER / "mp_rank_01_001")
    with pytest.raises(IncompleteCheckpointError) as err:
        MegatronCheckpoint(root)
    assert "expert_model_parallel_size=2" in str(err.value)
    assert "but mp_rank_01_001 is missing" in str(err.value)


@pytest.mark.parametrize(
    ("name", "folder", "key"),
    [
        (TP2EP2, "mp_rank_01_001", EXPERT.format(1, 1, 2)),
        (EP2, "mp_rank_00_001", EXPERT.format(0, 0, 1)),
    ],
)
def test_expert_missing_on_one_rank_names_file_and_key(legacy_ckpt, tmp_path, name, folder, key):
    root = _copy(legacy_ckpt(name), tmp_path)
    _rewrite(root / ITER / folder / "model_optim_rng.pt", lambda s: s["model"].pop(key))
    with pytest.raises(CorruptCheckpointError) as err:
        MegatronCheckpoint(root)
    msg = str(err.value)
    assert f"{folder}/model_optim_rng.pt: key '{key}' is missing" in msg, msg


@pytest.mark.parametrize(
    ("name", "folder", "key"),
    [
        (TP2EP2, "mp_rank_01_000", EXPERT.format(0, 1, 1)),
        (EP2, "mp_rank_00_001", EXPERT.format(1, 1, 2)),
    ],
)
def test_expert_of_wrong_shape_names_file_and_key(legacy_ckpt, tmp_path, name, folder, key):
    root = _copy(legacy_ckpt(name), tmp_path)
    path = root / ITER / folder / "model_optim_rng.pt"
    _rewrite(path, lambda s: s["model"].update({key: s["model"][key][:-2].contiguous()}))
    with pytest.raises(CorruptCheckpointError) as err:
        MegatronCheckpoint(root)
    msg = str(err.value)
    assert f"{path}: key '{key}'" in msg, msg


def test_expert_beyond_the_local_count_is_named(legacy_ckpt, tmp_path) -> None:
    root = _copy(legacy_ckpt(EP2), tmp_path)
    path = root / ITER / "mp_rank_00_000" / "model_optim_rng.pt"
    old, new = EXPERT.format(0, 1, 2), EXPERT.format(0, 2, 2)
    _rewrite(path, lambda s: s["model"].update({new: s["model"][old].clone()}))
    with pytest.raises(CorruptCheckpointError, match=rf"'{re.escape(new)}' is local expert 2, but"):
        MegatronCheckpoint(root)
