"""DCP ``.metadata`` read into inert stand-ins, not the installed torch's dataclasses.

The golden copy ``torch_2.15/bf16_tp2`` was saved by megatron-core 0.19.2 under torch 2.15, whose
``TensorProperties`` pickles a sixth value (``strides``) that torch 2.14 cannot unpickle. It must
load and reproduce Megatron's logits; every other golden copy must parse to exactly what torch's
own classes hold; and a file whose new fields would change what the bytes mean must be refused by
name as from a newer torch, never called corrupt.
"""

from __future__ import annotations

import pickle
import re
import shutil
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_golden as golden
import torch
from torch.distributed.checkpoint import metadata as torch_meta

from sglang_megatron_loader.checkpoint import DcpCheckpoint, MegatronCheckpoint
from sglang_megatron_loader.checkpoint.dcp_metadata import parse_dcp_metadata, read_dcp_metadata
from sglang_megatron_loader.checkpoint.dcp_standins import Pickled, unpickle_dcp_metadata
from sglang_megatron_loader.errors import (
    CorruptCheckpointError,
    UnsafePickleError,
    UnsupportedCheckpointError,
)
from sglang_megatron_loader.inspect_ckpt import writer_version

TORCH_215 = golden.GOLDEN / "torch_2.15" / "bf16_tp2"
TORCH_214 = golden.GOLDEN / "mcore_0.16.1" / "bf16_tp2"  # same model and layout, torch 2.14.1
MCORE_COPIES = [r for r in golden.COPIES if r.parent.name.startswith("mcore_")]
EMBED = "embedding.word_embeddings.weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
NEWER = r", written by a newer torch .*\(DCP metadata version 1\.0\.0.*\); refused rather"


def _meta_path(root: Path) -> Path:
    return root / "iter_0000010" / ".metadata"


def _torch_objects(path: Path) -> torch_meta.Metadata:
    """``.metadata`` unpickled into torch's own classes (a committed fixture: trusted); megatron
    <= 0.15 classes mapped as megatron-core does not need to be installed."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if module == "megatron.core.dist_checkpointing.strategies.torch":
                return torch_meta.Metadata if name == "MCoreMetadata" else types.SimpleNamespace
            return super().find_class(module, name)

    with open(path, "rb") as f:
        return Unpickler(f).load()


@pytest.fixture
def torch_215_pickling(monkeypatch) -> Iterator[None]:
    """torch 2.15's ``TensorProperties`` pickling (a sixth value, ``strides``) on this torch;
    a seventh (``later``) when set, as a later torch could add."""
    cls = torch_meta.TensorProperties
    get, put = cls.__getstate__, cls.__setstate__

    def getstate(self):
        state = get(self)[:5] + (getattr(self, "strides", None),)
        return state + (self.later,) if hasattr(self, "later") else state

    def setstate(self, state):
        put(self, tuple(state[:5]))
        self.strides = state[5] if len(state) > 5 else None

    monkeypatch.setattr(cls, "__getstate__", getstate)
    monkeypatch.setattr(cls, "__setstate__", setstate)
    yield


# -- the torch 2.15 copy -----------------------------------------------------------------------
@pytest.mark.skipif(torch.__version__ >= "2.15", reason="this torch reads 2.15 metadata itself")
def test_this_torch_cannot_unpickle_the_torch_2_15_copy_itself() -> None:
    """Why the reader exists: torch 2.14's own classes fail on the file."""
    with pytest.raises(ValueError, match=r"too many values to unpack \(expected 5\)"):
        _torch_objects(_meta_path(TORCH_215))


def test_torch_2_15_copy_parses_with_its_strides() -> None:
    meta = read_dcp_metadata(_meta_path(TORCH_215))
    assert meta.version == "1.0.0" and meta.records_strides  # the version did not change
    assert meta.tensors[EMBED].strides == (64, 1)  # a chunk's strides (128, 64 per TP rank)
    assert meta.tensors["decoder.final_layernorm.weight"].strides == (1,)
    assert meta.tensors[QKV].strides is None  # megatron-core's stacked layers record none
    assert not read_dcp_metadata(_meta_path(TORCH_214)).records_strides


def test_torch_2_15_copy_has_the_entries_of_the_same_save_under_torch_2_14() -> None:
    """Same model, layout and dtype saved under torch 2.14 (megatron-core 0.16.1): the same
    tensors, dtypes, sizes and chunks; only where the bytes sit differs."""
    new, old = read_dcp_metadata(_meta_path(TORCH_215)), read_dcp_metadata(_meta_path(TORCH_214))
    assert new.tensors.keys() == old.tensors.keys()
    for key, t in new.tensors.items():
        o = old.tensors[key]
        assert (t.dtype, t.size, set(t.chunks)) == (o.dtype, o.size, set(o.chunks)), key


