"""Test-only: stub ``sgl_kernel`` for CPU-only SGLang runs (see README.md).

Python imports ``sitecustomize`` at interpreter start-up from the first
directory on ``sys.path`` that has one, so putting ``tests/cpu_stub`` on
``PYTHONPATH`` installs this hook in the launcher and in every process
SGLang spawns (multiprocessing "spawn" children start a fresh interpreter
that inherits the environment).

Mirrors ``maybe_stub_sgl_kernel()`` in ``sglang/test/test_utils.py``: if the
real ``sgl_kernel`` cannot be imported (the PyPI wheel is a CUDA build that
fails on ``libcuda.so.1``), every ``sgl_kernel`` / ``sgl_kernel.*`` import
returns a module whose attributes are ``MagicMock``s. The check is done
without importing torch (only ``ctypes.CDLL("libcuda.so.1")``), so start-up
of unrelated interpreters is not slowed down.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys


def _real_sgl_kernel_usable() -> bool:
    """Cheap check, without importing torch: the real wheel needs libcuda."""
    if importlib.util.find_spec("sgl_kernel") is None:
        return False
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


class _SglKernelLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        from unittest.mock import MagicMock

        module.__getattr__ = lambda name: MagicMock()


class _SglKernelFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "sgl_kernel" or fullname.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(fullname, _SglKernelLoader(), is_package=True)
        return None


def _install() -> None:
    # SGLANG_TEST_CPU_STUB: "0" disables the stub, "force" stubs even when
    # libcuda is present; default: stub only when the real wheel cannot work.
    mode = os.environ.get("SGLANG_TEST_CPU_STUB", "auto")
    if mode == "0":
        return
    # by name: this file may also be exec'd by path (serve_helpers.enable_in_process)
    if any(type(f).__name__ == "_SglKernelFinder" for f in sys.meta_path):
        return
    if mode != "force" and _real_sgl_kernel_usable():
        return
    sys.meta_path.insert(0, _SglKernelFinder())


_install()
