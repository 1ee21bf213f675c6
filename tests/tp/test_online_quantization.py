"""``--quantization`` with ``--load-format megatron`` goes SGLang's own way (``harness.py``, CPU).

An online scheme (``fp8``: SGLang quantizes the bf16 weights after loading) is set up with
SGLang's quantization config, the model built with its quantized layers, every weight filled
and SGLang's post-load step run, as its default loader does. On this CPU that step stops in
SGLang itself (its fp8 CPU path needs AMX), identically for the default loader on the HF
conversion: the Megatron build fails in the same place with the same message, not before.
A scheme that needs the checkpoint's own quantization config (``awq``) is refused with why.
"""

from __future__ import annotations

import pytest
from harness import World, prepare_case, run_world
from make_megatron_checkpoint import VARIANTS

SOURCE = "bf16_tp1"
WORLDS = {
    "fp8": World(1, flags=("--quantization", "fp8")),
    "awq": World(1, flags=("--quantization", "awq")),
}


@pytest.fixture(scope="module")
def results(megatron_ckpt, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("quantization")
    case, _ = prepare_case(megatron_ckpt(SOURCE), VARIANTS[SOURCE], root / SOURCE)
    return {
        scheme: run_world(world, [case], root / scheme)[0]["cases"][SOURCE]
        for scheme, world in WORLDS.items()
    }


def test_online_fp8_goes_through_sglangs_quantization_like_its_default_loader(results) -> None:
    got = results["fp8"]
    assert got["megatron_error"]["message"] == got["hf_error"]["message"], got
    # past the load: SGLang's post-load quantization step is where this CPU stops
    assert "process_weights_after_loading" in got["megatron_error"]["where"], got
    assert "AMX" in got["megatron_error"]["message"]


def test_scheme_reading_the_checkpoints_quantization_config_is_refused(results) -> None:
    err = results["awq"]["megatron_error"]
    assert err["type"].endswith("UnsupportedCheckpointError"), err
    assert err["message"].startswith("--quantization awq: SGLang could not set it up"), err
    assert "--quantization fp8" in err["message"]
