"""One allow-listing unpickler for every pickle found in a checkpoint.

Nothing outside ``_ALLOWED`` is ever imported or called. ``megatron.*`` classes (enums, configs
saved inside ``args``) become inert :class:`MegatronPlaceholder` objects, so megatron-core need
not be installed and cannot be reached through a hostile file. Any other global raises
:class:`UnsafePickleError` naming the file and the global. DCP ``.metadata`` adds its own inert
stand-ins for torch's DCP classes on top (``dcp_metadata``), never torch's classes themselves.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import pathlib
import pickle
import signal
import types
from collections.abc import Callable
from typing import Any

import torch

from sglang_megatron_loader.errors import CorruptCheckpointError, UnsafePickleError


class MegatronPlaceholder:
    """Inert stand-in for a pickled ``megatron.*`` object (enum member, config dataclass).

    Keeps the constructor arguments and state for display; has no behaviour.
    """

    _qualname = "megatron.?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        inner = ", ".join(repr(a) for a in getattr(self, "args", ()))
        return f"<{self._qualname}({inner})>"


_PLACEHOLDERS: dict[str, type] = {}


def _placeholder(qualname: str) -> type:
    if qualname not in _PLACEHOLDERS:
        _PLACEHOLDERS[qualname] = type(
            qualname.rsplit(".", 1)[-1], (MegatronPlaceholder,), {"_qualname": qualname}
        )
    return _PLACEHOLDERS[qualname]


_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class StorageType:
    """What a pickled ``torch.XStorage`` global resolves to: only its dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _dtype_globals() -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {}
    for name in dir(torch):
        value = getattr(torch, name)
        if isinstance(value, torch.dtype):
            out[("torch", name)] = value
    for name, dtype in _STORAGE_DTYPES.items():
        out[("torch", name)] = StorageType(dtype)
    return out


def _plain_globals() -> dict[tuple[str, str], Any]:
    return {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("argparse", "Namespace"): argparse.Namespace,
        ("types", "SimpleNamespace"): types.SimpleNamespace,
        # Megatron-LM >= 0.16 args hold exit_signal=signal.SIGTERM (an IntEnum member)
        ("signal", "Signals"): signal.Signals,
        ("pathlib", "PosixPath"): pathlib.PurePosixPath,
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
        ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("builtins", "object"): object,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "contiguous_format"): torch.contiguous_format,
        ("torch", "channels_last"): torch.channels_last,
        ("torch", "preserve_format"): torch.preserve_format,
        ("torch", "strided"): torch.strided,
        ("torch", "layout"): torch.layout,
        ("torch.serialization", "_get_layout"): _layout_by_name,
        ("torch", "memory_format"): torch.memory_format,
        ("io", "BytesIO"): io.BytesIO,
        ("_io", "BytesIO"): io.BytesIO,
    }


def _layout_by_name(name: str) -> torch.layout:
    """``torch.serialization._get_layout`` without its lookup side effects."""
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if name not in layouts:
        raise pickle.UnpicklingError(f"unknown torch layout {name!r}")
    return layouts[name]


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    """``copyreg._reconstructor`` restricted to classes the allow-list already produced."""
    if base is not object or not isinstance(cls, type):
        raise pickle.UnpicklingError(f"copyreg._reconstructor with base {base!r}")
    return object.__new__(cls)


_ALLOWED: dict[tuple[str, str], Any] = {**_plain_globals(), **_dtype_globals()}


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns allow-listed globals.

    ``extra`` adds globals for one use (the tensor rebuild hooks of a torch zip);
    ``persistent_load`` is passed through for torch's storage references.
    """

    def __init__(
        self,
        file: io.BufferedIOBase | io.BytesIO,
        *,
        source: str,
        extra: dict[tuple[str, str], Any] | None = None,
        persistent_load: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(file)
        self._source = source
        self._extra = extra or {}
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        # Protocol <= 2 pickles (torch.save's default) name Python 2 modules: '__builtin__.set'.
        # The default find_class maps them; an override must do it itself.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in self._extra:
            return self._extra[key]
        if key in _ALLOWED:
            return _ALLOWED[key]
        if module == "megatron" or module.startswith("megatron."):
            return _placeholder(f"{module}.{name}")
        raise UnsafePickleError(
            f"{self._source}: refusing to unpickle global '{module}.{name}': it is not on the "
            "allow-list of types a Megatron checkpoint may contain (the file may be hostile or "
            "from an unsupported writer)"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._persistent(pid)


def safe_loads(data: bytes | io.BufferedIOBase, *, source: str) -> Any:
    """Unpickle a plain pickle through the allow-list (``.metadata``: see ``dcp_metadata``)."""
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        return SafeUnpickler(stream, source=source).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # any parse failure of untrusted bytes
        raise unreadable_pickle(source, exc) from exc


def unreadable_pickle(source: str, exc: Exception) -> CorruptCheckpointError:
    """The error for untrusted bytes that fail to unpickle (every unpickler here says it so)."""
    return CorruptCheckpointError(
        f"{source}: cannot unpickle ({type(exc).__name__}: {exc}); the file is truncated, "
        "damaged or not a pickle"
    )
