"""Serve Megatron-LM checkpoints with SGLang directly: ``--load-format megatron``."""

__version__ = "0.1.0"
