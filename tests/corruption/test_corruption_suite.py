"""Broken checkpoints get a clear error, never a wrong model: one table of damages, each applied to
a private copy of a real megatron-core checkpoint and loaded the way ``--load-format megatron``
does (open, config from args, dims, plan, read every slice into empty tensors).

The table is the source of truth; ``CASES.md`` beside it lists every case with its pattern and
the message the package actually produced (regenerate with ``python write_cases.py``).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import ckpt_damage as dmg
import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

from sglang_megatron_loader.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    MegatronLoaderError,
    ShardingError,
    UnsafePickleError,
    UnsupportedCheckpointError,
    WeightMismatchError,
)
from sglang_megatron_loader.models.rules import Tp

HERE = Path(__file__).parent
PROJ = "decoder.layers.self_attention.linear_proj.weight"
GATE_UP_0 = ("model.layers.0.mlp.gate_up_proj.weight",)


@dataclasses.dataclass(frozen=True)
class Case:
    """One way a checkpoint breaks, and the error a user must see."""

    name: str
    what: str  # the damage, in words (CASES.md)
    damage: Callable[[Path], Path | None]  # run root of a private copy -> path to load (or root)
    error: type[MegatronLoaderError]
    match: str  # regex the message must match (re.search)
    fixture: str = "fp32_tp1"
    tp: Tp = dmg.TP1
    params: tuple[str, ...] | None = None  # planned parameters (default: the whole model)


# -- damages -----------------------------------------------------------------------------------
def _it(root: Path) -> Path:
    return dmg.iter_dir(root)


def _meta_edit(edit: Callable) -> Callable[[Path], None]:
    """Edit the real ``Metadata`` object and write it back."""

    def damage(root: Path) -> None:
        meta = dmg.read_metadata(root)
        edit(meta)
        dmg.write_metadata(root, meta)

    return damage


def _chunk_bytes(root: Path, key: str = dmg.QKV, nth: int = 1) -> tuple[Path, int, int]:
    meta = dmg.read_metadata(root)
    info = meta.storage_data[dmg.storage_index(meta, key, nth)]
    return _it(root) / info.relative_path, info.offset, info.length


def _overwrite_chunk(where: Callable[[int, int, bytes], tuple[int, bytes]]) -> Callable:
    def damage(root: Path) -> None:
        path, offset, length = _chunk_bytes(root)
        chunk = path.read_bytes()[offset : offset + length]
        at, data = where(offset, length, chunk)
        dmg.overwrite(path, at, data)

    return damage


def _data_pkl(offset: int, length: int, chunk: bytes) -> tuple[int, bytes]:
    at = chunk.index(b"data.pkl") + 40  # inside the pickle, past the local header
    return offset + at, b"\xff" * 16


def _drop_key(key: str) -> Callable[[Path], None]:
    return _meta_edit(lambda m: m.state_dict_metadata.pop(key))


def _add_alias(meta, new: str, old: str = dmg.FINAL_NORM) -> None:
    """``new`` described like ``old`` and pointing at ``old``'s stored chunk."""
    meta.state_dict_metadata[new] = meta.state_dict_metadata[old]
    idx = dmg.storage_index(meta, old)
    meta.storage_data[MetadataIndex(new, idx.offset)] = meta.storage_data[idx]


def _set_dtype(meta) -> None:
    meta.state_dict_metadata[dmg.QKV].properties.dtype = torch.bfloat16


def _shrink_size(meta) -> None:
    meta.state_dict_metadata[dmg.QKV].size = torch.Size([4, 96, 64])


def _drop_storage(meta) -> None:
    del meta.storage_data[dmg.storage_index(meta, dmg.QKV, 2)]


def _drop_chunk(meta) -> None:
    del meta.state_dict_metadata[dmg.QKV].chunks[2]


