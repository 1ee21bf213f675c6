"""``sglang-megatron inspect`` on real fixtures: metadata only, plan summary per TP rank."""

from __future__ import annotations

import json

from sglang_megatron_loader.cli import main as cli


def test_inspect_text_shows_layout_config_and_per_rank_bytes(megatron_ckpt, capsys) -> None:
    assert cli(["inspect", str(megatron_ckpt("fp32_tp2pp2")), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "iteration    10" in out
    assert "tensor_model_parallel_size=2, pipeline_model_parallel_size=2" in out
    assert "megatron-core >= 0.19" in out
    assert "4 layers, hidden 64, ffn 160, heads 4 (kv 2, head_dim 16), vocab 250" in out
    assert "TP=2 plan  bytes per rank:" in out


def test_inspect_json_and_tp_that_cannot_serve(megatron_ckpt, capsys) -> None:
    assert cli(["inspect", str(megatron_ckpt("other_dims")), "--tp", "4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 307_872
    assert info["optimizer_and_other_bytes"] == 0
    assert "num_attention_heads (size 6) across 4 TP ranks" in info["tp_error"]


def test_inspect_bytes_per_rank_split_the_model(megatron_ckpt, capsys) -> None:
    assert (
        cli(["inspect", str(megatron_ckpt("fp32_tp1")), "--tp", "2", "--json", "--show-plan"]) == 0
    )
    info = json.loads(capsys.readouterr().out)
    per, total = info["bytes_per_rank"], info["model_bytes"]
    norms = (2 * 4 + 1) * 64 * 4  # replicated on every rank: read twice at TP=2
    padding = 2 * (256 - 250) * 64 * 4  # Megatron's padded vocab rows: never read
    assert sum(per) == total + norms - padding
    assert max(per) < 0.51 * total
