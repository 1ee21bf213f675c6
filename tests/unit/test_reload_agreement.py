"""Hot reload decisions that every rank must share, without a server: the request's run root is
pinned once (tokenizer manager), the refusals are explicit, SGLang's post-reload steps run, and a
run root's tokenizer stays discoverable from its pinned iteration folder."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sglang_megatron_loader.checkpoint import resolve
from sglang_megatron_loader.checkpoint.locate import find_tokenizer
from sglang_megatron_loader.sglang import reload
from sglang_megatron_loader.sglang.ranks import Outcome, TpRanks


class _Manager:
    served_model_name = "start"
    model_path = "/run/iter_0000010"

    def config_value(self, name: str) -> str:
        assert name == "load_format"
        return "megatron"


def _pin(path: Path, ok: bool = True) -> tuple[list[str], Any, _Manager]:
    seen: list[str] = []

    async def original(manager: Any, obj: Any, request: Any = None) -> tuple[bool, str, int]:
        seen.append(obj.model_path)
        return ok, "msg", 0

    obj = SimpleNamespace(model_path=str(path), load_format=None)
    manager = _Manager()
    asyncio.run(reload.pin_reload_iteration(original, manager, obj, None))
    return seen, obj, manager


def test_reload_request_on_a_run_root_is_pinned_to_its_iteration(ckpt_copy) -> None:
    run = ckpt_copy("fp32_tp1")
    seen, _, manager = _pin(run)
    assert seen == [str(run / "iter_0000010")]  # what every scheduler rank receives
    assert manager.served_model_name == str(run)  # the name stays the user's path
    seen, _, manager = _pin(run, ok=False)
    assert manager.served_model_name == "start"


def test_reload_request_that_does_not_resolve_goes_to_the_ranks_unchanged(tmp_path) -> None:
    seen, _, _ = _pin(tmp_path / "missing")
    assert seen == [str(tmp_path / "missing")]  # the ranks report the error, all alike


def test_dp_replicas_that_disagree_are_all_sent_back_to_the_served_iteration(ckpt_copy) -> None:
    run = ckpt_copy("fp32_tp1")
    calls: list[tuple[str, Any]] = []

    async def original(manager: Any, obj: Any, request: Any = None) -> tuple[bool, str, list]:
        calls.append((obj.model_path, obj.weight_version))
        if len(calls) == 1:  # replica 0 loaded it, replica 1 failed
            return False, "...: now serving iteration 10 (x) on every TP rank. | Failed ...", [0, 0]
        return True, "Succeeded ... | Succeeded ...", [0, 0]

    obj = SimpleNamespace(
        model_path=str(run), load_format="megatron", weight_version="v2", abort_all_requests=True
    )
    ok, message, _ = asyncio.run(reload.pin_reload_iteration(original, _Manager(), obj, None))
    assert calls == [(str(run / "iter_0000010"), "v2"), ("/run/iter_0000010", None)]
    assert not ok
    assert "The reload held on some DP replicas only; every DP replica was sent back to " in message


def test_weight_name_filter_is_refused_explicitly() -> None:
    updater = SimpleNamespace(
        get_model=lambda: object(), model_config=SimpleNamespace(model_path="/m")
    )
    ok, message = reload.reload_megatron(updater, "/x", weight_name_filter=lambda n: True)
    assert not ok
    assert message.startswith("weight_name_filter is not supported with --load-format megatron")
    assert message.endswith("Still serving /m.")


def test_reload_with_pipeline_stages_is_refused(monkeypatch) -> None:
    import sglang.srt.runtime_context as rc

    monkeypatch.setattr(rc, "get_parallel", lambda: SimpleNamespace(pp_size=2))
    served = SimpleNamespace(iter_dir=Path("/run/iter_0000010"), iteration_label="10")
    model = SimpleNamespace(**{reload.SERVED_ATTR: served})
    updater = SimpleNamespace(
        get_model=lambda: model, model_config=SimpleNamespace(model_path="/run")
    )
    ok, message = reload.reload_megatron(updater, "/run")
    assert not ok and "hot reload is refused with --pp-size 2" in message
    assert message.endswith("Still serving iteration 10 (/run/iter_0000010).")


@pytest.mark.parametrize(
    "device,asked,recaptured", [("cuda", True, 1), ("cuda", False, 0), ("cpu", True, 0)]
)
def test_commit_records_the_iteration_and_honours_recapture_cuda_graph(
    megatron_ckpt, device, asked, recaptured
) -> None:
    calls: dict[str, Any] = {"recapture": 0}
    runner = SimpleNamespace(load_config="the runner's load config")
    updater = SimpleNamespace(
        device=device,
        model_config=SimpleNamespace(model_path="/run"),
        get_model=lambda: "model",
        get_model_runner=lambda: runner,
        update_model_fields=lambda model, **fields: calls.update(fields=fields),
        recapture_cuda_graph=lambda: calls.update(recapture=calls["recapture"] + 1),
    )
    target = resolve(megatron_ckpt("fp32_tp1"))
    ok, message = reload._commit(updater, "/run", target, asked)
    assert ok and message.endswith(
        f"now serving iteration 10 ({target.iter_dir}) on every TP rank."
    )
    assert updater.model_config.model_path == str(target.iter_dir)
    assert calls["fields"] == {
        "model_path": str(target.iter_dir),
        "load_format": "megatron",
        "load_config": "the runner's load config",
    }
    assert calls["recapture"] == recaptured


def test_single_rank_agreement_is_the_rank_itself() -> None:
    ranks = TpRanks(SimpleNamespace(rank_in_group=0, world_size=1, cpu_group=None))
    assert ranks.from_first("x") == "x"
    assert ranks.agree(Outcome(False, "why")) == Outcome(False, "why")


def test_run_root_tokenizer_is_found_from_the_pinned_iteration(ckpt_copy) -> None:
    run = ckpt_copy("fp32_tp1")
    shutil.move(run / "iter_0000010" / "tokenizer", run / "tokenizer")
    assert find_tokenizer(resolve(run / "iter_0000010")) == run / "tokenizer"
