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
    """``megatron_ckpt(name)`` -> run root of a real checkpoint of that variant.

    All variants are generated together on first use (one interpreter, ~1-2 min on 2 cores)
    and cached under a folder keyed by the generator's source and megatron/torch versions.
    """
    from make_megatron_checkpoint import VARIANTS, ensure_fixtures

    paths: dict[str, Path] = {}

    def get(name: str) -> Path:
        if not paths:
            paths.update(ensure_fixtures(fixture_cache, list(VARIANTS)))
        return paths[name]

    return get


@pytest.fixture(scope="session")
def legacy_ckpt(fixture_cache: Path, megatron_ckpt: Callable[[str], Path]) -> Callable[[str], Path]:
    """``legacy_ckpt(name)`` -> run root of a real legacy ``torch``-format checkpoint (Megatron-LM
    ``--ckpt-format torch``) holding the weights of its torch_dist base variant, with that
    variant's reference file beside it. Generated on first use (~15 s per variant)."""
    from make_legacy_checkpoint import LEGACY_VARIANTS, ensure_legacy_fixtures, legacy_cache_dir

    def get(name: str) -> Path:
        base = LEGACY_VARIANTS[name].base
        bases = {base: megatron_ckpt(base)}
        return ensure_legacy_fixtures(legacy_cache_dir(fixture_cache), bases, [name])[name]

    return get


@pytest.fixture(scope="session")
def served_tokenizer(fixture_cache: Path) -> Callable[[str], Path | None]:
    """``served_tokenizer(name)`` -> the tokenizer a user passes to serve variant ``name``
    (``--tokenizer-path``): None where the checkpoint holds its own ``tokenizer/``, else the
    run's tokenizer written outside the checkpoint."""
    from make_megatron_checkpoint import VARIANTS
    from make_tokenizer import make_tokenizer

    def get(name: str) -> Path | None:
        variant = VARIANTS[name]
        if variant.save_tokenizer:
            return None
        folder = fixture_cache / "tokenizers" / f"vocab{variant.vocab_size}"
        if not (folder / "tokenizer.json").is_file():
            make_tokenizer(folder, variant.vocab_size)
        return folder

    return get


@pytest.fixture
def ckpt_copy(megatron_ckpt: Callable[[str], Path], tmp_path: Path) -> Callable[[str], Path]:
    """A private copy of a fixture run root, for tests that damage it."""

    def copy(name: str) -> Path:
        src = megatron_ckpt(name)
        dest = tmp_path / name
        shutil.copytree(src, dest)
        shutil.copy(f"{src}.reference.pt", f"{dest}.reference.pt")
        return dest

    return copy