def _collide_chunks(meta) -> None:
    """fp32_tp2: layer 0's second input-dim half of linear_proj claims the first half's place."""
    chunks = meta.state_dict_metadata[PROJ].chunks
    i = next(i for i, c in enumerate(chunks) if tuple(c.offsets) == (0, 0, 32))
    chunks[i] = dataclasses.replace(chunks[i], offsets=torch.Size([0, 0, 0]))


def _escape_folder(meta) -> None:
    idx = dmg.storage_index(meta, dmg.COMMON)
    meta.storage_data[idx] = dataclasses.replace(
        meta.storage_data[idx], relative_path="../../../../etc/passwd", offset=0
    )


def _shift_offset(meta) -> None:
    idx = dmg.storage_index(meta, dmg.QKV, 1)
    meta.storage_data[idx] = dataclasses.replace(
        meta.storage_data[idx], offset=meta.storage_data[idx].offset + 7
    )


def _truncate_to(fraction: float | None = None, size: int | None = None) -> Callable:
    def damage(root: Path) -> None:
        path = dmg.data_file(root)
        dmg.truncate(path, size if size is not None else int(path.stat().st_size * fraction))

    return damage


def _write(rel: str, data: str | bytes) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        target = _it(root) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            target.write_bytes(data)
        else:
            target.write_text(data)

    return damage


def _unlink(rel: str) -> Callable[[Path], None]:
    return lambda root: (_it(root) / rel).unlink()


def _tracker(text: str) -> Callable[[Path], None]:
    return lambda root: (root / "latest_checkpointed_iteration.txt").write_text(text)


def _legacy_format(root: Path) -> None:
    it = _it(root)
    for child in it.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    (it / "mp_rank_00").mkdir()
    torch.save({"model": {}}, it / "mp_rank_00" / "model_optim_rng.pt")


def _empty_iter(root: Path) -> Path:
    it = _it(root)
    shutil.rmtree(it)
    it.mkdir()
    return it


def _empty_folder(root: Path) -> Path:
    shutil.rmtree(root)
    root.mkdir()
    return root


def _a_file(root: Path) -> Path:
    return _it(root) / "metadata.json"


