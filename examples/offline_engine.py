"""Use a Megatron checkpoint in Python with SGLang's offline engine (no HTTP server).

    python examples/offline_engine.py RUN_ROOT [--tokenizer-path DIR] [--cpu]

``--cpu`` serves on the CPU (needs SGLang's CPU kernels; see tests/cpu_stub for the test-only
stand-in used on machines without them).
"""

from __future__ import annotations

import argparse

import sglang


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_root")
    parser.add_argument("--tokenizer-path")
    parser.add_argument("--prompt", default="w17 w42 w99 w3", help="text (needs a tokenizer)")
    parser.add_argument("--input-ids", default="1,17,42,99,3", help="used without a tokenizer")
    parser.add_argument("--cpu", action="store_true")
    ns = parser.parse_args()

    kwargs = {"model_path": ns.run_root, "load_format": "megatron", "log_level": "error"}
    if ns.tokenizer_path:
        kwargs["tokenizer_path"] = ns.tokenizer_path
    if ns.cpu:
        kwargs |= {
            "device": "cpu",
            "attention_backend": "torch_native",
            "disable_overlap_schedule": True,
            "max_total_tokens": 4096,
        }
    has_tokenizer = bool(ns.tokenizer_path)
    engine = sglang.Engine(skip_tokenizer_init=not has_tokenizer, **kwargs)
    try:
        params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
        if has_tokenizer:
            out = engine.generate(prompt=ns.prompt, sampling_params=params)
            print("prompt:", ns.prompt)
            print("continuation:", out["text"])
        else:
            ids = [int(i) for i in ns.input_ids.split(",")]
            out = engine.generate(input_ids=ids, sampling_params=params)
            print("input ids:", ids)
            print("continuation ids:", out["output_ids"])
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
