"""The package's own exception types. Every message is written for the user: it names the
file, the key, what was expected and what was found, and, where there is one, the fix."""

from __future__ import annotations


class MegatronLoaderError(Exception):
    """Base class for every error this package raises on purpose."""


class CheckpointNotFoundError(MegatronLoaderError):
    """The path is not a Megatron checkpoint (missing, empty, a file, no iteration)."""


class IncompleteCheckpointError(MegatronLoaderError):
    """The save did not finish (no ``metadata.json``) or a data file is missing/short."""


class CorruptCheckpointError(MegatronLoaderError):
    """A file of the checkpoint cannot be parsed or disagrees with its own metadata."""


class UnsafePickleError(MegatronLoaderError):
    """A pickle in the checkpoint references a global outside the allow-list."""


class UnsupportedCheckpointError(MegatronLoaderError):
    """A checkpoint format or model architecture this package does not serve (yet)."""


class ShardingError(MegatronLoaderError):
    """A dimension cannot be split across the requested tensor-parallel size."""


class WeightMismatchError(MegatronLoaderError):
    """Parameters and checkpoint tensors do not match one to one, or shapes disagree."""
