"""Shared fixtures: real megatron-core checkpoints, generated once per fixture-script version."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS / "fixtures"))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


@pytest.fixture(scope="session")
def fixture_cache() -> Path:
    from make_megatron_checkpoint import fixture_cache_dir

    root = fixture_cache_dir(TESTS / ".fixture_cache")
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def megatron_ckpt(fixture_cache: Path) -> Callable[[str], Path]:
    """``megatron_ckpt(name)`` -> run root of a real checkpoint of that variant (cached)."""
    from make_megatron_checkpoint import ensure_fixture

    return lambda name: ensure_fixture(fixture_cache, name)


@pytest.fixture
def ckpt_copy(megatron_ckpt: Callable[[str], Path], tmp_path: Path) -> Callable[[str], Path]:
    """A private copy of a fixture run root, for tests that damage it."""

    def copy(name: str) -> Path:
        dest = tmp_path / name
        shutil.copytree(megatron_ckpt(name), dest)
        return dest

    return copy