def _truncate_metadata(root: Path) -> None:
    path = _it(root) / ".metadata"
    dmg.truncate(path, path.stat().st_size // 2)


def _args(drop: tuple[str, ...] = (), **changes: object) -> Callable[[Path], None]:
    return lambda root: dmg.write_common_pt(root, drop, **changes) and None


def _common_without_args(root: Path) -> None:
    state = dmg.common_state(root)
    del state["args"]
    dmg.append_and_repoint(root, dmg.COMMON, dmg.torch_save_bytes([state]))


def _common_garbage(root: Path) -> None:
    path, offset, length = _common_range(root)
    dmg.overwrite(path, offset + length // 2, b"\0" * 64)


def _common_range(root: Path) -> tuple[Path, int, int]:
    meta = dmg.read_metadata(root)
    info = meta.storage_data[dmg.storage_index(meta, dmg.COMMON)]
    return _it(root) / info.relative_path, info.offset, info.length


def _chunk_payload(obj: object) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        dmg.append_and_repoint(root, dmg.QKV, dmg.torch_save_bytes(obj), nth=1)

    return damage


def _with_manifest(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """An integrity.json of the intact files (megatron-core 0.18+ --verify-integrity), then
    ``damage``."""

    def both(root: Path) -> None:
        dmg.write_integrity_manifest(root)
        damage(root)

    return both


def _nowhere(root: Path) -> Path:
    return root.parent / "no_such_checkpoint"


_CHUNK = rf"__0_0\.distcp \(key '{dmg.QKV}', chunk at \(1, 0, 0\)\): "
_META = r"iter_0000010/\.metadata: "

CASES: list[Case] = [
    # -- where is the checkpoint ---------------------------------------------------------------
    Case(
        "path_does_not_exist",
        "--model-path names nothing",
        _nowhere,
        CheckpointNotFoundError,
        r"no_such_checkpoint: no such file or directory",
    ),
    Case(
        "path_is_a_file",
        "--model-path names a file (metadata.json)",
        _a_file,
        CheckpointNotFoundError,
        r"metadata\.json: is a file; pass the Megatron run folder",
    ),
    Case(
        "empty_folder",
        "the run folder is empty",
        _empty_folder,
        CheckpointNotFoundError,
        r"fp32_tp1: not a Megatron checkpoint: no latest_checkpointed_iteration\.txt and not an "
        r"iter_\* folder",
    ),
    Case(
        "empty_iteration_folder",
        "iter_0000010/ exists but is empty",
        _empty_iter,
        CheckpointNotFoundError,
        r"iter_0000010: the folder is empty",
    ),
    Case(
        "tracker_names_missing_iteration",
        "latest_checkpointed_iteration.txt says 20, no iter_0000020/",
        _tracker("20"),
        CheckpointNotFoundError,
        r"latest_checkpointed_iteration\.txt names iteration '20' but "
        r".*iter_0000020 does not exist",
    ),
    Case(
        "tracker_garbage",
        "latest_checkpointed_iteration.txt holds 'banana'",
        _tracker("banana"),
        CorruptCheckpointError,
        r"latest_checkpointed_iteration\.txt: expected an iteration number or 'release', "
        r"found 'banana'",
    ),
    Case(
        "tracker_non_ascii_digit",
        "latest_checkpointed_iteration.txt holds '²' (a digit to str.isdigit, not to int)",
        _tracker("²"),
        CorruptCheckpointError,
        r"expected an iteration number or 'release', found '²'",
    ),
    # -- which format, complete or not ---------------------------------------------------------
    Case(
        "mid_save_no_metadata_json",
        "metadata.json missing (Megatron writes it last: save running or crashed)",
        _unlink("metadata.json"),
        IncompleteCheckpointError,
        r"iter_0000010: has DCP data but no metadata\.json.*the save is incomplete",
    ),
    Case(
        "metadata_json_not_json",
        "metadata.json holds '{not json'",
        _write("metadata.json", "{not json"),
        CorruptCheckpointError,
        r"metadata\.json: not valid JSON",
    ),
    Case(
        "metadata_json_other_backend",
        "metadata.json says sharded_backend 'zarr'",
        _write("metadata.json", json.dumps({"sharded_backend": "zarr"})),
        UnsupportedCheckpointError,
        r"metadata\.json: sharded_backend is 'zarr'; only 'torch_dist' is supported",
    ),
    Case(
        "legacy_torch_format_without_args",
        "iter folder holds only mp_rank_00/model_optim_rng.pt = {'model': {}} (no args)",
        _legacy_format,
        CorruptCheckpointError,
        r"mp_rank_00/model_optim_rng\.pt: no Megatron 'args'",
    ),
    # -- .metadata -----------------------------------------------------------------------------
    Case(
        "missing_dot_metadata",
        ".metadata deleted (metadata.json present)",
        _unlink(".metadata"),
        IncompleteCheckpointError,
        _META + r"missing; the DCP save is incomplete",
    ),
    Case(
        "truncated_dot_metadata",
        ".metadata cut to half its size",
        _truncate_metadata,
        CorruptCheckpointError,
        _META + r"cannot unpickle \(.*\); the file is truncated, damaged or not a pickle",
    ),
    Case(
        "dot_metadata_not_metadata",
        ".metadata is a pickled dict",
        _write(".metadata", pickle.dumps({"a": 1})),
        CorruptCheckpointError,
        _META + r"expected a DCP Metadata object, found dict",
    ),
    Case(
        "hostile_dot_metadata",
        ".metadata is a pickle whose __reduce__ calls os.system",
        _write(".metadata", b"cposix\nsystem\n(S'true'\ntR."),
        UnsafePickleError,
        _META + r"refusing to unpickle global 'posix\.system'",
    ),
    Case(
        "tensor_missing",
        "decoder.final_layernorm.weight removed from .metadata",
        _drop_key(dmg.FINAL_NORM),
        WeightMismatchError,
        r"checkpoint has no tensor for SGLang parameter 'model\.norm\.weight' \(looked for "
        r"'decoder\.final_layernorm\.weight'\)",
    ),
    Case(
        "embedding_missing",
        "embedding.word_embeddings.weight removed from .metadata",
        _drop_key("embedding.word_embeddings.weight"),
        WeightMismatchError,
        r"iter_0000010: checkpoint has no 'embedding\.word_embeddings\.weight'",
    ),
    Case(
        "unknown_extra_tensor",
        "a q_layernorm key added to .metadata (pointing at an existing chunk)",
        _meta_edit(lambda m: _add_alias(m, "decoder.layers.self_attention.q_layernorm.weight")),
        WeightMismatchError,
        r"iter_0000010: checkpoint holds 1 model tensor\(s\) the llama table neither maps nor "
        r"ignores: decoder\.layers\.self_attention\.q_layernorm\.weight",
    ),
    Case(
        "wrong_dtype_in_metadata",
        "linear_qkv.weight's TensorProperties dtype set to bfloat16 (stored fp32)",
        _meta_edit(_set_dtype),
        CorruptCheckpointError,
        r"__0_0\.distcp \(key '.*linear_qkv\.weight', chunk at \(0, 0, 0\)\): expected a "
        r"contiguous torch\.bfloat16 tensor of shape \(1, 128, 64\), found torch\.float32",
    ),
    Case(
        "chunk_beyond_tensor_shape",
        "linear_qkv.weight's global size shrunk to [4, 96, 64]; its chunks are [1, 128, 64]",
        _meta_edit(_shrink_size),
        CorruptCheckpointError,
        _META + r"chunk of '.*linear_qkv\.weight' at offsets \(0, 0, 0\) with sizes "
        r"\(1, 128, 64\) extends beyond the tensor's shape \(4, 96, 64\)",
    ),
    Case(
        "chunk_without_storage_entry",
        "the storage entry of linear_qkv.weight's layer-2 chunk removed",
        _meta_edit(_drop_storage),
        CorruptCheckpointError,
        _META + r"chunk of '.*linear_qkv\.weight' at offsets \(2, 0, 0\) has no storage entry",
    ),
    Case(
        "chunk_missing",
        "linear_qkv.weight's layer-2 chunk removed from the chunk list (a hole)",
        _meta_edit(_drop_chunk),
        CorruptCheckpointError,
        _META + r"chunks of '.*linear_qkv\.weight' cover 0 of the \d+ elements of region "
        r"\(\(2, 3\), .*the metadata is damaged",
    ),
    Case(
        "chunks_overlap",
        "fp32_tp2: linear_proj's chunk at (0, 0, 32) re-labelled (0, 0, 0): count still right",
        _meta_edit(_collide_chunks),
        CorruptCheckpointError,
        _META + r"chunks of '.*linear_proj\.weight' at offsets \(0, 0, 0\) and \(0, 0, 0\) "
        r"overlap",
        fixture="fp32_tp2",
    ),
    Case(
        "storage_path_escapes_folder",
        "common_state's relative_path set to ../../../../etc/passwd",
        _meta_edit(_escape_folder),
        CorruptCheckpointError,
        _META + r"'common_state/shard_0_1' is stored in '\.\./\.\./\.\./\.\./etc/passwd'; "
        r"expected a data file inside the checkpoint folder",
    ),
    Case(
        "storage_offset_shifted",
        "a chunk's byte offset in .metadata moved by 7 bytes",
        _meta_edit(_shift_offset),
        CorruptCheckpointError,
        _CHUNK + r".*the file is damaged",
    ),
    # -- .distcp data files ---------------------------------------------------------------------
    Case(
        "missing_distcp",
        "__0_0.distcp deleted",
        _unlink("__0_0.distcp"),
        IncompleteCheckpointError,
        r"__0_0\.distcp: data file named in .*\.metadata is missing",
    ),
    Case(
        "truncated_distcp_tail",
        "__0_0.distcp cut to 60% (tensor chunks lost)",
        _truncate_to(fraction=0.6),
        CorruptCheckpointError,
        r"__0_0\.distcp \(key '.*', chunk at .*\): file has \d+ bytes, the metadata places the "
        r"chunk at bytes \d+\.\.\d+; truncated",
    ),
    Case(
        "truncated_distcp_head",
        "__0_0.distcp cut to 10,000 bytes (before the common state)",
        _truncate_to(size=10_000),
        CorruptCheckpointError,
        r"__0_0\.distcp: bytes item 'common_state/shard_0_1' needs bytes \d+\.\.\d+, the file "
        r"has 10000 bytes; truncated",
    ),
    Case(
        "chunk_zip_header_overwritten",
        "first 4 bytes of a chunk's zip (its local header signature) overwritten",
        _overwrite_chunk(lambda off, n, c: (off, b"XXXX")),
        CorruptCheckpointError,
        _CHUNK + r"damaged zip header of 'data\.pkl' \(expected the local header signature "
        r"0x04034b50, found 0x58585858\)",
    ),
    Case(
        "chunk_zip_directory_overwritten",
        "the last 22 bytes of a chunk (zip end-of-directory record) zeroed",
        _overwrite_chunk(lambda off, n, c: (off + n - 22, b"\0" * 22)),
        CorruptCheckpointError,
        _CHUNK + r"expected a torch\.save zip archive of \d+ bytes at offset \d+, found none",
    ),
    Case(
        "chunk_data_pkl_overwritten",
        "16 bytes inside a chunk's data.pkl overwritten",
        _overwrite_chunk(_data_pkl),
        CorruptCheckpointError,
        _CHUNK + r"entry 'data\.pkl' of the torch\.save archive is damaged \(BadZipFile: Bad "
        r"CRC-32",
    ),
    Case(
        "chunk_of_other_dtype",
        "a chunk replaced by a float64 tensor of the same shape",
        _chunk_payload(torch.zeros(1, 128, 64, dtype=torch.float64)),
        CorruptCheckpointError,
        _CHUNK + r"expected a contiguous torch\.float32 tensor of shape \(1, 128, 64\), found "
        r"torch\.float64",
    ),
    Case(
        "chunk_of_other_shape",
        "a chunk replaced by a float32 tensor of shape (1, 64, 64)",
        _chunk_payload(torch.zeros(1, 64, 64)),
        CorruptCheckpointError,
        _CHUNK + r"expected a contiguous torch\.float32 tensor of shape \(1, 128, 64\), found "
        r"torch\.float32 of shape \(1, 64, 64\)",
    ),
    Case(
        "chunk_not_a_tensor",
        "a chunk replaced by torch.save({'x': 1})",
        _chunk_payload({"x": 1}),
        CorruptCheckpointError,
        _CHUNK + r"chunk is not a tensor \(dict\)",
    ),
    Case(
        "hostile_chunk",
        "a chunk replaced by torch.save of an object whose __reduce__ calls exec",
        _chunk_payload(type("E", (), {"__reduce__": lambda s: (exec, ("1",))})()),
        UnsafePickleError,
        _CHUNK + r"refusing to unpickle global 'builtins\.exec'",
    ),
    Case(
        "raw_tensor_bytes_overwritten_with_manifest",
        "64 bytes of a chunk's raw tensor data zeroed after integrity.json was written",
        _with_manifest(_overwrite_chunk(lambda off, n, c: (off + n // 2, b"\0" * 64))),
        CorruptCheckpointError,
        r"integrity\.json: 1 of 3 file\(s\) fail the integrity check:\n  __0_0\.distcp: sha256 ",
    ),
    # -- common state and args -----------------------------------------------------------------
    Case(
        "common_state_overwritten",
        "64 bytes in the middle of the common_state item zeroed",
        _common_garbage,
        CorruptCheckpointError,
        r"__0_0\.distcp \(item 'common_state/shard_0_1', bytes \d+\.\.\d+\): .*damaged",
    ),
    Case(
        "common_state_missing",
        "common_state/shard_0_1 removed from .metadata (and no common.pt)",
        _drop_key(dmg.COMMON),
        CorruptCheckpointError,
        r"iter_0000010: neither common\.pt nor the DCP item 'common_state/shard_0_1' is present",
    ),
    Case(
        "common_state_without_args",
        "common state re-saved without 'args'",
        _common_without_args,
        CorruptCheckpointError,
        r"iter_0000010: no 'args' in the common state \(keys: \['checkpoint_version', .*\) and no "
        r"run_config\.yaml; the model config cannot be derived",
    ),
    Case(
        "common_pt_garbage",
        "a common.pt (<= 0.18 layout, preferred by the reader) holding 7 bytes of text",
        _write("common.pt", b"garbage"),
        CorruptCheckpointError,
        r"common\.pt: expected a torch\.save zip archive of 7 bytes at offset 0, found none",
    ),
    Case(
        "args_num_layers_disagree",
        "common.pt args say num_layers=3, tensors hold 4 layers",
        _args(num_layers=3),
        WeightMismatchError,
        r"iter_0000010: checkpoint tensor '.*layer_norm_weight': stacked layer axis is 4, "
        r"expected num_layers=3 from args",
    ),
    Case(
        "args_hidden_size_disagree",
        "common.pt args say hidden_size=128, tensors are 64 wide",
        _args(hidden_size=128),
        WeightMismatchError,
        r"iter_0000010: checkpoint tensor '.*layer_norm_weight': stored shape \(64,\) does not "
        r"match the config, expected \(128,\)",
    ),
    Case(
        "args_num_attention_heads_disagree",
        "common.pt args say num_attention_heads=8 (kv_channels 16), qkv holds 4 heads",
        _args(num_attention_heads=8),
        WeightMismatchError,
        r"checkpoint tensor '.*linear_qkv\.weight': stored shape \(128, 64\) does not match the "
        r"config, expected \(192, 64\)",
    ),
    Case(
        "args_num_query_groups_disagree",
        "common.pt args say num_query_groups=4, qkv holds 2 groups",
        _args(num_query_groups=4),
        WeightMismatchError,
        r"checkpoint tensor '.*linear_qkv\.weight': stored shape \(128, 64\) does not match the "
        r"config, expected \(192, 64\)",
    ),
    Case(
        "args_ffn_hidden_size_disagree",
        "common.pt args say ffn_hidden_size=128, fc1 holds 2 x 160 rows",
        _args(ffn_hidden_size=128),
        WeightMismatchError,
        r"checkpoint tensor '.*linear_fc1\.weight': stored shape \(320, 64\) does not match the "
        r"config, expected \(256, 64\)",
    ),
    Case(
        "args_vocab_exceeds_rows",
        "common.pt args say vocab_size=300, the embedding holds 256 rows",
        _args(vocab_size=300),
        WeightMismatchError,
        r"iter_0000010: a vocabulary of 300 tokens \(args\.vocab_size\) does not fit the 256 rows "
        r"of 'embedding\.word_embeddings\.weight'",
    ),
    Case(
        "args_missing_num_layers",
        "common.pt args without num_layers",
        _args(drop=("num_layers",)),
        CorruptCheckpointError,
        r"iter_0000010: args lack num_layers; cannot derive the model",
    ),
    Case(
        "args_wrong_type",
        "common.pt args say hidden_size='big'",
        _args(hidden_size="big"),
        CorruptCheckpointError,
        r"iter_0000010: args\.hidden_size is 'big'; expected a positive integer",
    ),
    Case(
        "args_zero_heads",
        "common.pt args say num_attention_heads=0",
        _args(num_attention_heads=0),
        CorruptCheckpointError,
        r"args\.num_attention_heads is 0; expected a positive integer",
    ),
    Case(
        "unsupported_moe_qk_layernorm",
        "common.pt args say num_experts=8, qk_layernorm=True, add_qkv_bias=True",
        _args(num_experts=8, qk_layernorm=True, add_qkv_bias=True),
        UnsupportedCheckpointError,
        r"does not serve:\n  num_experts=8 with add_qkv_bias=True \(mixture of experts with "
        r"qkv bias: .*\n  qk_layernorm=True with add_qkv_bias=True",
    ),
    Case(
        "unsupported_layernorm_interleaved_rope",
        "common.pt args say normalization='LayerNorm', rotary_interleaved=True",
        _args(normalization="LayerNorm", rotary_interleaved=True),
        UnsupportedCheckpointError,
        r"normalization='LayerNorm' \(normalization other than RMSNorm\); served: 'RMSNorm'\n  "
        r"rotary_interleaved=True \(interleaved rotary embedding\); accepted: None or False",
    ),
    Case(
        "math_arg_qk_l2_norm",
        "common.pt args set qk_l2_norm=True (changes the forward, adds no tensor)",
        _args(qk_l2_norm=True),
        UnsupportedCheckpointError,
        r"does not serve:\n  qk_l2_norm=True \(",
    ),
    Case(
        "math_arg_softmax_type",
        "common.pt args set softmax_type=learnable (changes the forward, adds no tensor)",
        _args(softmax_type="learnable"),
        UnsupportedCheckpointError,
        r"does not serve:\n  softmax_type='learnable' \(",
    ),
    Case(
        "math_arg_glu_linear_offset",
        "common.pt args set glu_linear_offset=1.0 (changes the forward, adds no tensor)",
        _args(glu_linear_offset=1.0),
        UnsupportedCheckpointError,
        r"does not serve:\n  glu_linear_offset=1\.0 \(",
    ),
    Case(
        "math_arg_activation_func_clamp_value",
        "common.pt args set activation_func_clamp_value=7.0 (changes the forward, adds no tensor)",
        _args(activation_func_clamp_value=7.0),
        UnsupportedCheckpointError,
        r"does not serve:\n  activation_func_clamp_value=7\.0 \(",
    ),
    Case(
        "math_arg_no_rope_freq",
        "common.pt args set no_rope_freq=4 (changes the forward, adds no tensor)",
        _args(no_rope_freq=4),
        UnsupportedCheckpointError,
        r"does not serve:\n  no_rope_freq=4 \(",
    ),
    # -- target tensor parallelism (planning) --------------------------------------------------
    Case(
        "tp3_does_not_divide_heads",
        "serve 4 heads at --tp-size 3",
        lambda root: None,
        ShardingError,
        r"cannot evenly split num_attention_heads \(size 4\) across 3 TP ranks; choose a "
        r"--tp-size that divides 4",
        tp=Tp(0, 3),
    ),
    Case(
        "tp3_does_not_divide_kv_groups",
        "other_dims (6 heads, 2 KV groups) at --tp-size 3",
        lambda root: None,
        ShardingError,
        r"cannot replicate 2 KV heads \(num_query_groups\) across 3 TP ranks: 3 is not a "
        r"multiple of 2",
        fixture="other_dims",
        tp=Tp(1, 3),
    ),
    Case(
        "tp3_does_not_divide_ffn",
        "gate_up_proj of layer 0 (ffn 160) planned at --tp-size 3 (heads fail first otherwise)",
        lambda root: None,
        ShardingError,
        r"cannot evenly split ffn_hidden_size \(size 160\) across 3 TP ranks",
        tp=Tp(2, 3),
        params=GATE_UP_0,
    ),
]

# Damage the package cannot see: it loads without error. Each with the reason (CASES.md).
UNDETECTABLE: list[tuple[Case, str]] = [
    (
        Case(
            "raw_tensor_bytes_overwritten",
            "64 bytes of a chunk's raw tensor data (data/0) zeroed",
            _overwrite_chunk(lambda off, n, c: (off + n // 2, b"\0" * 64)),
            MegatronLoaderError,
            "",
        ),
        "without integrity.json: DCP stores no checksum of tensor bytes, and the zip's CRC-32 of "
        "each storage entry is not checked (tensor bytes are read straight into place, often "
        "only the slice one rank needs; data.pkl's CRC is checked). With the manifest "
        "(megatron-core 0.18+ --verify-integrity) it is caught: see "
        "raw_tensor_bytes_overwritten_with_manifest",
    ),
    (
        Case(
            "chunk_replaced_by_wellformed_tensor",
            "a chunk replaced by a valid float32 zeros tensor of the same shape",
            _chunk_payload(torch.zeros(1, 128, 64)),
            MegatronLoaderError,
            "",
        ),
        "a well-formed chunk of the right dtype and shape is indistinguishable from the "
        "original without checksums (caught only with integrity.json, as above)",
    ),
    (
        Case(
            "shape_free_args_changed",
            "common.pt args say rotary_base=1000, norm_epsilon=1e-3 (no shape depends on them)",
            _args(rotary_base=1000, norm_epsilon=1e-3),
            MegatronLoaderError,
            "",
        ),
        "args are the only record of RoPE base, epsilon and similar; no tensor can contradict "
        "them, so a wrong value serves a different model (integrity.json catches a change made "
        "after the save, not a wrong value saved by the run)",
    ),
]


def apply(case: Case, root: Path) -> Path:
    """Damage the copy at ``root``; the path to load."""
    target = case.damage(root)
    return target if isinstance(target, Path) else root


def run_case(case: Case, root: Path) -> MegatronLoaderError | None:
    """Apply the damage and load; the package's error, or None when it loaded."""
    try:
        dmg.load(apply(case, root), case.tp, case.params)
    except MegatronLoaderError as exc:
        return exc
    return None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_damage_gets_a_clear_error(ckpt_copy, case: Case) -> None:
    root = ckpt_copy(case.fixture)
    with pytest.raises(case.error, match=case.match) as err:
        dmg.load(apply(case, root), case.tp, case.params)
    assert type(err.value) is case.error  # the exact type, not a sibling subclass


@pytest.mark.parametrize(("case", "why"), UNDETECTABLE, ids=lambda c: getattr(c, "name", ""))
def test_known_limits_load_without_error(ckpt_copy, megatron_ckpt, case: Case, why: str) -> None:
    """Documents what the package cannot detect: the load succeeds, the model differs."""
    good = dmg.load(megatron_ckpt(case.fixture))
    bad = dmg.load(apply(case, ckpt_copy(case.fixture)))
    assert bad.keys() == good.keys()
    if case.name == "shape_free_args_changed":
        return  # the tensors are equal; only the config differs
    assert any(not torch.equal(bad[k], good[k]) for k in good)


def test_cases_md_lists_every_case_with_its_pattern() -> None:
    from write_cases import md_cell

    text = (HERE / "CASES.md").read_text()
    for case in CASES:
        row = f"| `{case.name}` | {md_cell(case.what)} | `{case.error.__name__}` | "
        assert row in text, f"CASES.md lacks {case.name}; run tests/corruption/write_cases.py"
        assert f"`{md_cell(case.match)}`" in text, f"CASES.md has an old pattern for {case.name}"
    for case, why in UNDETECTABLE:
        assert f"| `{case.name}` | {md_cell(case.what)} | {md_cell(why)} |" in text, case.name


def test_table_has_at_least_twenty_distinct_cases() -> None:
    names = [c.name for c in CASES] + [c.name for c, _ in UNDETECTABLE]
    assert len(CASES) >= 20 and len(set(names)) == len(names)
