"""Megatron is never needed at serving time: read, plan, load, export, inspect and verify a
checkpoint in a fresh interpreter where ``import megatron`` is impossible.

The venv has megatron-core installed (the fixtures are made with it), so a finder placed first on
``sys.meta_path`` raises ImportError for ``megatron`` and every submodule. The checkpoints are
golden copies from megatron-core 0.15.3 (``.metadata`` pickles ``MCoreMetadata``, args in
``common.pt``) and 0.19.2 (common state inside the DCP).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).parents[1] / "fixtures" / "golden"
ROOTS = [GOLDEN / "mcore_0.15.3" / "fp32_tp2", GOLDEN / "mcore_0.19.2" / "fp32_tp2pp2"]

SCRIPT = r"""
import json, sys
from pathlib import Path

blocked = []

class NoMegatron:
    def find_spec(self, name, path=None, target=None):
        if name == "megatron" or name.startswith("megatron."):
            blocked.append(name)
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, NoMegatron())
try:
    import megatron.core  # noqa: F401
    raise SystemExit("the megatron block does not work")
except ImportError:
    pass

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.cli import main as cli
from sglang_megatron_loader.engine import execute_plan
from sglang_megatron_loader.export.stream import HfStream
from sglang_megatron_loader.export.writers import export_hf, export_pytorch
from sglang_megatron_loader.models.llama import LLAMA
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import plan_rank
import sglang_megatron_loader.sglang.loader  # noqa: F401  the SGLang side, SGLang included

out, report = Path(sys.argv[1]), {}
for i, root in enumerate(sys.argv[2:]):
    with MegatronCheckpoint(root) as ckpt:
        stream = HfStream(ckpt)
        plan = plan_rank(LLAMA, stream.dims, ckpt.tensors, Tp(1, 2))
        dest = {p.name: __import__("torch").empty(p.shape) for p in plan.params}
        load = execute_plan(ckpt, plan, lambda p: dest[p.name], progress=False)
        export_hf(stream, out / f"hf{i}", progress=False)
        export_pytorch(stream, out / f"m{i}.pt", progress=False)
    assert cli(["inspect", root, "--tp", "2"]) == 0
    assert cli(["verify", root, "--reference", f"{root}.reference.pt"]) == 0
    report[root] = load.bytes_read
report["megatron_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "megatron")
report["blocked"] = sorted(set(blocked))
print("REPORT " + json.dumps(report))
"""


def test_plan_load_export_inspect_verify_without_megatron(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), *map(str, ROOTS)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))
    assert report["megatron_modules"] == []
    assert report["blocked"][0] == "megatron"  # our own probe; anything else tried is listed
    for root in ROOTS:
        assert report[str(root)] > 0
        assert (tmp_path / f"hf{ROOTS.index(root)}" / "model.safetensors.index.json").is_file()
    assert "PASS" in proc.stdout and "FAIL" not in proc.stdout
    print(f"blocked imports: {report['blocked']}")
