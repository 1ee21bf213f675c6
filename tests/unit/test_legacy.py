"""Legacy per-rank ``torch`` format (``--ckpt-format torch``) on real Megatron-LM-style saves.

Each legacy fixture holds the weights of a torch_dist fixture (``make_legacy_checkpoint.py``), so
the two must present the same global tensors, byte for byte, and serve the same model.
"""

from __future__ import annotations

import builtins
import os
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from make_legacy_checkpoint import LEGACY_VARIANTS
from safetensors import safe_open

from sglang_megatron_loader.checkpoint import MegatronCheckpoint, scatter
from sglang_megatron_loader.checkpoint import legacy_layout as layout
from sglang_megatron_loader.cli import main as cli
from sglang_megatron_loader.engine import dims_for, execute_plan, hf_config_for
from sglang_megatron_loader.errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsupportedCheckpointError,
)
from sglang_megatron_loader.inspect_ckpt import inspect
from sglang_megatron_loader.models import table_for
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import plan_rank

ALL = sorted(LEGACY_VARIANTS)
FC1 = "decoder.layers.mlp.linear_fc1.weight"


def model_keys(ckpt: MegatronCheckpoint) -> set[str]:
    return {k for k in ckpt.tensors if not k.startswith("optimizer") and "_extra_state" not in k}


# ---------------------------------------------------------------------------------------------
# Pure layout
# ---------------------------------------------------------------------------------------------


def _local(tp: int, pp: int, vp: int, key: str, shape: tuple[int, ...]) -> layout.LocalTensor:
    return layout.LocalTensor(tp, pp, vp, key, torch.float32, shape, f"mp_rank_{tp:02d}_{pp:03d}")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gated_fc1_pieces_rebuild_gate_all_then_up_all(tp: int) -> None:
    """Megatron's rank t holds [gate_t; up_t]; the global tensor is [gate_all; up_all]."""
    f, h = 8, 3
    full = torch.randn(2 * f, h)
    gate, up = full[:f].chunk(tp), full[f:].chunk(tp)
    ranks = {t: torch.cat([gate[t], up[t]]) for t in range(tp)}  # what each rank saves
    key = "decoder.layers.0.mlp.linear_fc1.weight"
    local = [_local(t, 0, 0, key, tuple(ranks[t].shape)) for t in range(tp)]
    merged = layout.merge(local, tp=tp, pp=1, vpp=1, num_layers=1, gated=True)
    g = merged[FC1]
    assert g.shape == (1, 2 * f, h) and len(g.pieces) == (2 * tp if tp > 1 else 1)
    out = torch.full(g.shape, float("nan"))
    for p in g.pieces:
        rows = ranks[p.source.tp][p.row0 : p.row0 + p.sizes[1]]
        out[0, p.offsets[1] : p.offsets[1] + p.sizes[1]] = rows
    assert torch.equal(out[0], full)


def test_partitions_by_layer_kind() -> None:
    """Column-parallel split rows, row-parallel columns, norms replicated (rank 0's copy)."""
    local = []
    for t in range(2):
        local += [
            _local(t, 0, 0, "decoder.layers.0.self_attention.linear_qkv.weight", (12, 4)),
            _local(t, 0, 0, "decoder.layers.0.self_attention.linear_proj.weight", (4, 8)),
            _local(t, 0, 0, "decoder.layers.0.input_layernorm.weight", (4,)),
            _local(t, 0, 0, "embedding.word_embeddings.weight", (64, 4)),
        ]
    merged = layout.merge(local, tp=2, pp=1, vpp=1, num_layers=1, gated=True)
    qkv = merged["decoder.layers.self_attention.linear_qkv.weight"]
    assert qkv.shape == (1, 24, 4) and [p.offsets for p in qkv.pieces] == [(0, 0, 0), (0, 12, 0)]
    proj = merged["decoder.layers.self_attention.linear_proj.weight"]
    assert proj.shape == (1, 4, 16) and [p.offsets for p in proj.pieces] == [(0, 0, 0), (0, 0, 8)]
    norm = merged["decoder.layers.self_attention.linear_qkv.layer_norm_weight"]
    assert norm.shape == (1, 4) and [p.source.tp for p in norm.pieces] == [0]
    assert merged["embedding.word_embeddings.weight"].shape == (128, 4)