@pytest.mark.parametrize("tp", [1, 2])
def test_torch_2_15_copy_reproduces_megatron_logits(tp: int) -> None:
    assert TORCH_215 in golden.COPIES
    golden.test_loaded_weights_reproduce_megatron_logits(TORCH_215, tp)
    with MegatronCheckpoint(TORCH_215) as ckpt:
        assert "DCP metadata of torch >= 2.15" in writer_version(ckpt)


# -- every golden copy: the same as torch's own unpickling -------------------------------------
@pytest.mark.parametrize("root", MCORE_COPIES, ids=golden._id)
def test_reader_agrees_with_torchs_own_classes(root: Path) -> None:
    path = _meta_path(root)
    ours, theirs = read_dcp_metadata(path), _torch_objects(path)
    tensors = {}
    for key, md in theirs.state_dict_metadata.items():
        if isinstance(md, torch_meta.TensorStorageMetadata):
            chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks]
            tensors[key] = (md.properties.dtype, tuple(md.size), chunks)
    assert {
        k: (t.dtype, t.size, [(c.offsets, c.sizes) for c in t.chunks])
        for k, t in ours.tensors.items()
    } == tensors
    assert set(ours.bytes_items) == set(theirs.state_dict_metadata) - set(tensors)
    assert {k: (r.relative_path, r.offset, r.length) for k, r in ours.storage.items()} == {
        (i.fqn, () if i.offset is None else tuple(i.offset)): (s.relative_path, s.offset, s.length)
        for i, s in theirs.storage_data.items()
    }
    assert ours.version == theirs.version and not ours.records_strides


def test_parsed_metadata_is_reused_without_reading_the_file_again(tmp_path: Path) -> None:
    root = _copy(TORCH_215, tmp_path)
    path = _meta_path(root)
    parsed = parse_dcp_metadata(path.read_bytes(), source=str(path))
    path.unlink()
    with DcpCheckpoint(path.parent, parsed) as dcp:
        assert dcp.metadata is parsed and dcp.tensors[EMBED].shape == (256, 64)
        assert dcp.read_slice(EMBED, ((0, 2), (0, 64))).dtype == torch.bfloat16
    with pytest.raises(TypeError):
        parsed.tensors["x"] = None  # type: ignore[index]  # shared: read-only


# -- newer fields: understood, ignored or refused by name --------------------------------------
def _copy(root: Path, tmp_path: Path) -> Path:
    dest = tmp_path / root.name
    shutil.copytree(root, dest)
    return dest


def _damage(tmp_path: Path, edit) -> Path:
    """The torch 2.15 copy with ``edit`` applied to its torch objects, pickled as torch 2.15."""
    root = _copy(TORCH_215, tmp_path)
    path = _meta_path(root)
    meta = _torch_objects(path)
    edit(meta)
    path.write_bytes(pickle.dumps(meta))
    return path


def _strides(key: str, value):
    def edit(meta):
        meta.state_dict_metadata[key].properties.strides = value

    return edit


def _chunk_field(name: str, value):
    def edit(meta):
        setattr(meta.state_dict_metadata[QKV].chunks[0], name, value)

    return edit


def _storage_field(name: str, value):
    def edit(meta):
        setattr(next(iter(meta.storage_data.values())), name, value)

    return edit


def _properties_value(value):
    """A seventh pickled ``TensorProperties`` value (see ``torch_215_pickling``)."""

    def edit(meta):
        meta.state_dict_metadata[QKV].properties.later = value

    return edit


ACCEPTED = {
    "contiguous strides of the global size": _strides("decoder.final_layernorm.weight", (1,)),
    "strides None": _strides(EMBED, None),
    "size-1 dims' strides are free": _strides(QKV, (12345, 64, 1)),
    "unknown field left unset": _chunk_field("checksum", None),
    "per-chunk contiguous strides": _chunk_field("strides", (8192, 64, 1)),
    "new Metadata field (not about bytes)": lambda m: setattr(m, "extensions", {"zstd": 1}),
    "seventh TensorProperties value unset": _properties_value(None),
}

