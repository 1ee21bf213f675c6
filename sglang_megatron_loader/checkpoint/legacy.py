"""Read Megatron-LM's legacy per-rank ``torch`` format (``--ckpt-format torch``).

``iter_X/mp_rank_{TT}/model_optim_rng.pt`` (``mp_rank_{TT}_{PPP}`` with pipeline parallelism,
``..._{EEE}`` with expert parallelism; which files exist: ``legacy_experts``) is one
``torch.save`` per (TP, PP, EP) rank of (expert-)data-parallel rank 0 holding ``args``,
``checkpoint_version``, ``iteration``, ``model`` (``model0``, ``model1``, ... with virtual
pipeline stages), ``optimizer``, ``opt_param_scheduler`` and ``rng_state``. ``distrib_optim.pt``
beside it (distributed optimizer) is never opened.

Each file's ``data.pkl`` is unpickled through the allow-list with tensors only *named*
(:meth:`TorchZip.skim`): no storage entry is touched until a model tensor's bytes are read, so
optimizer and RNG bytes are never read at all. The per-rank tensors are merged by
``legacy_layout`` into the global tensors a ``torch_dist`` checkpoint of the same model stores
(same keys and shapes), each rank's share a chunk, so the planner, loader, export and inspect
work unchanged: :class:`LegacyCheckpoint` is a :class:`DcpCheckpoint` whose chunks point into
the per-rank files.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any, BinaryIO

from sglang_megatron_loader.checkpoint import legacy_layout as layout
from sglang_megatron_loader.checkpoint.dcp import (
    Chunk,
    DcpCheckpoint,
    ReadStats,
    TensorInfo,
    _contiguous_strides,
)
from sglang_megatron_loader.checkpoint.legacy_experts import RankLayout
from sglang_megatron_loader.checkpoint.torchzip import LazyTensor, StorageRef, TensorRef, TorchZip
from sglang_megatron_loader.errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    MegatronLoaderError,
    UnsupportedCheckpointError,
)

FILENAME = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_\d{2}(_\d{3}){0,2}$")
_FIRST = ("mp_rank_00", "mp_rank_00_000", "mp_rank_00_000_000")  # TP, PP and EP rank 0
_MODEL_KEY = re.compile(r"^model(\d*)$")
MIN_CHECKPOINT_VERSION = 2.0


class _InertNumpy:
    """Stand-in for the numpy objects of Megatron's saved RNG state (``np.random.get_state()``);
    keeps nothing and calls nothing: the loader never needs RNG state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _inert(*args: Any) -> _InertNumpy:
    return _InertNumpy()


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for raw bytes (numpy array data)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CorruptCheckpointError(f"_codecs.encode of {type(text).__name__} as {encoding!r}")
    return text.encode("latin1")


_RNG_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1,
    **{(m, "_reconstruct"): _inert for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _inert for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): _InertNumpy,
    ("numpy", "dtype"): _InertNumpy,
}