def test_virtual_pipeline_layers_interleave() -> None:
    """pp=2, vpp=2: chunk v of stage p starts at layer (v * pp + p) * layers_per_chunk."""
    counts = {(0, 0): 2, (1, 0): 2, (0, 1): 2, (1, 1): 2}
    assert layout.layer_offsets(counts, pp=2, vpp=2) == {(0, 0): 0, (1, 0): 2, (0, 1): 4, (1, 1): 6}
    uneven = {(0, 0): 1, (1, 0): 3}  # e.g. decoder_first_pipeline_num_layers=1
    assert layout.layer_offsets(uneven, pp=2, vpp=1) == {(0, 0): 0, (1, 0): 1}


def test_unknown_key_is_refused_when_it_must_be_merged() -> None:
    local = [_local(t, 0, 0, "decoder.layers.0.mlp.odd.weight", (4, 4)) for t in range(2)]
    with pytest.raises(UnsupportedCheckpointError, match=r"mlp\.odd\.weight.*layout is unknown"):
        layout.merge(local, tp=2, pp=1, vpp=1, num_layers=1, gated=True)


# ---------------------------------------------------------------------------------------------
# Real legacy files == the torch_dist checkpoint of the same weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_global_tensors_equal_torch_dist(legacy_ckpt, megatron_ckpt, name: str) -> None:
    base = LEGACY_VARIANTS[name].base
    with MegatronCheckpoint(legacy_ckpt(name)) as lg, MegatronCheckpoint(megatron_ckpt(base)) as td:
        assert lg.location.format == "torch" and lg.common["checkpoint_version"] == 3.0
        assert set(lg.tensors) == model_keys(td)
        for key in sorted(lg.tensors):
            a, b = lg.tensors[key], td.tensors[key]
            assert (a.shape, a.dtype) == (b.shape, b.dtype), key
            whole = tuple((0, n) for n in a.shape)
            assert torch.equal(lg.dcp.read_slice(key, whole), td.dcp.read_slice(key, whole)), key


def test_vpp_fixture_really_interleaves(legacy_ckpt) -> None:
    root = legacy_ckpt("legacy_fp32_pp2vpp2")
    state = torch.load(
        root / "iter_0000010" / "mp_rank_00_001" / "model_optim_rng.pt", weights_only=False
    )
    assert {"model0", "model1"} <= set(state) and "model" not in state
    assert state["args"].virtual_pipeline_model_parallel_size == 2
    with MegatronCheckpoint(root) as ckpt:
        qkv = ckpt.tensors["decoder.layers.self_attention.linear_qkv.weight"]
        owner = {c.offsets[0]: c.relative_path.split("/")[0] for c in qkv.chunks}
        assert owner == {0: "mp_rank_00_000", 1: "mp_rank_00_001", 2: "mp_rank_00_000",
                         3: "mp_rank_00_001"}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Bytes: a rank reads only the model bytes it holds, never optimizer/RNG state
# ---------------------------------------------------------------------------------------------


def storage_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """``data/<key>`` entry -> byte range of its data in the file (zip headers parsed here)."""
    out = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if "/data/" in info.filename:
                f.seek(info.header_offset)
                head = struct.unpack("<IHHHHHIIIHH", f.read(30))
                start = info.header_offset + 30 + head[9] + head[10]
                out[info.filename] = (start, start + info.file_size)
    return out


