"""The real ``python -m sglang.launch_server --load-format megatron`` on CPU, pointed at broken or
hostile checkpoints: it exits non-zero within a bounded time and its log carries the package's
own message (not only a traceback from deep inside SGLang). TP>1 cannot start on this CPU, so
the TP cases stay in the table test.

Six server starts, ~15-40 s each on 2 cores.
"""

from __future__ import annotations

import pickle
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ckpt_damage as dmg
import pytest
import test_corruption_suite as suite
from test_hostile_pickles import _System

sys.path.insert(0, str(Path(__file__).parents[1] / "cpu_stub"))
import serve_helpers as sh  # noqa: E402

pytestmark = pytest.mark.e2e

BOUND_S = 150  # from launch to exit, including SGLang's imports in every process
CASES = {c.name: c for c in suite.CASES}


def _hostile_metadata(marker: Path) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        meta = dmg.read_metadata(root)
        meta.planner_data = _System(marker)
        (dmg.iter_dir(root) / ".metadata").write_bytes(pickle.dumps(meta))

    return damage


SERVER_CASES = [
    "path_is_a_file",  # not a checkpoint
    "mid_save_no_metadata_json",
    "truncated_distcp_tail",  # found while reading tensors, in the scheduler process
    "hostile_dot_metadata",
    "unsupported_moe_qk_layernorm",
    "math_arg_qk_l2_norm",  # an arg that changes the math without adding a tensor
]


@pytest.mark.parametrize("name", SERVER_CASES)
def test_server_exits_with_our_message(ckpt_copy, tmp_path: Path, name: str) -> None:
    case, marker = CASES[name], tmp_path / "pwned"
    damage = _hostile_metadata(marker) if name == "hostile_dot_metadata" else case.damage
    root = ckpt_copy(case.fixture)
    target = damage(root)
    path = target if isinstance(target, Path) else root
    log = tmp_path / "server.log"
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:  # exited before healthy (TimeoutError otherwise)
        sh.start_server(path, extra_args=["--load-format", "megatron"], log_path=log, timeout=240)
    elapsed = time.monotonic() - start
    summary = str(err.value).splitlines()[0]
    assert "exited with code" in summary and "exited with code 0 " not in summary, summary
    text = log.read_text(errors="replace")
    pattern = case.match if name != "hostile_dot_metadata" else r"refusing to unpickle global"
    assert re.search(pattern, text), f"{name}: {pattern!r} not in the log:\n{text[-3000:]}"
    assert case.error.__name__ in text or "sglang-megatron-loader:" in text
    assert not marker.exists()
    assert elapsed < BOUND_S, f"{name}: took {elapsed:.0f}s"
    print(f"{name}: exited after {elapsed:.1f}s; {summary}")