def rank_dirs(iter_dir: Path) -> dict[str, Path]:
    """``{name: folder}`` of the ``mp_rank_*`` folders (which names fit depends on the args)."""
    return {
        child.name: child
        for child in sorted(iter_dir.iterdir())
        if _RANK_DIR.match(child.name) and child.is_dir()
    }


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts (the non-mcore model's state) -> dotted keys."""
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten(value, name + ".", out)
        else:
            out[name] = value
    return out


class LegacyCheckpoint(DcpCheckpoint):
    """The per-rank files of one iteration folder as global tensors read by slice.

    Built like :class:`DcpCheckpoint` (``tensors``, ``stats``, ``read_slice``), with ``common``
    (``args``, ``checkpoint_version``, ``iteration``, ...) from the first rank's file.
    """

    def __init__(self, folder: Path) -> None:  # noqa: D107 - the base class reads .metadata
        self.folder = folder
        self.bytes_items: dict[str, tuple[str, int, int]] = {}
        self.stats = ReadStats()
        self._files: dict[str, BinaryIO] = {}
        self._zips: dict[tuple[str, int], TensorRef] = {}
        self._lock = threading.Lock()
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        dirs = rank_dirs(self.folder)
        first = next((dirs[n] for n in _FIRST if n in dirs), None)
        if first is None:
            raise CorruptCheckpointError(
                f"{self.folder}: no {', '.join(_FIRST[:-1])} or {_FIRST[-1]} folder"
            )
        state, zf = self._skim(first / FILENAME)
        self.common = {k: v for k, v in state.items() if not self._heavy(k)}
        args = self._check_top(state, first / FILENAME)
        ranks = self._rank_layout(args, first / FILENAME)
        self.layout = (ranks.tp, ranks.pp)
        self._check_rank_dirs(dirs, ranks)
        zips = {}
        for k in sorted(ranks.files):  # (tp, pp, ep) rank of each file
            folder = dirs[ranks.folder(*k)]
            zips[k] = (state, zf) if folder == first else self._skim(folder / FILENAME)
        local: list[layout.LocalTensor] = []
        lazies: dict[layout.LocalTensor, tuple[LazyTensor, TorchZip]] = {}
        vpps = set()
        self.other_bytes = 0  # optimizer, RNG and other tensors in the files: never read
        for (t, p, e), (st, z) in sorted(zips.items()):
            rest = {k: v for k, v in st.items() if not _MODEL_KEY.match(str(k))}
            self.other_bytes += sum(s.numel * s.dtype.itemsize for s in _storages(rest).values())
            chunks = self._model_chunks(st, z.source)
            vpps.add(len(chunks))
            for v, model in enumerate(chunks):
                for key, value in model.items():
                    if isinstance(value, LazyTensor):
                        lt = layout.LocalTensor(t, p, v, key, value.dtype, value.size, z.source, e)
                        local.append(lt)
                        lazies[lt] = (value, z)
        if len(vpps) != 1:
            raise CorruptCheckpointError(
                f"{self.folder}: the per-rank files hold different numbers of model chunks "
                f"({sorted(vpps)}); a virtual-pipeline save writes model0..modelN in every file"
            )
        merged = layout.merge(
            local,
            tp=ranks.tp,
            pp=ranks.pp,
            vpp=vpps.pop(),
            num_layers=int(args.num_layers),
            gated=bool(getattr(args, "swiglu", False)),
            ep=ranks.ep,
            etp=ranks.expert_tp,
            num_experts=ranks.num_experts,
        )
        self.tensors = {k: self._tensor_info(g, lazies) for k, g in merged.items()}

    @staticmethod
    def _heavy(key: str) -> bool:
        return bool(_MODEL_KEY.match(key)) or key in ("optimizer", "rng_state")

    def _skim(self, path: Path) -> tuple[dict[str, Any], TorchZip]:
        rel = str(path.relative_to(self.folder))
        try:
            f = open(path, "rb")  # noqa: SIM115 - kept open for the reader's lifetime
        except FileNotFoundError as exc:
            raise IncompleteCheckpointError(
                f"{path}: missing; every mp_rank_* folder of a legacy checkpoint holds {FILENAME}"
            ) from exc
        self._files[rel] = f
        zf = TorchZip(f, 0, os.fstat(f.fileno()).st_size, source=str(path))
        state = zf.skim(extra=_RNG_GLOBALS)
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"{path}: expected a dict, found {type(state).__name__}")
        return state, zf

    def _check_top(self, state: dict[str, Any], path: Path) -> Any:
        args = state.get("args")
        if args is None or not hasattr(args, "tensor_model_parallel_size"):
            raise CorruptCheckpointError(
                f"{path}: no Megatron 'args' (keys: {sorted(map(str, state))[:10]}); the model "
                "config cannot be derived. Save with Megatron-LM's training loop, which stores "
                "args."
            )
        self._refuse_non_mcore(state, path)
        version = state.get("checkpoint_version", 0)
        if not isinstance(version, int | float) or version < MIN_CHECKPOINT_VERSION:
            raise UnsupportedCheckpointError(
                f"{path}: checkpoint_version is {version!r}; versions below "
                f"{MIN_CHECKPOINT_VERSION} store query_key_value rows in an older order that "
                "this loader does not convert. Load and save it once with a current Megatron-LM."
            )
        return args

    @staticmethod
    def _rank_layout(args: Any, path: Path) -> RankLayout:
        """The TP/PP/EP/expert-TP layout the args give, and so the files the save wrote."""
        tp, pp = int(args.tensor_model_parallel_size), int(args.pipeline_model_parallel_size)
        ep = int(getattr(args, "expert_model_parallel_size", None) or 1)
        etp = int(getattr(args, "expert_tensor_parallel_size", None) or tp)  # mcore's default
        num_experts = int(getattr(args, "num_experts", None) or 0)
        if ep > 1 and etp != tp and pp > 1 and getattr(args, "use_tp_pp_dp_mapping", False):
            raise UnsupportedCheckpointError(
                f"{path}: use_tp_pp_dp_mapping with pipeline and expert parallelism and "
                f"expert_tensor_parallel_size={etp} != tensor_model_parallel_size={tp}: which "
                "file holds which experts is not established for that rank order; re-save "
                "with --ckpt-format torch_dist"
            )
        try:
            return RankLayout(tp, pp, ep, etp, num_experts)
        except MegatronLoaderError as exc:
            raise type(exc)(f"{path}: {exc}") from None

    def _refuse_non_mcore(self, state: dict[str, Any], path: Path) -> None:
        """The pre-mcore GPT model stores ``language_model.*`` (nested dicts): refused by name."""
        for key in state:
            if _MODEL_KEY.match(str(key)) and isinstance(state[key], dict):
                flat = _flatten(state[key], f"{key}.", {})
                old = next((k for k in flat if ".language_model." in f".{k}"), None)
                if old is not None:
                    raise UnsupportedCheckpointError(
                        f"{path}: key '{old}' belongs to Megatron-LM's older non-mcore GPT model "
                        "(language_model.*), which this loader does not support; convert the "
                        "checkpoint to an mcore model (Megatron-LM tools/checkpoint) first"
                    )

    def _check_rank_dirs(self, dirs: dict[str, Path], ranks: RankLayout) -> None:
        """The folders are exactly those the args' layout writes (:attr:`RankLayout.files`)."""
        expected = {ranks.folder(*k) for k in ranks.files}
        missing = sorted(expected - set(dirs))
        if missing:
            raise IncompleteCheckpointError(
                f"{self.folder}: args say {ranks.describe()}, but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing; the save is incomplete or "
                "the copy partial"
            )
        extra = sorted(set(dirs) - expected)
        if extra:
            raise CorruptCheckpointError(
                f"{self.folder}: folders {extra} do not fit the layout the args give "
                f"({ranks.describe()}; expected {sorted(expected)})"
            )

    def _model_chunks(self, state: dict[str, Any], source: str) -> list[dict[str, Any]]:
        found = {}
        for key in state:
            hit = _MODEL_KEY.match(str(key))
            if hit:
                found[int(hit.group(1)) if hit.group(1) else -1] = state[key]
        if list(found) == [-1]:
            chunks = [found[-1]]
        elif found and -1 not in found and sorted(found) == list(range(len(found))):
            chunks = [found[i] for i in range(len(found))]
        else:
            raise CorruptCheckpointError(
                f"{source}: expected 'model' or 'model0'..'modelN' (virtual pipeline), found "
                f"{sorted(str(k) for k in state if _MODEL_KEY.match(str(k)))}"
            )
        for c in chunks:
            if not isinstance(c, dict):
                raise CorruptCheckpointError(
                    f"{source}: model state is {type(c).__name__}, expected a dict"
                )
        return chunks

    def _tensor_info(
        self,
        g: layout.GlobalTensor,
        lazies: dict[layout.LocalTensor, tuple[LazyTensor, TorchZip]],
    ) -> TensorInfo:
        """Each piece becomes a chunk whose byte range is exactly its rows in the rank's file."""
        chunks = []
        for piece in g.pieces:
            lazy, zf = lazies[piece.source]
            if not lazy.is_contiguous():
                raise UnsupportedCheckpointError(
                    f"{zf.source}: key '{piece.source.key}' is stored non-contiguous (stride "
                    f"{lazy.stride}); only contiguous tensors are read"
                )
            ref = zf.resolve(lazy)
            row = 1
            for d in lazy.size[1:]:
                row *= d
            first = lazy.storage_offset + piece.row0 * row
            numel = 1
            for d in piece.sizes:
                numel *= d
            itemsize = lazy.dtype.itemsize
            rel = str(Path(zf.source).relative_to(self.folder))
            start = ref.storage.file_offset + first * itemsize
            chunk = Chunk(piece.offsets, piece.sizes, rel, start, numel * itemsize)
            storage = StorageRef(start, numel * itemsize, lazy.dtype, numel)
            strides = _contiguous_strides(piece.sizes)
            self._zips[(rel, start)] = TensorRef(storage, 0, piece.sizes, strides)
            chunks.append(chunk)
        return TensorInfo(g.key, g.dtype, g.shape, tuple(chunks))

    def _locate(self, info: TensorInfo, chunk: Chunk) -> TensorRef:
        return self._zips[(chunk.relative_path, chunk.offset)]

    def file_sizes(self) -> dict[str, int]:
        """Every per-rank file (optimizer and RNG state share them; distrib_optim.pt excluded)."""
        return {rel: os.fstat(f.fileno()).st_size for rel, f in sorted(self._files.items())}


def _storages(obj: Any, out: dict[str, LazyTensor] | None = None) -> dict[str, LazyTensor]:
    """The distinct storages of the skimmed tensors inside ``obj`` (dicts, lists, tuples)."""
    out = {} if out is None else out
    if isinstance(obj, LazyTensor):
        out[obj.storage_key] = obj
    elif isinstance(obj, dict):
        for v in obj.values():
            _storages(v, out)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _storages(v, out)
    return out
