"""End to end: the real ``python -m sglang.launch_server --load-format megatron`` on CPU serving
legacy ``torch``-format checkpoints (saved at TP2xPP2, and at PP2 with two virtual stages; per-rank
``mp_rank_*`` files with optimizer and RNG state inside). The greedy continuation must equal
Megatron's own (recorded on the same weights) and the first step's top-5 logprobs must agree to
fp32 rounding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "cpu_stub"))
import serve_helpers as sh  # noqa: E402

pytestmark = pytest.mark.e2e

TOLERANCE = 2e-4  # fp32 served in fp32


@pytest.mark.parametrize("name", ["legacy_fp32_tp2pp2", "legacy_fp32_pp2vpp2"])
def test_server_continuation_equals_megatron(legacy_ckpt, tmp_path: Path, name: str) -> None:
    run_root = legacy_ckpt(name)
    ref = torch.load(f"{run_root}.reference.pt", weights_only=True)
    proc = sh.start_server(
        run_root,
        extra_args=["--load-format", "megatron"],
        log_path=tmp_path / "server.log",
    )
    worst = 0.0
    try:
        for prompt, greedy, top_ids, top_lp in zip(
            ref["prompts"], ref["greedy"], ref["top5_ids"], ref["top5_logprobs"], strict=True
        ):
            out = sh.generate(proc.port, prompt, max_new_tokens=len(greedy))
            assert out["output_ids"] == greedy, (prompt, out["output_ids"], greedy)
            got = {tok: lp for lp, tok, _ in out["meta_info"]["output_top_logprobs"][0]}
            want = dict(zip(top_ids.tolist(), top_lp.tolist(), strict=True))
            assert set(got) == set(want), (got, want)
            worst = max(worst, *(abs(got[t] - want[t]) for t in want))
        assert worst < TOLERANCE, worst
        print(f"{name} served: greedy equal, max |top-5 logprob diff| {worst:.3g}")
    finally:
        sh.stop_server(proc)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "(iteration 10, torch)" in log and "Loaded " in log
