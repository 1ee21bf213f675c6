"""Inert stand-ins for every class a DCP ``.metadata`` pickles, and the unpickler that uses them.

Each stand-in (:class:`Pickled`) records its fields by name in the form torch pickles that class:
a dict or a ``(dict, slots)`` pair (BUILD, every dataclass; filled by the C unpickler itself, the
bulk of a parse), a tuple (``TensorProperties.__getstate__``) or constructor arguments (enum
members) for :class:`Positional` ones. Any other form is an unreadable pickle. Nothing is
checked here and nothing of torch's is
instantiated, so a file from another torch release unpickles as long as it names known classes;
``dcp_metadata`` checks the fields. Globals other than these come from ``SafeUnpickler``'s
allow-list; an unknown ``torch.distributed`` class is refused by name.
"""

from __future__ import annotations

import io
import reprlib
from collections.abc import Mapping
from typing import Any, ClassVar

from sglang_megatron_loader.checkpoint.safe_pickle import SafeUnpickler, unreadable_pickle
from sglang_megatron_loader.errors import (
    MegatronLoaderError,
    UnsafePickleError,
)

_META = "torch.distributed.checkpoint.metadata"
_PLANNER = "torch.distributed.checkpoint.planner"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"
_SHARD = "torch.distributed._shard.sharded_tensor.metadata"  # torch <= 2.1 TensorProperties
_MCORE = "megatron.core.dist_checkpointing.strategies.torch"

#: What the reader knows, for refusals.
SUPPORTED = (
    "DCP metadata as torch up to 2.15 writes it (checked on 2.14 and 2.15): TensorProperties "
    "with or without 'strides' (None or contiguous), storage entries without transforms"
)


# -- stand-ins ---------------------------------------------------------------------------------
class Pickled:
    """Inert stand-in for a class ``.metadata`` pickles: its fields by name, no behaviour.

    The fields are the instance's ``__dict__``: the unpickler fills it itself (NEWOBJ then a
    dict BUILD, the way torch's dataclasses pickle, run in C: the bulk of a parse), and a
    ``(dict, slots)`` BUILD sets the slots through :meth:`__setattr__`, which only records them.
    Behaviour and settings are read from the class (``type(obj)``), never through the instance,
    so a pickled field cannot shadow them. ``order`` names the values of a tuple state or of
    constructor arguments (torch's field order, :class:`Positional`); ``strict``: the class
    describes bytes, so an unknown field that is set is refused (see the module docstring);
    ``known`` lists the fields understood.
    """

    qualname: ClassVar[str] = "?"
    order: ClassVar[tuple[str, ...]] = ()
    known: ClassVar[frozenset[str]] = frozenset()
    strict: ClassVar[bool] = False

    @property
    def fields(self) -> dict[str, Any]:
        return self.__dict__

    def __setattr__(self, name: str, value: Any) -> None:  # slot state: recorded, nothing else
        self.__dict__[name] = value

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        return f"<{type(self).qualname} {self.__dict__!r}>"


