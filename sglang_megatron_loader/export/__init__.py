"""Exporters (HF safetensors folder, plain PyTorch ``.pt``): clients of the reader and planner."""
