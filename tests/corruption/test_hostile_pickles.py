"""Every pickle a checkpoint holds goes through one allow-listing unpickler: a hostile
``__reduce__`` planted in any of them is refused, naming the file and the global, and never runs.
Legitimate megatron enums and dataclasses still load, as inert placeholders."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import re
import signal
from collections.abc import Callable
from pathlib import Path

import ckpt_damage as dmg
import pytest

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.checkpoint.safe_pickle import MegatronPlaceholder, safe_loads
from sglang_megatron_loader.errors import UnsafePickleError


class _Touch:
    """``pathlib.Path(marker).touch()``; pickled as ``pathlib.Path.touch`` (protocol
    2: ``builtins.getattr(pathlib.Path, "touch")``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class _System(_Touch):
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec(_Touch):
    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


# payload -> the global the refusal must name (first one the unpickler meets)
PAYLOADS = {
    "pathlib_touch": (_Touch, r"(builtins\.getattr|pathlib\.Path\.touch)"),
    "os_system": (_System, r"posix\.system"),
    "builtins_exec": (_Exec, r"builtins\.exec"),
}


def _plant_metadata(root: Path, evil: object) -> str:
    """Inside the real DCP ``Metadata`` (as its planner_data), pickled like DCP does."""
    meta = dmg.read_metadata(root)
    meta.planner_data = {"hook": evil}
    dmg.write_metadata(root, meta)
    return r"iter_0000010/\.metadata: "


def _plant_common_pt(root: Path, evil: object) -> str:
    """megatron-core <= 0.18 layout: a ``common.pt`` next to ``metadata.json``."""
    state = dmg.common_state(root)
    state["args"].tokenizer_model = evil
    (dmg.iter_dir(root) / "common.pt").write_bytes(dmg.torch_save_bytes(state))
    return r"iter_0000010/common\.pt: "


def _plant_common_state(root: Path, evil: object) -> str:
    """megatron-core 0.19 layout: the DCP bytes item ``common_state/shard_0_1``."""
    state = dmg.common_state(root)
    state["opt_param_scheduler"] = evil
    dmg.append_and_repoint(root, dmg.COMMON, dmg.torch_save_bytes([state]))
    return r"__0_0\.distcp \(item 'common_state/shard_0_1', bytes \d+\.\.\d+\): "


def _plant_chunk(root: Path, evil: object) -> str:
    """``data.pkl`` of one tensor chunk (a torch.save zip inside the .distcp)."""
    dmg.append_and_repoint(root, dmg.QKV, dmg.torch_save_bytes(evil), nth=1)
    return rf"__0_0\.distcp \(key '{dmg.QKV}', chunk at \(1, 0, 0\)\): "


PLACES: dict[str, Callable[[Path, object], str]] = {
    ".metadata": _plant_metadata,
    "common.pt": _plant_common_pt,
    "common_state item": _plant_common_state,
    "chunk data.pkl": _plant_chunk,
}


@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("place", list(PLACES))
def test_hostile_pickle_is_refused_and_never_runs(
    ckpt_copy, tmp_path: Path, place: str, payload: str
) -> None:
    root = ckpt_copy("fp32_tp1")
    marker = tmp_path / "pwned"
    cls, global_re = PAYLOADS[payload]
    file_re = PLACES[place](root, cls(marker))
    with pytest.raises(UnsafePickleError) as err:
        dmg.load(root)  # open, config, plan, read every tensor: the loader's path
    assert not marker.exists(), "the payload ran"
    message = str(err.value)
    assert message.startswith(str(root)), message
    pattern = file_re + r"refusing to unpickle global '" + global_re + "'"
    assert re.search(pattern, message), (pattern, message)


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_control_the_payloads_are_live(tmp_path: Path, payload: str) -> None:
    """Control: a plain ``pickle.loads`` does run them, so the refusals above mean something."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(PAYLOADS[payload][0](marker), protocol=2))
    assert marker.exists()


def test_hostile_extra_state_payload_is_never_unpickled(ckpt_copy, tmp_path: Path) -> None:
    """``_extra_state`` bytes items are skipped, never read: a payload there cannot run."""
    root = ckpt_copy("fp32_tp1")
    marker = tmp_path / "pwned"
    key = "decoder.layers.self_attention.linear_qkv._extra_state/shard_0_4"
    dmg.append_and_repoint(root, key, pickle.dumps(_System(marker)))
    out = dmg.load(root)
    assert "model.layers.0.self_attn.qkv_proj.weight" in out and not marker.exists()


def test_real_megatron_enums_load_as_inert_placeholders(megatron_ckpt) -> None:
    """The fixture's args (a real Megatron-LM run's) were saved with real megatron enums
    (``AttnBackend``, ``InferenceCudaGraphScope``) and ``signal.Signals`` (``exit_signal``)."""
    with MegatronCheckpoint(megatron_ckpt("fp32_tp1")) as ckpt:
        backend, scope = ckpt.args.attention_backend, ckpt.args.inference_cuda_graph_scope
        exit_signal = ckpt.args.exit_signal
    assert isinstance(backend, MegatronPlaceholder) and isinstance(scope, MegatronPlaceholder)
    assert type(backend)._qualname == "megatron.core.transformer.enums.AttnBackend"
    assert backend.args == (5,)  # AttnBackend.auto
    assert repr(scope) == "<megatron.core.transformer.enums.InferenceCudaGraphScope(1)>"
    assert exit_signal is signal.SIGTERM  # an IntEnum member: allow-listed, harmless to build


@dataclasses.dataclass
class FakeOptimizerConfig:
    lr: float = 1e-4
    optimizer: str = "adam"


def test_megatron_dataclass_in_args_loads_as_placeholder_with_its_fields() -> None:
    """A megatron dataclass as torch.save pickles it (protocol 2, NEWOBJ + BUILD), renamed to
    megatron's own module so no megatron import is needed to write it."""
    args = argparse.Namespace(optimizer_config=FakeOptimizerConfig(lr=3e-4), seeds={1, 2})
    data = pickle.dumps({"args": args}, protocol=2)
    ours = f"c{FakeOptimizerConfig.__module__}\nFakeOptimizerConfig\n".encode()
    assert ours in data
    data = data.replace(ours, b"cmegatron.core.optimizer.optimizer_config\nOptimizerConfig\n")
    loaded = safe_loads(data, source="common.pt")
    cfg = loaded["args"].optimizer_config
    assert isinstance(cfg, MegatronPlaceholder)
    assert type(cfg)._qualname == "megatron.core.optimizer.optimizer_config.OptimizerConfig"
    assert cfg.state == {"lr": 3e-4, "optimizer": "adam"}
    assert loaded["args"].seeds == {1, 2}  # protocol 2 names it '__builtin__.set'


def test_placeholder_cannot_be_used_to_reach_a_non_megatron_global() -> None:
    """Only names under ``megatron.`` become placeholders; look-alikes are refused."""
    for module in ("megatron_evil", "os.megatron", "megatronx.core"):
        data = f"c{module}\nThing\n.".encode()
        with pytest.raises(UnsafePickleError, match=f"'{module}.Thing'"):
            safe_loads(data, source="x.pkl")
