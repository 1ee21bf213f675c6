"""Package wiring: entry points, CLI, plugin hooks, and no megatron import at serving time."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

from sglang_megatron_loader.sglang import plugin


def test_plugin_entry_point_is_registered() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("megatron_loader") == "sglang_megatron_loader.sglang.plugin:register"


def test_cli_help_works() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sglang_megatron_loader.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "inspect" in out.stdout


def test_serving_path_never_imports_megatron(megatron_ckpt) -> None:
    """Config + plan + reading every tensor, in a fresh interpreter with megatron blocked."""
    code = f"""
import sys
sys.modules['megatron'] = None  # any import of megatron now raises ImportError
from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.engine import dims_for, execute_plan, hf_config_for
from sglang_megatron_loader.models.llama import LLAMA
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import plan_rank
import sglang_megatron_loader.sglang.loader, sglang_megatron_loader.sglang.plugin
import torch
cfg = hf_config_for({str(megatron_ckpt("fp32_tp2"))!r})
with MegatronCheckpoint({str(megatron_ckpt("fp32_tp2"))!r}) as ckpt:
    plan = plan_rank(LLAMA, dims_for(ckpt, cfg), ckpt.tensors, Tp(0, 1))
    bufs = {{p.name: torch.empty(p.shape) for p in plan.params}}
    execute_plan(ckpt, plan, lambda p: bufs[p.name], progress=False)
print("ok", [m for m in sys.modules if m.startswith("megatron.")])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok []")


def test_config_hook_builds_config_with_overrides(megatron_ckpt) -> None:
    def never(*a, **k):
        raise AssertionError("the HF parser must not be asked about a Megatron folder")

    cfg = plugin._get_config(
        never,
        str(megatron_ckpt("bf16_tp1")),
        False,
        model_override_args={"vocab_size": 200, "dtype": "float32"},
    )
    assert cfg.vocab_size == 200 and str(cfg.dtype).endswith("float32")
    assert plugin._get_config(lambda m, *a, **k: "hf", "/some/hf/model") == "hf"


def test_load_format_hook_routes_megatron_to_our_loader() -> None:
    from sglang_megatron_loader.sglang.loader import MegatronModelLoader

    class Cfg:
        load_format = "megatron"

    cfg = Cfg()
    plugin._verify_load_format(lambda self: None, cfg)
    assert cfg.load_format is MegatronModelLoader


def test_loader_extra_config_is_validated() -> None:
    import pytest
    from sglang.srt.configs.load_config import LoadConfig

    from sglang_megatron_loader.errors import UnsupportedCheckpointError
    from sglang_megatron_loader.sglang.loader import MegatronModelLoader

    ok = MegatronModelLoader(LoadConfig(model_loader_extra_config={"verify_integrity": "require"}))
    assert ok.extra["verify_integrity"] == "require"
    with pytest.raises(UnsupportedCheckpointError, match="verify_integrity='sometimes'"):
        MegatronModelLoader(LoadConfig(model_loader_extra_config={"verify_integrity": "sometimes"}))
    with pytest.raises(UnsupportedCheckpointError, match=r"unknown key\(s\) \['workers'\]"):
        MegatronModelLoader(LoadConfig(model_loader_extra_config={"workers": 8}))
    assert MegatronModelLoader(LoadConfig(model_loader_extra_config={"threads": 8})).extra
    for bad in (0, "8", True):
        with pytest.raises(UnsupportedCheckpointError, match="threads=.*positive integer"):
            MegatronModelLoader(LoadConfig(model_loader_extra_config={"threads": bad}))
