"""Test-only helpers: run SGLang's real HTTP server on a CPU-only machine.

Verified with sglang 0.5.23 / torch 2.14.1 on a 2-core x86 (AVX512, no AMX)
box without a GPU, TP=1, tiny random Llama in fp32: greedy tokens and top-5
logprobs equal HF transformers' (max |d logprob| ~5e-7).

Usage (import it by path, e.g. ``sys.path.insert(0, "<repo>/tests/cpu_stub")``
then ``import serve_helpers``; or as ``tests.cpu_stub.serve_helpers`` where the
repo root is importable)::

    proc = start_server("/tmp/tiny_llama")
    try:
        out = generate(proc.port, [1, 2, 3, 4, 5], max_new_tokens=8)
        out["output_ids"]                           # list[int], the new tokens
        out["meta_info"]["output_token_logprobs"]   # [[logprob, token_id, None], ...]
        out["meta_info"]["output_top_logprobs"]     # per step: [[logprob, token_id, None] x k]
    finally:
        stop_server(proc)

Only the standard library is used here (no requests / httpx).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

STUB_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_server_env() -> dict:
    """Environment variables to add to ``os.environ`` for the server process.

    * ``SGLANG_USE_CPU_ENGINE=1``: required by ``--device cpu`` (selects the CPU
      platform; ``is_cpu()`` is False without it).
    * ``PYTHONPATH`` starting with this directory: its ``sitecustomize.py``
      stubs ``sgl_kernel`` in the launcher and in every spawned child
      (scheduler, detokenizer). Any existing ``PYTHONPATH`` is kept after it.
    * ``PYTHONUNBUFFERED=1``: log lines reach the log file before a crash.
    * ``HF_HUB_OFFLINE=1``: never try the network (models are local folders).
    """
    existing = os.environ.get("PYTHONPATH", "")
    parts = [str(STUB_DIR)] + [p for p in existing.split(os.pathsep) if p and p != str(STUB_DIR)]
    return {
        "SGLANG_USE_CPU_ENGINE": "1",
        "PYTHONPATH": os.pathsep.join(parts),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
    }


def enable_in_process() -> None:
    """For in-process use (``sglang.Engine``, or importing SGLang modules in the
    test process) when the interpreter was started without ``tests/cpu_stub``
    on PYTHONPATH: install the ``sgl_kernel`` stub hook here and export
    ``cpu_server_env()`` into ``os.environ`` so that processes SGLang spawns
    later get the stub too. Call it before importing ``sglang``.
    """
    import importlib.util

    os.environ.update(cpu_server_env())
    spec = importlib.util.spec_from_file_location("_sglang_cpu_stub", STUB_DIR / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # installs the hook (no-op if already installed)


def cpu_server_args(
    model_path: str | os.PathLike,
    port: int,
    dtype: str = "float32",
    *,
    max_total_tokens: int = 4096,
    max_running_requests: int = 8,
    extra_args: Iterable[str] = (),
    skip_tokenizer_init: bool = True,
) -> list[str]:
    """argv after ``python -m sglang.launch_server``.

    ``--max-total-tokens`` matters: without it SGLang sizes the KV cache from
    free RAM (it took ~15 GB and ~27 s to allocate on a 24 GB machine).
    CUDA graphs are disabled automatically with the torch_native backend.
    """
    return [
        "--model-path",
        str(model_path),
        *(["--skip-tokenizer-init"] if skip_tokenizer_init else []),
        "--device",
        "cpu",
        "--attention-backend",
        "torch_native",
        "--disable-overlap-schedule",
        "--dtype",
        dtype,
        "--host",
        HOST,
        "--port",
        str(port),
        "--max-total-tokens",
        str(max_total_tokens),
        "--max-running-requests",
        str(max_running_requests),
        *extra_args,
    ]


def log_tail(path: str | os.PathLike, n: int = 60) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return f"<could not read {path}: {e}>"


def _health(port: int, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:  # 503 while warming up
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0


def start_server(
    model_path: str | os.PathLike,
    *,
    port: int | None = None,
    dtype: str = "float32",
    extra_args: Sequence[str] = (),
    extra_env: dict | None = None,
    log_path: str | os.PathLike | None = None,
    timeout: float = 240.0,
    python: str = sys.executable,
    cwd: str | os.PathLike | None = None,
    launcher: Sequence[str] | None = None,
    skip_tokenizer_init: bool = True,
) -> subprocess.Popen:
    """Start ``python -m sglang.launch_server`` and wait until ``/health`` is 200.

    The server runs in its own session / process group (``start_new_session``)
    so ``stop_server`` can kill the launcher and all children it spawned.
    stdout+stderr go to ``log_path`` (a temp file by default).

    Returns the Popen with extra attributes ``port``, ``url``, ``log_path``.
    Raises ``RuntimeError`` (with the log tail) as soon as the process exits
    before becoming healthy, ``TimeoutError`` after ``timeout`` seconds (the
    server is killed in both cases).

    On a 2-core machine /health answers ~35-40 s after start (mostly imports
    in the launcher and in the spawned scheduler/detokenizer processes).
    """
    port = port or free_port()
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"sglang_cpu_{port}_", suffix=".log")
        os.close(fd)
    log_path = str(log_path)
    env = dict(os.environ)
    env.update(cpu_server_env())
    if extra_env:
        env.update(extra_env)
    # launcher: the argv before the server options; default ``python -m sglang.launch_server``
    # (``[".venv/bin/sglang", "serve"]`` runs SGLang's other entry point)
    cmd = [
        *(launcher or (python, "-m", "sglang.launch_server")),
        *cpu_server_args(
            model_path, port, dtype, extra_args=extra_args, skip_tokenizer_init=skip_tokenizer_init
        ),
    ]
    with open(log_path, "wb") as log_f:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    proc.port = port
    proc.url = f"http://{HOST}:{port}"
    proc.log_path = log_path
    proc.cmd = cmd

    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            stop_server(proc)  # reap any children left behind
            raise RuntimeError(
                f"SGLang server exited with code {rc} before becoming healthy "
                f"(log: {log_path}).\ncmd: {' '.join(cmd)}\n--- log tail ---\n{log_tail(log_path)}"
            )
        if _health(port) == 200:
            return proc
        if time.monotonic() > deadline:
            stop_server(proc)
            raise TimeoutError(
                f"SGLang server not healthy after {timeout:.0f}s (log: {log_path}).\n"
                f"cmd: {' '.join(cmd)}\n--- log tail ---\n{log_tail(log_path)}"
            )
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """Stop the server and every process in its process group.

    SIGTERM to the launcher first (it shuts its children down cleanly in ~3 s),
    then SIGKILL to the whole group after ``timeout`` s, and in any case once
    more at the end for stragglers (e.g. multiprocessing's resource_tracker).
    Returns the launcher's exit code.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return None


def generate(
    port: int,
    input_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    return_logprob: bool = True,
    top_logprobs_num: int = 5,
    ignore_eos: bool = False,
    sampling_params: dict | None = None,
    timeout: float = 120.0,
    host: str = HOST,
) -> dict:
    """POST /generate with token ids; returns the decoded JSON.

    Response (one prompt)::

        {"output_ids": [int, ...],                 # generated tokens only
         "meta_info": {
            "finish_reason": {"type": "length", "length": N} | {"type": "stop", ...},
            "prompt_tokens": int, "completion_tokens": int,
            "output_token_logprobs": [[logprob, token_id, None], ...],    # one per output token
            # one list per output token:
            "output_top_logprobs": [[[logprob, token_id, None], ...k], ...],
            "input_token_logprobs": [], "input_top_logprobs": [], ...}}

    Set ``ignore_eos=True`` to always get ``max_new_tokens`` tokens (the model's
    eos_token_id otherwise ends generation early).
    """
    sp = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    if ignore_eos:
        sp["ignore_eos"] = True
    if sampling_params:
        sp.update(sampling_params)
    body = {"input_ids": list(map(int, input_ids)), "sampling_params": sp}
    if return_logprob:
        body["return_logprob"] = True
        body["top_logprobs_num"] = top_logprobs_num
    return post(port, "/generate", body, host=host, timeout=timeout)


def post(
    port: int,
    path: str,
    body: dict,
    *,
    host: str = HOST,
    timeout: float = 120.0,
    ok_codes: tuple[int, ...] = (200,),
) -> dict:
    """POST JSON to ``path`` and return the decoded answer (error bodies too, if in
    ``ok_codes``; otherwise RuntimeError with the body)."""
    req = urllib.request.Request(
        f"http://{host}:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        payload = e.read()
        if e.code in ok_codes:
            return json.loads(payload)
        raise RuntimeError(f"{path} returned HTTP {e.code}: {payload[:2000]!r}") from e
