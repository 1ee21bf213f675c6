"""``sglang-megatron``: command-line tools around the same reader and planner as the loader."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

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


def _cmd_export(ns: argparse.Namespace) -> int:
    from sglang_megatron_loader.checkpoint import MegatronCheckpoint
    from sglang_megatron_loader.export.stream import HfStream
    from sglang_megatron_loader.export.writers import export_hf, export_pytorch, report_line

    overrides = json.loads(ns.override) if ns.override else None
    with MegatronCheckpoint(ns.checkpoint) as ckpt:
        stream = HfStream(ckpt, overrides)
        if ns.format == "hf":
            report = export_hf(
                stream,
                ns.out,
                shard_bytes=int(ns.shard_size * 1e9),
                tokenizer=ns.tokenizer,
                force=ns.force,
            )
        else:
            report = export_pytorch(stream, ns.out, force=ns.force)
    print(report_line(report))
    return 0


def _cmd_verify(ns: argparse.Namespace) -> int:
    from sglang_megatron_loader.checkpoint import MegatronCheckpoint
    from sglang_megatron_loader.export.stream import HfStream
    from sglang_megatron_loader.export.verify import verify

    with MegatronCheckpoint(ns.checkpoint) as ckpt:
        checks, tol = verify(HfStream(ckpt), reference=ns.reference)
    against = (
        f"recorded Megatron logits ({ns.reference})"
        if ns.reference
        else ("an independent forward over the SGLang-layout weights")
    )
    print(f"transformers Llama on the checkpoint vs {against}; tolerance {tol:g}")
    for c in checks:
        status = "PASS" if c.max_abs_diff <= tol else "FAIL"
        print(
            f"  {status} prompt of {len(c.prompt)} tokens: max |logit diff| "
            f"{c.max_abs_diff:.3g}, same argmax: {c.argmax_equal}"
        )
    ok = all(c.max_abs_diff <= tol for c in checks)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


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

    p = sub.add_parser("export", help="write a Hugging Face folder or a plain PyTorch .pt")
    p.add_argument("checkpoint", help="Megatron run root or iter_* folder")
    p.add_argument("out", type=Path, help="output folder (hf) or file (pytorch)")
    p.add_argument("--format", choices=("hf", "pytorch"), default="hf")
    p.add_argument("--shard-size", type=float, default=5.0, help="GB per safetensors shard")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder to copy (hf format)")
    p.add_argument("--override", help="JSON config overrides, e.g. '{\"vocab_size\": 128256}'")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("verify", help="reference logits check on CPU (no megatron needed)")
    p.add_argument("checkpoint", help="Megatron run root or iter_* folder")
    p.add_argument(
        "--reference",
        type=Path,
        help="recorded Megatron outputs (.pt with 'prompts' and 'last_logits')",
    )
    p.set_defaults(func=_cmd_verify)
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
