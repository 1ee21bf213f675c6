"""The true vocabulary of checkpoints that, like real runs with a Hugging Face tokenizer, do
not record ``args.vocab_size`` and store padding rows after the last token."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from make_tokenizer import make_tokenizer

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.cli import main as cli
from sglang_megatron_loader.engine import checkpoint_hf_config, hf_config_for
from sglang_megatron_loader.errors import WeightMismatchError
from sglang_megatron_loader.inspect_ckpt import inspect
from sglang_megatron_loader.vocab import megatron_padded_size, resolve_vocab


def test_fixtures_record_no_vocab_size_and_store_padding(megatron_ckpt) -> None:
    with MegatronCheckpoint(megatron_ckpt("no_tokenizer_bf16_tp2")) as ckpt:
        assert ckpt.args.vocab_size is None
        assert ckpt.args.tokenizer_type == "HuggingFaceTokenizer"
        assert ckpt.tensors["embedding.word_embeddings.weight"].shape[0] == 256  # 250 padded


def test_vocab_from_the_checkpoints_own_tokenizer(megatron_ckpt, caplog) -> None:
    root = megatron_ckpt("fp32_tp1")
    assert (root / "iter_0000010" / "tokenizer" / "tokenizer.json").is_file()
    with caplog.at_level(logging.WARNING, logger="sglang_megatron_loader"):
        cfg = hf_config_for(root)
    assert cfg.vocab_size == 250 and cfg.megatron_padded_vocab_size == 256
    assert "tokenizer" in cfg.megatron_vocab_origin and "250 tokens" in cfg.megatron_vocab_origin
    assert not caplog.records


def test_vocab_from_the_given_tokenizer(megatron_ckpt, served_tokenizer) -> None:
    name = "no_tokenizer_bf16_tp2"
    cfg = hf_config_for(megatron_ckpt(name), tokenizer=str(served_tokenizer(name)))
    assert cfg.vocab_size == 250 and cfg.megatron_padded_vocab_size == 256


def test_no_tokenizer_serves_padded_rows_with_a_warning_naming_the_fix(
    megatron_ckpt, caplog
) -> None:
    with caplog.at_level(logging.WARNING, logger="sglang_megatron_loader"):
        cfg = hf_config_for(megatron_ckpt("no_tokenizer_bf16_tp2"))
    assert cfg.vocab_size == 256
    (record,) = caplog.records
    assert "--tokenizer-path" in record.message and "vocab_size" in record.message
    assert "padding" in record.message


def test_override_wins_over_every_other_source(megatron_ckpt, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="sglang_megatron_loader"):
        cfg = hf_config_for(megatron_ckpt("no_tokenizer_bf16_tp2"), {"vocab_size": 250})
    assert cfg.vocab_size == 250 and not caplog.records


def test_a_tokenizer_the_run_did_not_train_with_is_refused(megatron_ckpt, tmp_path) -> None:
    # 100 tokens would be padded to 128 rows at TP1 (divisible by 128); the save has 256
    small = make_tokenizer(tmp_path / "small", 100)
    with pytest.raises(WeightMismatchError, match=r"would be stored as 128 .* stores 256"):
        hf_config_for(megatron_ckpt("fp32_tp1"), tokenizer=str(small))
    big = make_tokenizer(tmp_path / "big", 300)
    with pytest.raises(WeightMismatchError, match=r"300 tokens.*does not fit the 256"):
        hf_config_for(megatron_ckpt("fp32_tp1"), tokenizer=str(big))


def test_megatron_padding_rule() -> None:
    assert megatron_padded_size(250, 128, 1) == 256
    assert megatron_padded_size(128256, 128, 8) == 129024  # Llama-3 saved at TP8
    assert megatron_padded_size(300, 32, 2) == 320


def test_args_vocab_size_wins_when_recorded(megatron_ckpt, tmp_path) -> None:
    with MegatronCheckpoint(megatron_ckpt("fp32_tp1")) as ckpt:
        args = ckpt.args
        args.vocab_size = 240  # as with --vocab-size
        v = resolve_vocab(args, stored_rows=256, tokenizer=None, override=None, source="x")
        assert (v.size, v.origin) == (240, "args.vocab_size")
        assert checkpoint_hf_config(ckpt).vocab_size == 240


def test_export_and_inspect_use_the_true_vocabulary(
    megatron_ckpt, served_tokenizer, tmp_path: Path, capsys
) -> None:
    from safetensors import safe_open

    name = "no_tokenizer_bf16_tp2"
    root, tok = megatron_ckpt(name), served_tokenizer(name)
    out = tmp_path / "hf"
    assert cli(["export", str(root), str(out), "--tokenizer", str(tok)]) == 0
    with safe_open(out / "model-00001-of-00001.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape()[0] == 250
        assert f.get_slice("lm_head.weight").get_shape()[0] == 250
    info, _ = inspect(str(root), tokenizer=tok)
    want = {"served": 250, "stored_rows": 256, "from": f"tokenizer {tok} (250 tokens)"}
    assert info["vocab"] == want
    assert cli(["inspect", str(root), "--tokenizer", str(tok)]) == 0
    assert "vocab        250 tokens served of 256 stored rows" in capsys.readouterr().out


def test_the_tokenizer_count_is_kept_per_content_not_per_path(tmp_path, monkeypatch) -> None:
    """The count is kept on disk under a digest of the tokenizer's files: a copy elsewhere is
    not rebuilt, a changed file is, and a damaged kept count is ignored."""
    from sglang_megatron_loader import vocab
    from sglang_megatron_loader.checkpoint.integrity import VERDICT_ENV

    monkeypatch.setenv(VERDICT_ENV, str(tmp_path / "verdicts"))
    built: list[str] = []
    count = vocab._count_tokens
    monkeypatch.setattr(vocab, "_count_tokens", lambda f: built.append(f) or count(f))

    def size(folder: Path) -> int:
        vocab.tokenizer_vocab_size.cache_clear()
        return vocab.tokenizer_vocab_size(str(folder))

    first = make_tokenizer(tmp_path / "a", 250)
    assert size(first) == 250 and built == [str(first)]
    copy = make_tokenizer(tmp_path / "b", 250)  # same files, another path
    assert size(copy) == 250 and built == [str(first)]
    other = make_tokenizer(tmp_path / "c", 300)
    assert size(other) == 300 and built[-1] == str(other)
    (entry,) = [p for p in (tmp_path / "verdicts").glob("*.vocab") if p.read_text() == "250"]
    entry.write_text("garbage")
    assert size(copy) == 250 and built[-1] == str(copy)
    assert entry.read_text() == "250"