class Positional(Pickled):
    """A stand-in whose fields may come as constructor arguments (an enum member pickled as
    ``Class(value)``) or as a tuple state (``TensorProperties.__getstate__``)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Positional:  # NEWOBJ / REDUCE
        self = object.__new__(cls)
        if args or kwargs:
            self._put(args, kwargs)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # fields were taken by __new__
        pass

    def __setstate__(self, state: Any) -> None:  # BUILD
        if type(state) is tuple and 2 < len(state) <= len(type(self).order):  # the usual case
            self.__dict__.update(zip(type(self).order, state))
        elif isinstance(state, dict):
            self._put((), state)
        elif (
            isinstance(state, tuple)
            and len(state) == 2
            and all(s is None or isinstance(s, dict) for s in state)
        ):
            for part in state:  # (__dict__, __slots__) state
                self._put((), part or {})
        elif isinstance(state, tuple | list):
            self._put(tuple(state), {})
        else:
            kind = type(state).__name__
            raise TypeError(f"{type(self).qualname}: unexpected pickled state {kind}")

    def _put(self, values: tuple[Any, ...], named: Mapping[Any, Any]) -> None:
        fields, order = self.__dict__, type(self).order
        for i, value in enumerate(values):
            fields[order[i] if i < len(order) else f"[{i}]"] = value
        fields.update(named)


class MetadataRecord(Pickled):
    """``Metadata`` (and megatron-core 0.15's ``MCoreMetadata`` subclass)."""

    order = ("state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version")

    def state_dict_keys(self) -> list[Any]:
        """The keys of ``state_dict_metadata`` without checking them (format detection; call
        it on the class, ``MetadataRecord.state_dict_keys(record)``: a field may shadow it)."""
        entries = self.fields.get("state_dict_metadata")
        return list(entries) if isinstance(entries, dict) else []


class TensorStorageRecord(Pickled):
    order = ("properties", "size", "chunks")
    known, strict = frozenset(order), True


class BytesStorageRecord(Pickled):
    strict = True


class ChunkRecord(Pickled):
    order = ("offsets", "sizes")
    known, strict = frozenset((*order, "strides")), True  # per-chunk strides: as per tensor


class PropertiesRecord(Positional):
    """``TensorProperties``: pickled as a tuple since torch 2.1 (``__getstate__``)."""

    order = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory", "strides")
    known, strict = frozenset(order), True


class IndexRecord(Pickled):
    order = ("fqn", "offset", "index")
    known, strict = frozenset(order), True


class StorageInfoRecord(Pickled):
    order = ("relative_path", "offset", "length", "transform_descriptors")
    known, strict = frozenset(order), True


class EnumRecord(Positional):
    """An enum member, pickled as ``Class(value)``."""

    order = ("value",)


class OtherRecord(Pickled):
    """Pickled beside what is read (``StorageMeta``, planner data): kept, never checked."""


def _standin(base: type[Pickled], qualname: str) -> type[Pickled]:
    return type(qualname.rsplit(".", 1)[-1], (base,), {"qualname": qualname})


_STANDINS: dict[tuple[str, str], type[Pickled]] = {
    (module, name): _standin(base, f"{module}.{name}")
    for base, names in {
        MetadataRecord: ((_META, "Metadata"), (_MCORE, "MCoreMetadata")),
        TensorStorageRecord: ((_META, "TensorStorageMetadata"),),
        BytesStorageRecord: ((_META, "BytesStorageMetadata"),),
        ChunkRecord: ((_META, "ChunkStorageMetadata"),),
        PropertiesRecord: ((_META, "TensorProperties"), (_SHARD, "TensorProperties")),
        IndexRecord: ((_META, "MetadataIndex"),),
        StorageInfoRecord: ((_FILESYSTEM, "_StorageInfo"),),
        EnumRecord: (
            (_META, "_MEM_FORMAT_ENCODING"),
            (_SHARD, "MEM_FORMAT_ENCODING"),
            (_PLANNER, "WriteItemType"),
            (_PLANNER, "LoadItemType"),
        ),
        OtherRecord: (
            (_META, "StorageMeta"),
            (_FILESYSTEM, "_StoragePrefix"),
            *((_PLANNER, n) for n in ("SavePlan", "LoadPlan", "WriteItem", "ReadItem")),
            *((_PLANNER, n) for n in ("TensorWriteData", "BytesIOWriteData")),
            (_MCORE, "MCoreSavePlan"),  # megatron-core <= 0.15, in ``all_local_plans``
        ),
    }.items()
    for module, name in names
}


_size = tuple  # ``torch.Size(values)`` as a plain tuple (checked where it is used)


class _MetadataUnpickler(SafeUnpickler):
    """``SafeUnpickler`` with the stand-ins; records every global the file names."""

    def __init__(self, data: bytes, source: str) -> None:
        extra: dict[tuple[str, str], Any] = {**_STANDINS, ("torch", "Size"): _size}
        super().__init__(io.BytesIO(data), source=source, extra=extra)
        self.names: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        self.names.add(f"{module}.{name}")
        if module.startswith("torch.distributed.") and (module, name) not in _STANDINS:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle global '{module}.{name}': a "
                "torch.distributed class this reader does not know (a newer torch?). It reads "
                f"{SUPPORTED}."
            )
        return super().find_class(module, name)


def unpickle_dcp_metadata(data: bytes, *, source: str) -> tuple[Any, frozenset[str]]:
    """The unpickled stand-ins of ``.metadata`` and the globals it names, unchecked."""
    unpickler = _MetadataUnpickler(data, source)
    try:
        return unpickler.load(), frozenset(unpickler.names)
    except MegatronLoaderError:
        raise
    except Exception as exc:  # any parse failure of untrusted bytes
        raise unreadable_pickle(source, exc) from exc
