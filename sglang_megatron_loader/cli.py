"""``sglang-megatron``: command-line tools around the same reader and planner as the loader."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sglang_megatron_loader.errors import MegatronLoaderError


def _cmd_inspect(ns: argparse.Namespace) -> int:
    from sglang_megatron_loader.inspect_ckpt import format_text, inspect

    info, plans = inspect(ns.checkpoint, ns.tp, tokenizer=ns.tokenizer, ep=ns.ep)
    if ns.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_text(info))
        if plans and ns.show_plan:
            print("\n\n".join(str(p) for p in plans))
    return 0


def _cmd_export(ns: argparse.Namespace) -> int:
    from sglang_megatron_loader.checkpoint import MegatronCheckpoint
    from sglang_megatron_loader.export.stream import HfStream
    from sglang_megatron_loader.export.writers import export_hf, export_pytorch, report_line

    overrides = json.loads(ns.override) if ns.override else None
    with MegatronCheckpoint(ns.checkpoint) as ckpt:
        stream = HfStream(ckpt, overrides, tokenizer=ns.tokenizer)
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
    p.add_argument("--ep", type=int, default=1, help="MoE: SGLang --ep-size for the --tp plan")
    p.add_argument("--show-plan", action="store_true", help="print every parameter's reads")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer folder that sets the true vocabulary (default: the checkpoint's own)",
    )
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export", help="write a Hugging Face folder or a plain PyTorch .pt")
    p.add_argument("checkpoint", help="Megatron run root or iter_* folder")
    p.add_argument("out", type=Path, help="output folder (hf) or file (pytorch)")
    p.add_argument("--format", choices=("hf", "pytorch"), default="hf")
    p.add_argument("--shard-size", type=float, default=5.0, help="GB per safetensors shard")
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer folder to copy (hf format); it also sets the true vocabulary when the "
        "checkpoint does not record it (default: the checkpoint's own tokenizer)",
    )
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
