"""Reader room on real megatron-core checkpoints: locating, metadata, safe pickles, slices."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from sglang_megatron_loader.checkpoint import MegatronCheckpoint, resolve
from sglang_megatron_loader.checkpoint.dcp import DcpCheckpoint
from sglang_megatron_loader.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsafePickleError,
)

QKV = "decoder.layers.self_attention.linear_qkv.weight"


def dcp_reference(iter_dir: Path, key: str, info) -> torch.Tensor:
    """Independent path: PyTorch's own DCP loader (no process group)."""
    out = {key: torch.empty(info.shape, dtype=info.dtype)}
    dcp.load(out, storage_reader=dcp.FileSystemReader(str(iter_dir)), no_dist=True)
    return out[key]


@pytest.mark.parametrize("variant", ["fp32_tp1", "fp32_tp2", "fp32_pp2", "bf16_tp1"])
def test_every_model_tensor_reads_equal_to_torch_dcp(megatron_ckpt, variant: str) -> None:
    with MegatronCheckpoint(megatron_ckpt(variant)) as ckpt:
        model_keys = [k for k in ckpt.tensors if not k.startswith("optimizer")]
        assert QKV in model_keys
        for key in model_keys:
            info = ckpt.tensors[key]
            full = ckpt.dcp.read_slice(key, tuple((0, s) for s in info.shape))
            assert torch.equal(full, dcp_reference(ckpt.location.iter_dir, key, info)), key


