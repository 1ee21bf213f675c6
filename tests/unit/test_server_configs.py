"""Every file in server_configs/ is accepted by SGLang's own argument parser with the plugin."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).parents[2] / "server_configs").glob("*.yaml"))


def parse(argv: list[str]) -> argparse.Namespace:
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger

    from sglang_megatron_loader.sglang.plugin import register

    register()  # what the entry point does in every SGLang process
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser.parse_args(ConfigArgumentMerger(parser).merge_config_with_args(argv))


def test_there_are_configs_for_the_documented_cases() -> None:
    names = {c.name for c in CONFIGS}
    assert {
        "llama3_8b_tp1.yaml",
        "llama3_70b_tp8.yaml",
        "llama3_70b_two_node_tp16.yaml",
        "llama3_8b_pp2.yaml",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_is_accepted_and_command_line_overrides_it(config: Path) -> None:
    args = parse(["--config", str(config), "--model-path", "/ckpts/mine"])
    assert args.load_format == "megatron"
    assert args.model_path == "/ckpts/mine"
    assert args.tp_size >= 1
    documented = (config.parent / "README.md").read_text()
    assert config.name in documented
