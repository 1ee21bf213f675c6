"""End to end on a golden copy: the real SGLang server (CPU) serves a checkpoint written by
megatron-core 0.15.3 (``.metadata`` pickles ``MCoreMetadata``, args in ``common.pt``, saved at TP2)
and continues each prompt exactly as Megatron's own forward did when the copy was written."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "cpu_stub"))
import serve_helpers as sh  # noqa: E402

pytestmark = pytest.mark.e2e

GOLDEN = Path(__file__).parents[1] / "fixtures" / "golden" / "mcore_0.15.3" / "fp32_tp2"
TOLERANCE = 2e-4  # fp32 served in fp32: Megatron's math to float rounding


def test_server_on_megatron_0_15_checkpoint_equals_megatron(tmp_path: Path) -> None:
    root = tmp_path / GOLDEN.name  # a copy: the committed files stay untouched
    shutil.copytree(GOLDEN, root)
    ref = torch.load(f"{GOLDEN}.reference.pt", weights_only=True)
    proc = sh.start_server(
        root,
        dtype="float32",
        extra_args=["--load-format", "megatron"],
        log_path=tmp_path / "server.log",
    )
    try:
        for prompt, greedy, top_ids, top_lp in zip(
            ref["prompts"], ref["greedy"], ref["top5_ids"], ref["top5_logprobs"], strict=True
        ):
            out = sh.generate(proc.port, prompt, max_new_tokens=len(greedy))
            assert out["output_ids"] == greedy
            first = out["meta_info"]["output_top_logprobs"][0]
            got = {tok: lp for lp, tok, _ in first}
            want = dict(zip(top_ids.tolist(), top_lp.tolist(), strict=True))
            assert set(got) == set(want), (got, want)
            worst = max(abs(got[t] - want[t]) for t in want)
            assert worst < TOLERANCE, (got, want)
            print(f"prompt of {len(prompt)} tokens: greedy equal, max |d logprob| {worst:.2e}")
    finally:
        sh.stop_server(proc)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Megatron checkpoint" in log and "Loaded " in log