def test_tp2_checkpoint_has_split_chunks_and_slices_read_only_their_bytes(megatron_ckpt) -> None:
    with MegatronCheckpoint(megatron_ckpt("fp32_tp2")) as ckpt:
        info = ckpt.tensors[QKV]
        assert len(info.chunks) == info.shape[0] * 2  # one per layer per training TP rank
        rows = info.shape[1]
        before = ckpt.dcp.stats.bytes_read
        part = ckpt.dcp.read_slice(QKV, ((1, 2), (0, rows // 4), (0, info.shape[2])))
        assert ckpt.dcp.stats.bytes_read - before == part.numel() * 4
        full = dcp_reference(ckpt.location.iter_dir, QKV, info)
        assert torch.equal(part, full[1:2, : rows // 4])
        # a slice straddling the two training ranks' chunks
        mid = ckpt.dcp.read_slice(QKV, ((0, 1), (rows // 2 - 3, rows // 2 + 5), (2, 7)))
        assert torch.equal(mid, full[0:1, rows // 2 - 3 : rows // 2 + 5, 2:7])


def test_args_come_from_the_common_state(megatron_ckpt) -> None:
    with MegatronCheckpoint(megatron_ckpt("fp32_tp1")) as ckpt:
        assert ckpt.args.num_layers == ckpt.tensors[QKV].shape[0]
        assert ckpt.common["iteration"] == ckpt.location.iteration == 10
        assert ckpt.args.normalization == "RMSNorm"


def test_run_root_iter_dir_and_release_all_resolve(ckpt_copy) -> None:
    root = ckpt_copy("fp32_tp1")
    iter_dir = root / "iter_0000010"
    assert resolve(root).iter_dir == iter_dir
    assert resolve(iter_dir).iteration == 10
    iter_dir.rename(root / "release")
    (root / "latest_checkpointed_iteration.txt").write_text("release\n")
    loc = resolve(root)
    assert loc.iter_dir == root / "release" and loc.iteration is None


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (
            lambda r: (r / "iter_0000010" / "metadata.json").unlink(),
            IncompleteCheckpointError,
            "no metadata.json.*save is incomplete",
        ),
        (
            lambda r: (r / "latest_checkpointed_iteration.txt").write_text("20"),
            CheckpointNotFoundError,
            "names iteration '20' but .*iter_0000020 does not exist",
        ),
        (
            lambda r: (r / "latest_checkpointed_iteration.txt").write_text("banana"),
            CorruptCheckpointError,
            "expected an iteration number or 'release', found 'banana'",
        ),
    ],
)
def test_broken_layouts_get_clear_errors(ckpt_copy, damage: Callable, error, match: str) -> None:
    root = ckpt_copy("fp32_tp1")
    damage(root)
    with pytest.raises(error, match=match):
        MegatronCheckpoint(root)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        resolve(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CheckpointNotFoundError, match="is a file"):
        resolve(tmp_path / "f.txt")
    with pytest.raises(CheckpointNotFoundError, match="not a Megatron checkpoint"):
        resolve(tmp_path)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_hostile_metadata_pickle_is_refused_and_never_runs(ckpt_copy, tmp_path: Path) -> None:
    root = ckpt_copy("fp32_tp1")
    marker = tmp_path / "pwned"
    (root / "iter_0000010" / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(
        UnsafePickleError, match=r"\.metadata: refusing to unpickle global 'pathlib"
    ):
        MegatronCheckpoint(root)
    assert not marker.exists()


def test_truncated_data_file_names_file_and_sizes(ckpt_copy) -> None:
    root = ckpt_copy("fp32_tp1")
    iter_dir = root / "iter_0000010"
    ckpt = DcpCheckpoint(iter_dir)
    info = ckpt.tensors[QKV]
    data = iter_dir / info.chunks[-1].relative_path
    with open(data, "r+b") as f:
        f.truncate(info.chunks[-1].offset + 10)
    with pytest.raises(CorruptCheckpointError, match=r"\.distcp.*truncated"):
        ckpt.read_slice(QKV, tuple((0, s) for s in info.shape))


def test_metadata_json_with_other_backend_is_refused(ckpt_copy) -> None:
    root = ckpt_copy("fp32_tp1")
    (root / "iter_0000010" / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(Exception, match="sharded_backend is 'zarr'"):
        resolve(root)


GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"


@pytest.mark.parametrize(
    "where",
    ["no_tokenizer_bf16_tp2", "bf16_fp32norms_tp1", "moe_mixtral_fp32_tp2ep2", "mcore_0.14.0",
     "mcore_0.19.2", "torch_2.15", "bridge_0.6.2"],
)  # fmt: skip
def test_the_fast_chunk_locator_agrees_with_zipfile_on_every_chunk(megatron_ckpt, where) -> None:
    """Every chunk of checkpoints written by several megatron-core, torch and Megatron-Bridge
    versions takes the fast path, and it finds what the full zip parse finds."""
    from sglang_megatron_loader.checkpoint.torchzip import TorchZip, _fast_locate

    root = GOLDEN / where if (GOLDEN / where).is_dir() else megatron_ckpt(where)
    folders = sorted({m.parent for m in root.rglob(".metadata")})
    assert folders
    seen = 0
    for folder in folders:
        with DcpCheckpoint(folder) as ckpt:
            tensors = ckpt.tensors
        for key, info in tensors.items():
            for chunk in info.chunks:
                with open(folder / chunk.relative_path, "rb") as f:
                    full = TorchZip(f, chunk.offset, chunk.length, source=key).locate()
                    fast = _fast_locate(f.fileno(), chunk.offset, chunk.length, key)
                assert fast == full, (folder, key, chunk.offsets)
                seen += 1
    assert seen > 10


def test_locating_a_chunk_reads_none_of_its_tensor_bytes(megatron_ckpt, monkeypatch) -> None:
    """The locator's reads (end records, central directory, pickle) stop short of the storage:
    a rank reads every tensor byte once, as data (tiny tensors included)."""
    from sglang_megatron_loader.checkpoint.torchzip import _fast_locate

    folder = next(megatron_ckpt("no_tokenizer_bf16_tp2").rglob(".metadata")).parent
    with DcpCheckpoint(folder) as ckpt:
        tensors = ckpt.tensors
    spans: list[tuple[int, int]] = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        spans.append((offset, offset + n))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    checked = 0
    for info in tensors.values():
        for chunk in info.chunks:
            spans.clear()
            with open(folder / chunk.relative_path, "rb") as f:
                ref = _fast_locate(f.fileno(), chunk.offset, chunk.length, info.key)
            assert ref is not None, info.key
            lo = ref.storage.file_offset
            hi = lo + ref.storage.nbytes
            assert not [s for s in spans if s[0] < hi and lo < s[1]], (info.key, spans, (lo, hi))
            checked += 1
    assert checked > 10


def test_a_damaged_chunk_falls_back_to_the_full_parse_and_its_error(ckpt_copy) -> None:
    """Damage the fast path does not expect is reported by the full parse, naming the file."""
    from sglang_megatron_loader.checkpoint.torchzip import _fast_locate, locate_tensor

    folder = next(ckpt_copy("no_tokenizer_bf16_tp2").rglob(".metadata")).parent
    with DcpCheckpoint(folder) as ckpt:
        chunk = ckpt.tensors["embedding.word_embeddings.weight"].chunks[0]
    path = folder / chunk.relative_path
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), b"\0\0\0\0", chunk.offset + chunk.length - 22)  # the EOCD magic
        assert _fast_locate(f.fileno(), chunk.offset, chunk.length, "x") is None
        with pytest.raises(CorruptCheckpointError, match="torch.save zip archive"):
            locate_tensor(f, chunk.offset, chunk.length, source=str(path))
