"""The true vocabulary of a checkpoint: how many embedding rows are tokens, not padding.

Megatron stores ``padded_vocab_size`` rows (the tokenizer's size rounded up to a multiple of
``make_vocab_size_divisible_by * tensor_model_parallel_size``). ``args.vocab_size`` is only the
``--vocab-size`` flag, which runs with a Hugging Face or SentencePiece tokenizer leave unset; the
true size then lives in the tokenizer. Serving the padding rows as tokens lets them win the
argmax (untrained rows), so the size is taken, in order, from: an explicit override, the
checkpoint's config (``args.vocab_size``, Megatron-Bridge's ``vocab_size``), the tokenizer the
server uses, and only then the stored rows, with a warning naming the override flag.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sglang_megatron_loader.checkpoint.integrity import verdict_dir
from sglang_megatron_loader.errors import UnsupportedCheckpointError, WeightMismatchError

logger = logging.getLogger("sglang_megatron_loader")

OVERRIDE_HINT = "--json-model-override-args '{\"vocab_size\": N}'"


@dataclass(frozen=True)
class Vocab:
    """The served vocabulary size, the rows stored, and where the size came from."""

    size: int
    stored_rows: int
    origin: str  # e.g. "args.vocab_size", "tokenizer /path (250 tokens)"

    def checked(self, source: str) -> Vocab:
        """``self``, once its size is known to fit the stored rows."""
        if not 0 < self.size <= self.stored_rows:
            raise WeightMismatchError(
                f"{source}: a vocabulary of {self.size} tokens ({self.origin}) does not fit the "
                f"{self.stored_rows} rows of 'embedding.word_embeddings.weight'; pass the run's "
                f"tokenizer with --tokenizer-path or set the size with {OVERRIDE_HINT}"
            )
        return self


def megatron_padded_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's ``_vocab_size_with_padding`` (Megatron-Bridge pads the same way)."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)


# A tokenizer folder larger than this is counted every time rather than hashed for the cache.
_CACHE_MAX_BYTES = 256 * 2**20


@lru_cache(maxsize=16)
def tokenizer_vocab_size(folder: str) -> int:
    """``len(tokenizer)`` of a Hugging Face tokenizer folder: what Megatron's HuggingFace
    tokenizer reports as ``vocab_size`` (base vocabulary plus added tokens).

    Building the tokenizer takes ~0.5 s for a real 128K-token vocabulary, and a server start
    asks in the launcher and again in every scheduler process, so the count is kept on disk
    (beside the integrity verdicts, per user) under a digest of the folder's files and the
    transformers version: the same files always give the same count, whatever their path.
    """
    key = _tokenizer_key(folder)
    cache = verdict_dir() if key is not None else None
    entry = cache / f"{key}.vocab" if cache is not None else None
    if entry is not None:
        try:
            text = entry.read_text().strip()
        except OSError:
            text = ""
        if text.isdigit() and int(text) > 0:
            return int(text)
    count = _count_tokens(folder)
    if entry is not None:
        with contextlib.suppress(OSError):
            tmp = entry.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(str(count))
            os.replace(tmp, entry)
    return count


def _tokenizer_key(folder: str) -> str | None:
    """A digest of every file directly in ``folder`` (names and contents) and of the
    transformers version; None for anything but a local folder of moderate size."""
    import importlib.metadata

    path = Path(folder)
    try:
        files = sorted(f for f in path.iterdir() if f.is_file())
        if sum(f.stat().st_size for f in files) > _CACHE_MAX_BYTES:
            return None
        h = hashlib.sha256(f"transformers {importlib.metadata.version('transformers')}".encode())
        for f in files:
            data = f.read_bytes()
            h.update(f"\0{f.name}\0{len(data)}\0".encode())
            h.update(data)
    except (OSError, importlib.metadata.PackageNotFoundError):
        return None
    return h.hexdigest()


def _count_tokens(folder: str) -> int:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # any failure to build it: the caller decides what follows
        raise UnsupportedCheckpointError(
            f"{folder}: cannot load the tokenizer to count its vocabulary "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return len(tok)


def resolve_vocab(
    args: Any,
    *,
    stored_rows: int,
    tokenizer: str | Path | None,
    override: int | None,
    source: str,
    declared_as: str = "args.vocab_size",
) -> Vocab:
    """The true vocabulary; see the module docstring for the order of sources.

    ``declared_as`` names where ``args.vocab_size`` came from (for a Megatron-Bridge save, its
    ``run_config.yaml``)."""
    if override is not None:
        return Vocab(int(override), stored_rows, "override (vocab_size)").checked(source)
    declared = getattr(args, "vocab_size", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return Vocab(declared, stored_rows, declared_as).checked(source)
    if tokenizer is not None:
        n = tokenizer_vocab_size(str(tokenizer))
        vocab = Vocab(n, stored_rows, f"tokenizer {tokenizer} ({n} tokens)").checked(source)
        _check_padding(args, vocab, source)
        return vocab
    logger.warning(
        "%s: the checkpoint does not record its vocabulary size (args.vocab_size is unset, as in "
        "runs with a Hugging Face tokenizer) and no tokenizer was found to count it; serving all "
        "%d stored embedding rows, padding included. Padding rows are untrained and can be "
        "sampled: pass the run's tokenizer with --tokenizer-path, or set the size with %s.",
        source,
        stored_rows,
        OVERRIDE_HINT,
    )
    return Vocab(stored_rows, stored_rows, "stored rows (vocabulary size unknown)")


def _check_padding(args: Any, vocab: Vocab, source: str) -> None:
    """A tokenizer whose size Megatron would not have padded to the stored rows is not the
    run's tokenizer: refuse it rather than serve a vocabulary cut short or padding rows."""
    divisible = getattr(args, "make_vocab_size_divisible_by", None)
    tp = getattr(args, "tensor_model_parallel_size", None)
    if not (isinstance(divisible, int) and isinstance(tp, int) and divisible > 0 and tp > 0):
        return
    if getattr(args, "should_pad_vocab", True) is False:  # Megatron-Bridge without padding
        expected = vocab.size
    else:
        expected = megatron_padded_size(vocab.size, divisible, tp)
    if expected != vocab.stored_rows:
        raise WeightMismatchError(
            f"{source}: the {vocab.origin} would be stored as {expected} embedding rows "
            f"(make_vocab_size_divisible_by={divisible}, tensor_model_parallel_size={tp}), but "
            f"the checkpoint stores {vocab.stored_rows}: it is not the tokenizer this run was "
            f"trained with. Pass the run's tokenizer with --tokenizer-path, or set the size "
            f"with {OVERRIDE_HINT}."
        )
