"""``sglang-megatron``: command-line tools around the same reader and planner as the loader."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from sglang_megatron_loader.errors import MegatronLoaderError


def _cmd_inspect(ns: argparse.Namespace) -> int:
    from sglang_megatron_loader.checkpoint import MegatronCheckpoint
    from sglang_megatron_loader.config import llama_config_from_args, unsupported_args
    from sglang_megatron_loader.engine import dims_for
    from sglang_megatron_loader.models.llama import LLAMA
    from sglang_megatron_loader.models.rules import Tp
    from sglang_megatron_loader.planner import plan_rank

    with MegatronCheckpoint(ns.checkpoint) as ckpt:
        model_keys = [k for k in ckpt.tensors if not LLAMA.is_ignored(k)]
        info = {
            "iter_dir": str(ckpt.location.iter_dir),
            "iteration": ckpt.location.iteration_label,
            "format": ckpt.location.format,
            "model_bytes": sum(ckpt.tensors[k].nbytes for k in model_keys),
            "other_bytes": sum(t.nbytes for k, t in ckpt.tensors.items() if k not in model_keys),
            "unsupported": unsupported_args(ckpt.args),
        }
        plan = None
        if not info["unsupported"]:
            config = llama_config_from_args(ckpt.args, source=ckpt.source)
            info["config"] = config.to_diff_dict()
            if ns.tp:
                dims = dims_for(ckpt, config)
                plan = [plan_rank(LLAMA, dims, ckpt.tensors, Tp(r, ns.tp)) for r in range(ns.tp)]
                info["bytes_per_rank"] = [
                    sum(
                        r.numel() * ckpt.tensors[r.key].dtype.itemsize
                        for p in rp.params
                        for r in p.reads
                    )
                    for rp in plan
                ]
    if ns.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
        if plan and ns.show_plan:
            print("\n\n".join(str(p) for p in plan))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sglang-megatron",
        description="Tools for serving Megatron-LM checkpoints with SGLang "
        "(serve with: python -m sglang.launch_server --model-path CKPT --load-format megatron).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("inspect", help="show format, iteration, derived config and TP plan")
    p.add_argument("checkpoint", help="Megatron run root or iter_* folder")
    p.add_argument("--tp", type=int, default=0, help="show the plan for this target TP size")
    p.add_argument("--show-plan", action="store_true", help="print every parameter's reads")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 0
    try:
        return ns.func(ns)
    except MegatronLoaderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