class IoLog:
    """Every ``open``/``pread``/``preadv`` (and mapped copy) on files under ``folder``."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder, self.opened, self.reads = str(folder.resolve()), [], []
        real_open, real_pread, real_preadv = builtins.open, os.pread, os.preadv

        def path_of(fd: int) -> str | None:
            p = os.readlink(f"/proc/self/fd/{fd}")
            return p if p.startswith(self.folder) else None

        def opener(file, *a, **k):  # noqa: ANN001, ANN002, ANN003
            if str(Path(file).resolve()).startswith(self.folder):
                self.opened.append(os.path.relpath(Path(file).resolve(), self.folder))
            return real_open(file, *a, **k)

        def pread(fd: int, n: int, offset: int) -> bytes:
            data = real_pread(fd, n, offset)
            if p := path_of(fd):
                self.reads.append(("meta", os.path.relpath(p, self.folder), offset, len(data)))
            return data

        def preadv(fd: int, buffers, offset: int) -> int:  # noqa: ANN001
            n = real_preadv(fd, buffers, offset)
            if p := path_of(fd):
                self.reads.append(("data", os.path.relpath(p, self.folder), offset, n))
            return n

        def preadv_iov(fd: int, iov, offset: int) -> int:  # noqa: ANN001 - scattered preadv
            n = real_iov(fd, iov, offset)
            if p := path_of(fd):
                self.reads.append(("data", os.path.relpath(p, self.folder), offset, n))
            return n

        def read_mapped(f, base, sizes, box, dest, *, source):  # noqa: ANN001
            real_mapped(f, base, sizes, box, dest, source=source)  # column slices: no preadv
            if p := path_of(f.fileno()):
                size = dest.element_size()
                for first, n in scatter.file_runs(sizes, box):
                    rel = os.path.relpath(p, self.folder)
                    self.reads.append(("data", rel, base + first * size, n * size))

        real_mapped, real_iov = scatter.read_mapped, scatter._preadv_iov
        monkeypatch.setattr(builtins, "open", opener)
        monkeypatch.setattr(os, "pread", pread)
        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(scatter, "read_mapped", read_mapped)
        monkeypatch.setattr(scatter, "_preadv_iov", preadv_iov)


@pytest.mark.parametrize("name", ["legacy_fp32_tp2pp2", "legacy_fp32_pp2vpp2", "legacy_fp32_tp1"])
@pytest.mark.parametrize("serve_tp", [1, 2])
def test_rank_reads_only_its_model_bytes(legacy_ckpt, monkeypatch, name: str, serve_tp: int):
    root = legacy_ckpt(name)
    iter_dir = root / "iter_0000010"
    config = hf_config_for(root)
    files = sorted(iter_dir.glob("mp_rank_*/model_optim_rng.pt"))
    for rank in range(serve_tp):
        log = IoLog(iter_dir, monkeypatch)
        with MegatronCheckpoint(root) as ckpt:
            dims = dims_for(ckpt, config)
            plan = plan_rank(table_for(config), dims, ckpt.tensors, Tp(rank, serve_tp))
            model = {(c.relative_path, c.offset, c.offset + c.length)
                     for t in ckpt.tensors.values() for c in t.chunks}  # fmt: skip
            report = execute_plan(ckpt, plan, lambda p: torch.empty(p.shape), progress=False)
        monkeypatch.undo()
        need = plan.bytes_to_read(ckpt.tensors)
        data = [r for r in log.reads if r[0] == "data"]
        assert report.bytes_read == need == sum(r[3] for r in data)
        for _, rel, off, n in data:  # every data read lies inside a model tensor's rows
            assert any(rel == f and a <= off and off + n <= b for f, a, b in model), (rel, off)
        other = {  # storages that hold no model tensor: optimizer state and RNG state
            (f.relative_to(iter_dir).as_posix(), a, b)
            for f in files
            for a, b in storage_ranges(f).values()
            if not any(f.relative_to(iter_dir).as_posix() == m and m0 < b and a < m1
                       for m, m0, m1 in model)
        }  # fmt: skip
        assert other, "fixture has no optimizer state"
        touched = [
            (rel, off) for _, rel, off, n in log.reads
            for f, a, b in other if rel == f and off < b and a < off + n
        ]  # fmt: skip
        assert not touched, f"optimizer/RNG bytes read: {touched[:5]}"
        assert not [p for p in log.opened if p.endswith("distrib_optim.pt")]
        total = sum(f.stat().st_size for f in files)
        meta = sum(r[3] for r in log.reads if r[0] == "meta")
        print(f"{name} TP{serve_tp} rank {rank}: {need} model bytes + {meta} metadata bytes "
              f"read of {total} in {len(files)} file(s)")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Tools: config, inspect, export
# ---------------------------------------------------------------------------------------------


def test_inspect_reports_the_legacy_format(legacy_ckpt, megatron_ckpt, capsys) -> None:
    info, plans = inspect(str(legacy_ckpt("legacy_fp32_tp2pp2")), tp=2)
    base, _ = inspect(str(megatron_ckpt("fp32_tp2pp2")), tp=2)
    assert info["format"] == "torch" and "torch" in info["writer"]
    # the same model; only where the vocabulary size was read differs (each save's tokenizer/)
    origin = "megatron_vocab_origin"
    assert info["config"].pop(origin).endswith("(250 tokens)")
    assert base["config"].pop(origin).endswith("(250 tokens)")
    assert info["config"] == base["config"]
    assert info["bytes_per_rank"] == base["bytes_per_rank"]
    assert info["model_bytes"] == base["model_bytes"] and len(plans) == 2
    assert cli(["inspect", str(legacy_ckpt("legacy_fp32_tp2pp2")), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "format       torch" in out and "TP=2 plan" in out


def test_hf_export_equals_the_torch_dist_export(legacy_ckpt, megatron_ckpt, tmp_path) -> None:
    name = "legacy_qkv_bias_fp32_tp2"
    base = LEGACY_VARIANTS[name].base
    for src, out in ((legacy_ckpt(name), tmp_path / "lg"), (megatron_ckpt(base), tmp_path / "td")):
        assert cli(["export", str(src), str(out), "--format", "hf"]) == 0
    lg, td = (
        sorted((tmp_path / "lg").glob("*.safetensors")),
        sorted((tmp_path / "td").glob("*.safetensors")),
    )
    tensors = {}
    for tag, shards in (("lg", lg), ("td", td)):
        for shard in shards:
            with safe_open(str(shard), "pt") as f:
                tensors.update({(tag, k): f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    names = {k for t, k in tensors if t == "td"}
    assert (
        names == {k for t, k in tensors if t == "lg"}
        and "model.layers.0.self_attn.q_proj.bias" in names
    )
    for k in names:
        assert torch.equal(tensors[("lg", k)], tensors[("td", k)]), k


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def _rewrite(path: Path, edit) -> None:  # noqa: ANN001
    state = torch.load(path, weights_only=False)  # our own fixture file, trusted
    edit(state)
    torch.save(state, path)


def _copy(src: Path, tmp_path: Path) -> Path:
    dest = tmp_path / src.name
    shutil.copytree(src, dest)
    return dest


def test_non_mcore_language_model_checkpoint_is_named_and_refused(legacy_ckpt, tmp_path) -> None:
    root = _copy(legacy_ckpt("legacy_fp32_tp1"), tmp_path)
    path = root / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"

    def to_language_model(state: dict) -> None:
        old = state.pop("model")
        encoder = {
            k.removeprefix("decoder.")
            .replace("linear_qkv", "query_key_value")
            .replace("linear_fc1", "dense_h_to_4h"): v
            for k, v in old.items()
            if k.startswith("decoder.")
        }
        state["model"] = {"language_model": {"embedding": {"word_embeddings": {
            "weight": old["embedding.word_embeddings.weight"]}}, "encoder": encoder}}  # fmt: skip

    _rewrite(path, to_language_model)
    with pytest.raises(UnsupportedCheckpointError) as err:
        MegatronCheckpoint(root)
    msg = str(err.value)
    assert str(path) in msg and "'model.language_model." in msg and "non-mcore" in msg


def test_old_checkpoint_version_is_refused(legacy_ckpt, tmp_path) -> None:
    root = _copy(legacy_ckpt("legacy_fp32_tp1"), tmp_path)
    path = root / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    _rewrite(path, lambda s: s.update(checkpoint_version=1.0))
    with pytest.raises(UnsupportedCheckpointError, match=r"checkpoint_version is 1\.0; versions"):
        MegatronCheckpoint(root)


def test_missing_rank_folder_is_named(legacy_ckpt, tmp_path) -> None:
    root = _copy(legacy_ckpt("legacy_fp32_tp2pp2"), tmp_path)
    shutil.rmtree(root / "iter_0000010" / "mp_rank_01_001")
    with pytest.raises(IncompleteCheckpointError, match=r"but mp_rank_01_001 is missing"):
        MegatronCheckpoint(root)


def test_rank_files_that_disagree_are_refused(legacy_ckpt, tmp_path) -> None:
    root = _copy(legacy_ckpt("legacy_fp32_tp2"), tmp_path)
    path = root / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt"
    key = "decoder.layers.1.mlp.linear_fc2.weight"
    _rewrite(path, lambda s: s["model"].update({key: s["model"][key][:, :-1].contiguous()}))
    with pytest.raises(CorruptCheckpointError, match=rf"mp_rank_01/.*'{key}' is .*on TP rank 1"):
        MegatronCheckpoint(root)
