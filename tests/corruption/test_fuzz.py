"""Fuzz the parsers with mutated real bytes: whatever the damage, the only exceptions are the
package's own (``MegatronLoaderError`` subclasses) - never KeyError, IndexError, struct.error,
zipfile errors, OSError, RecursionError, MemoryError...

Deterministic (``derandomize``) and bounded: a few hundred examples in all, well under a minute.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import ckpt_damage as dmg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_megatron_loader.checkpoint.dcp import DcpCheckpoint
from sglang_megatron_loader.checkpoint.safe_pickle import safe_loads
from sglang_megatron_loader.checkpoint.torchzip import (
    TensorRef,
    TorchZip,
    load_torch_bytes,
    materialise,
)
from sglang_megatron_loader.errors import MegatronLoaderError

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "120")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def real(megatron_ckpt) -> dict:
    """The fixture's files and the byte ranges of its chunks (read once)."""
    it = dmg.iter_dir(megatron_ckpt("fp32_tp1"))
    meta = dmg.read_metadata(megatron_ckpt("fp32_tp1"))
    distcp = (it / "__0_0.distcp").read_bytes()
    norm = meta.storage_data[dmg.storage_index(meta, dmg.FINAL_NORM)]
    common = meta.storage_data[dmg.storage_index(meta, dmg.COMMON)]
    # the zip structure (headers, data.pkl, central directory) of every entry: 200 bytes each end
    hot = [info.offset for info in meta.storage_data.values()]
    hot += [info.offset + info.length - 200 for info in meta.storage_data.values()]
    return {
        "iter_dir": it,
        "metadata": (it / ".metadata").read_bytes(),
        "distcp": distcp,
        "chunk": distcp[norm.offset : norm.offset + norm.length],
        "common": distcp[common.offset : common.offset + common.length],
        "hot": sorted(hot),
    }


def mutations(size: int, hot: list[int] | None = None) -> st.SearchStrategy:
    """A few byte overwrites (anywhere, or near ``hot`` offsets), maybe a truncation."""
    anywhere = st.integers(0, size - 1)
    if hot:
        near = st.tuples(st.sampled_from(hot), st.integers(0, 199)).map(lambda t: sum(t))
        anywhere = st.one_of(near, anywhere)
    edits = st.lists(st.tuples(anywhere, st.integers(0, 255)), min_size=1, max_size=6)
    return st.tuples(edits, st.one_of(st.none(), st.integers(0, size)))


def mutate(data: bytes, mutation: tuple) -> bytes:
    edits, cut = mutation
    out = bytearray(data)
    for pos, value in edits:
        if pos < len(out):
            out[pos] = value
    return bytes(out[:cut] if cut is not None else out)


def only_our_errors(fn: Callable[[], object]) -> None:
    """A clear error is an expected outcome; any other exception fails the test."""
    with contextlib.suppress(MegatronLoaderError):
        fn()


def read_everything(dcp: DcpCheckpoint) -> None:
    for key, info in dcp.tensors.items():
        dcp.read_slice(key, tuple((0, s) for s in info.shape))
    for key in dcp.bytes_items:
        dcp.read_bytes_item(key)


@FUZZ
@given(data=st.binary(max_size=512))
def test_safe_loads_of_random_bytes(data: bytes) -> None:
    only_our_errors(lambda: safe_loads(data, source="fuzz.pkl"))


@FUZZ
@given(st.data())
def test_mutated_dot_metadata_then_every_read(real: dict, data: st.DataObject) -> None:
    """The real ``.metadata`` damaged, opened with the real data file, every item read."""
    blob = mutate(real["metadata"], data.draw(mutations(len(real["metadata"]))))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / ".metadata").write_bytes(blob)
        (folder / "__0_0.distcp").symlink_to(real["iter_dir"] / "__0_0.distcp")

        def run() -> None:
            with DcpCheckpoint(folder) as dcp:
                read_everything(dcp)

        only_our_errors(run)


@FUZZ
@given(st.data())
def test_mutated_chunk_zip(real: dict, data: st.DataObject) -> None:
    """One tensor chunk (a torch.save zip) damaged: locate it, then read its tensor."""
    chunk = real["chunk"]
    blob = mutate(chunk, data.draw(mutations(len(chunk))))
    with tempfile.TemporaryFile() as f:
        f.write(b"\0" * 13 + blob)  # not at offset 0, as inside a .distcp
        f.flush()

        def run() -> None:
            ref = TorchZip(f, 13, len(blob), source="fuzz.distcp").locate()
            if isinstance(ref, TensorRef):
                materialise(f, ref)

        only_our_errors(run)


@FUZZ
@given(st.data())
def test_mutated_common_state_payload(real: dict, data: st.DataObject) -> None:
    """The common-state payload (torch.save of ``[common_dict]``) damaged and loaded whole."""
    common = real["common"]
    blob = mutate(common, data.draw(mutations(len(common), hot=[0, len(common) - 200])))
    only_our_errors(lambda: load_torch_bytes(blob, source="fuzz item"))


@FUZZ
@given(st.data())
def test_mutated_distcp_through_the_load_path(real: dict, data: st.DataObject) -> None:
    """The data file damaged near its zip structures; the loader's whole path (common state,
    args, config, dims, plan, every read)."""
    distcp = real["distcp"]
    blob = mutate(distcp, data.draw(mutations(len(distcp), hot=real["hot"])))
    with tempfile.TemporaryDirectory() as tmp:
        it = Path(tmp) / "iter_0000010"
        it.mkdir()
        for name in (".metadata", "metadata.json"):
            (it / name).symlink_to(real["iter_dir"] / name)
        (it / "__0_0.distcp").write_bytes(blob)
        only_our_errors(lambda: dmg.load(it))