REFUSED = {
    "transposed strides": (
        _strides(EMBED, (1, 256)),
        r"'embedding\.word_embeddings\.weight': TensorProperties\.strides = \(1, 256\): not the "
        r"contiguous strides of its size \(256, 64\)",
    ),
    "strides fitting neither the tensor nor a chunk": (
        _strides(QKV, (4096, 32, 1)),
        r"TensorProperties\.strides = \(4096, 32, 1\)",
    ),
    "non-contiguous per-chunk strides": (
        _chunk_field("strides", (64, 1, 4096)),
        r"ChunkStorageMetadata\.strides = \(64, 1, 4096\)",
    ),
    "unknown chunk field set": (
        _chunk_field("storage_order", "F"),
        r"'decoder\.layers\.self_attention\.linear_qkv\.weight': ChunkStorageMetadata\."
        r"storage_order = 'F'",
    ),
    "unknown storage entry field set": (
        _storage_field("encoding", "zstd"),
        r"_StorageInfo\.encoding = 'zstd'",
    ),
    "seventh TensorProperties value set": (
        _properties_value("fp8-scaled"),
        r"TensorProperties\[6\] = 'fp8-scaled'",
    ),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_newer_fields_that_keep_the_bytes_meaning_are_accepted(
    tmp_path, torch_215_pickling, case
) -> None:
    meta = read_dcp_metadata(_damage(tmp_path, ACCEPTED[case]))
    assert meta.tensors[QKV].size == (2, 128, 64) and len(meta.tensors[QKV].chunks) == 4


@pytest.mark.parametrize("case", list(REFUSED))
def test_newer_fields_that_may_change_the_bytes_are_refused_by_name(
    tmp_path, torch_215_pickling, case
) -> None:
    edit, field = REFUSED[case]
    path = _damage(tmp_path, edit)
    with pytest.raises(UnsupportedCheckpointError) as err:
        MegatronCheckpoint(path.parents[1])
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "corrupt" not in message.lower(), message
    assert re.search(field + r".*" + NEWER, message), message


def test_storage_transforms_are_refused_as_unsupported(tmp_path, torch_215_pickling) -> None:
    path = _damage(tmp_path, _storage_field("transform_descriptors", ["zstd/1"]))
    with pytest.raises(UnsupportedCheckpointError, match=r"is stored with transforms \['zstd/1'\]"):
        read_dcp_metadata(path)


# -- what stays corrupt or hostile -------------------------------------------------------------
@pytest.mark.parametrize("cut", [0.5, 0.9, 1 / 64])
def test_truncated_metadata_is_corrupt_naming_the_file(cut: float) -> None:
    data = _meta_path(TORCH_215).read_bytes()
    with pytest.raises(
        CorruptCheckpointError, match=r"^/x/\.metadata: cannot unpickle .*truncated"
    ):
        parse_dcp_metadata(data[: int(len(data) * cut)], source="/x/.metadata")


def test_wrong_field_types_are_corrupt(tmp_path, torch_215_pickling) -> None:
    path = _damage(tmp_path, _chunk_field("sizes", "64x64"))
    with pytest.raises(
        CorruptCheckpointError, match=r"chunk of '.*linear_qkv\.weight' has offsets"
    ):
        read_dcp_metadata(path)


def test_unknown_dcp_class_is_refused_as_not_on_the_allow_list() -> None:
    data = b"\x80\x04ctorch.distributed.checkpoint.metadata\nNewStorageMetadata\n)\x81."
    with pytest.raises(UnsafePickleError, match=r"NewStorageMetadata': a torch\.distributed"):
        parse_dcp_metadata(data, source="x/.metadata")


def test_stand_ins_take_every_form_of_pickled_state() -> None:
    """dict BUILD, (dict, slots) BUILD, tuple state, constructor arguments: fields by name."""
    record: Pickled = _load_standin(pickle.dumps(torch_meta.ChunkStorageMetadata((0,), (4,))))
    assert record.fields == {"offsets": (0,), "sizes": (4,)}
    record = _load_standin(_with_state(({"offsets": (1,)}, {"strides": (1,)})))
    assert record.fields == {"offsets": (1,), "strides": (1,)}
    props = _load_standin(pickle.dumps(torch_meta.TensorProperties(dtype=torch.bfloat16)))
    assert props.fields["dtype"] is torch.bfloat16 and props.fields["pin_memory"] is False
    enum = _load_standin(pickle.dumps(torch_meta._MEM_FORMAT_ENCODING(1)))
    assert enum.fields == {"value": 1}  # pickled as a call: _MEM_FORMAT_ENCODING(1)


def _with_state(state: tuple[dict, dict]) -> bytes:
    """A pickled ChunkStorageMetadata whose BUILD state is ``state`` (a dataclass with slots)."""
    body = pickle.dumps(state, protocol=2)[2:-1]
    return (
        b"\x80\x02ctorch.distributed.checkpoint.metadata\nChunkStorageMetadata\n)\x81"
        + body
        + b"b."
    )


def test_pickled_fields_cannot_shadow_the_stand_ins_settings(tmp_path, torch_215_pickling) -> None:
    """Fields named like a stand-in's settings (``strict``, ``known``) are only fields: an
    unknown field beside them is still refused by name."""

    def edit(meta):
        chunk = meta.state_dict_metadata[QKV].chunks[0]
        chunk.strict, chunk.known, chunk.later = False, frozenset({"later"}), 1

    with pytest.raises(UnsupportedCheckpointError, match=r"ChunkStorageMetadata\.known = "):
        read_dcp_metadata(_damage(tmp_path, edit))


def _load_standin(data: bytes) -> Pickled:
    obj, names = unpickle_dcp_metadata(data, source="x")
    assert isinstance(obj, Pickled) and obj.qualname in names
    return obj
