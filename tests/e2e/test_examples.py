"""Every script in examples/ runs against a tiny real checkpoint (CPU), so none rots."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "cpu_stub"))
import serve_helpers as sh  # noqa: E402
from make_megatron_checkpoint import VARIANTS, generate  # noqa: E402
from make_tokenizer import make_tokenizer  # noqa: E402

pytestmark = pytest.mark.e2e
REPO = Path(__file__).parents[2]
EXAMPLES = REPO / "examples"
# what `source .venv/bin/activate` does for the shell example's plain `python`
ACTIVATED_VENV = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
PROMPT_TEXT = "<s> w17 w42 w99 w3"  # encodes to the fixtures' first prompt [1, 17, 42, 99, 3]


@pytest.fixture(scope="module")
def run_with_tokenizer(megatron_ckpt, tmp_path_factory) -> Path:
    """A run root that carries its tokenizer in tokenizer/, as newest Megatron-LM saves it."""
    src = megatron_ckpt("fp32_tp1")
    run = tmp_path_factory.mktemp("examples") / "run"
    shutil.copytree(src, run)
    shutil.copy(f"{src}.reference.pt", f"{run}.reference.pt")
    make_tokenizer(run / "tokenizer", VARIANTS["fp32_tp1"].vocab_size)
    return run


@pytest.fixture(scope="module")
def reference(run_with_tokenizer: Path) -> dict:
    ref = torch.load(f"{run_with_tokenizer}.reference.pt", weights_only=True)
    assert ref["prompts"][0] == [1, 17, 42, 99, 3]
    return ref


@pytest.fixture(scope="module")
def server(run_with_tokenizer: Path, tmp_path_factory):
    """examples/serve_latest.sh with its default launcher, the tokenizer found in the ckpt."""
    log = tmp_path_factory.mktemp("log") / "server.log"
    proc = sh.start_server(
        run_with_tokenizer,
        launcher=["bash", str(EXAMPLES / "serve_latest.sh"), str(run_with_tokenizer)],
        skip_tokenizer_init=False,
        log_path=log,
        extra_env=ACTIVATED_VENV,
    )
    yield proc
    sh.stop_server(proc)


def test_serve_latest_uses_the_checkpoint_tokenizer(server, reference) -> None:
    out = sh.post(
        server.port,
        "/generate",
        {
            "text": PROMPT_TEXT,
            "return_logprob": True,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
        },
    )
    ids = [tok for _, tok, _ in out["meta_info"]["output_token_logprobs"]]
    assert ids == reference["greedy"][0]
    assert "Using the checkpoint's tokenizer" in Path(server.log_path).read_text()


def test_openai_client_example(server, reference, run_with_tokenizer) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_with_tokenizer / "tokenizer")
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "openai_client.py"),
            "--base-url",
            f"{server.url}/v1",
            "--prompt",
            PROMPT_TEXT,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    expected = tok.decode(reference["greedy"][0], skip_special_tokens=True)
    assert f"completion: {expected}".strip() in out.stdout.replace("completion:  ", "completion: ")


def test_eval_during_training_example_follows_new_iterations(
    server, reference, run_with_tokenizer, tmp_path
):
    nxt = dataclasses.replace(VARIANTS["fp32_tp1"], name="next", seed=777, iteration=20)
    generate(tmp_path / "next", nxt)
    new = torch.load(tmp_path / "next.reference.pt", weights_only=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLES / "eval_during_training.py"),
            "--url",
            server.url,
            "--run-root",
            str(run_with_tokenizer),
            "--poll",
            "0.5",
            "--evaluations",
            "2",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("iteration 10: greedy " + str(reference["greedy"][0])), first
        shutil.copytree(tmp_path / "next" / "iter_0000020", run_with_tokenizer / "iter_0000020")
        (run_with_tokenizer / "latest_checkpointed_iteration.txt").write_text("20")
        second = proc.stdout.readline()
        assert second.startswith("iteration 20: greedy " + str(new["greedy"][0])), second
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_sglang_serve_launcher(megatron_ckpt, tmp_path) -> None:
    run = megatron_ckpt("fp32_tp1")
    ref = torch.load(f"{run}.reference.pt", weights_only=True)
    proc = sh.start_server(
        run,
        launcher=[str(Path(sys.executable).parent / "sglang"), "serve"],
        extra_args=["--load-format", "megatron"],
        log_path=tmp_path / "server.log",
    )
    try:
        assert sh.generate(proc.port, ref["prompts"][0], 8)["output_ids"] == ref["greedy"][0]
    finally:
        sh.stop_server(proc)


def test_offline_engine_example(megatron_ckpt) -> None:
    run = megatron_ckpt("fp32_tp1")
    ref = torch.load(f"{run}.reference.pt", weights_only=True)
    env = dict(os.environ) | sh.cpu_server_env()
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "offline_engine.py"), str(run), "--cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"continuation ids: {ref['greedy'][0]}" in out.stdout, (
        out.stdout,
        time.monotonic() - start,
    )
