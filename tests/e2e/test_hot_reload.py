"""Hot reload on CPU at TP=1: /update_weights_from_disk with a Megatron checkpoint path."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "cpu_stub"))
import serve_helpers as sh  # noqa: E402
from make_megatron_checkpoint import VARIANTS, generate  # noqa: E402

pytestmark = pytest.mark.e2e


def test_reload_next_iteration_and_refuse_other_shapes(ckpt_copy, megatron_ckpt, tmp_path):
    run = ckpt_copy("fp32_tp1")  # iter_0000010
    nxt = dataclasses.replace(VARIANTS["fp32_tp1"], name="next", seed=777, iteration=20)
    generate(tmp_path / "next", nxt)  # same shapes, other weights: "training went on"
    shutil.copytree(tmp_path / "next" / "iter_0000020", run / "iter_0000020")
    old = torch.load(f"{run}.reference.pt", weights_only=True)
    new = torch.load(tmp_path / "next.reference.pt", weights_only=True)
    prompt = old["prompts"][0]
    assert old["greedy"][0] != new["greedy"][0]

    proc = sh.start_server(
        run / "iter_0000010",
        extra_args=["--load-format", "megatron"],
        log_path=tmp_path / "server.log",
    )
    try:
        assert sh.generate(proc.port, prompt, 8)["output_ids"] == old["greedy"][0]
        (run / "latest_checkpointed_iteration.txt").write_text("20")
        out = sh.post(proc.port, "/update_weights_from_disk", {"model_path": str(run)})
        assert out["success"], out
        assert "iteration 20" in out["message"]
        assert sh.generate(proc.port, prompt, 8)["output_ids"] == new["greedy"][0]

        other = megatron_ckpt("other_dims")
        out = sh.post(
            proc.port, "/update_weights_from_disk", {"model_path": str(other)}, ok_codes=(200, 400)
        )
        assert not out["success"]
        assert (
            "refusing to reload" in out["message"] and "hidden_size: serving 64" in out["message"]
        )
        assert sh.generate(proc.port, prompt, 8)["output_ids"] == new["greedy"][0]
    finally:
        sh.stop_server(proc)
    log = (tmp_path / "server.log").read_text(errors="replace")
    print(
        "\n".join(
            line
            for line in log.splitlines()
            if ("Megatron checkpoint" in line or "reload" in line or "Succeeded" in line)
            and "server_args" not in line
        )
    )


def _model_info(port: int) -> dict:
    with urllib.request.urlopen(f"http://{sh.HOST}:{port}/model_info", timeout=30) as r:
        return json.loads(r.read())


def test_failed_reload_of_a_run_root_keeps_serving_the_pinned_iteration(ckpt_copy, tmp_path):
    """Served from the run root (pinned to iteration 10 at start); training then publishes
    iteration 20 whose data file is cut short. The reload from the run root fails midway, the
    reply says which iteration is still served, and the greedy tokens stay those of 10."""
    run = ckpt_copy("fp32_tp1")  # iter_0000010
    nxt = dataclasses.replace(VARIANTS["fp32_tp1"], name="next", seed=777, iteration=20)
    generate(tmp_path / "next", nxt)
    old = torch.load(f"{run}.reference.pt", weights_only=True)
    prompt = old["prompts"][0]
    served = run / "iter_0000010"

    proc = sh.start_server(
        run, extra_args=["--load-format", "megatron"], log_path=tmp_path / "server.log"
    )
    try:
        info = _model_info(proc.port)
        assert info["model_path"] == str(served) and info["served_model_name"] == str(run), info
        assert sh.generate(proc.port, prompt, 8)["output_ids"] == old["greedy"][0]

        shutil.copytree(tmp_path / "next" / "iter_0000020", run / "iter_0000020")
        data = run / "iter_0000020" / "__0_0.distcp"
        os.truncate(data, data.stat().st_size // 2)
        (run / "latest_checkpointed_iteration.txt").write_text("20")
        out = sh.post(
            proc.port, "/update_weights_from_disk", {"model_path": str(run)}, ok_codes=(200, 400)
        )
        assert not out["success"], out
        assert "Failed to update weights" in out["message"] and "iteration 20" in out["message"]
        assert out["message"].endswith(f"still serving iteration 10 ({served})."), out["message"]
        assert sh.generate(proc.port, prompt, 8)["output_ids"] == old["greedy"][0]
        assert _model_info(proc.port)["model_path"] == str(served)
    finally:
        sh.stop_server(proc)
