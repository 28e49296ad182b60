"""Read Hugging Face / torch checkpoint files into numpy, without torch.

* ``*.safetensors`` (and sharded ``*.safetensors.index.json``) via the safetensors library.
* ``pytorch_model.bin`` / ``*.pth`` / ``*.pt``: torch's zip format and the legacy
  (pre-1.6) pickle format, read by a restricted unpickler that can only rebuild tensors and
  ordered dicts. Any other global in the pickle is refused, so a downloaded checkpoint cannot
  run code (plain ``pickle.load`` on such a file can).

Then :func:`fill_module` puts a flat ``{path: array}`` dict into an abstract nnx module
(built with ``nnx.eval_shape``), checking every shape and that nothing is missing.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


# --------------------------------------------------------------------------- locating files

def resolve(name_or_path: str | os.PathLike, allow_patterns: Iterable[str] = (
        "*.json", "*.safetensors", "*.bin", "*.txt", "*.model")) -> Path:
    """A local directory or file as is; otherwise a Hugging Face hub id, fetched (or found in
    the local hub cache when ``HF_HUB_OFFLINE=1``) with ``huggingface_hub``."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise CheckpointError(f"checkpoint path {name_or_path} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"{name_or_path} is not a local path and huggingface_hub "
                              "is not installed") from e
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=list(allow_patterns)))
    except Exception as e:  # network, auth, unknown repo: one line for the user
        raise CheckpointError(f"{name_or_path} is not a local path and could not be fetched "
                              f"from the Hugging Face hub: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e


def read_config(directory: Path) -> dict:
    cfg = Path(directory) / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{directory} has no config.json")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is not valid JSON: {e}") from e


def weights_file(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    raise CheckpointError(f"{directory} has none of {', '.join(WEIGHT_FILES)}")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Any supported weights file (or a directory holding one) -> ``{name: np.ndarray}``."""
    path = Path(path)
    if path.is_dir():
        path = weights_file(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        if path.name.endswith(".index.json"):
            index = json.loads(path.read_text())
            out: dict[str, np.ndarray] = {}
            for shard in sorted(set(index["weight_map"].values())):
                out.update(load_state_dict(path.parent / shard))
            return out
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file
            return dict(load_file(str(path)))
        return load_torch_file(path)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- torch pickles

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A torch storage whose bytes are read on demand (zip) or after the pickle (legacy)."""

    def __init__(self, dtype: np.dtype, numel: int, reader: Callable[[], bytes] | None = None):
        self.dtype, self.numel, self._reader, self._array = dtype, numel, reader, None

    def set_bytes(self, data: bytes) -> None:
        self._array = np.frombuffer(data, self.dtype, count=self.numel)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            if self._reader is None:
                raise CheckpointError("tensor storage was never read (truncated file?)")
            self.set_bytes(self._reader())
        return self._array


class _LazyTensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialize(self) -> np.ndarray:
        base = self.storage.array
        item = base.dtype.itemsize
        if not self.size:
            return np.array(base[self.offset])
        last = sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        need = self.offset + 1 + last
        if need > base.size:
            raise CheckpointError(f"tensor of shape {self.size} runs past its storage "
                                  "(truncated file?)")
        view = np.lib.stride_tricks.as_strided(base[self.offset:], shape=self.size,
                                               strides=[s * item for s in self.stride])
        return np.array(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _LazyTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, persistent_load: Callable[[tuple], Any]):
        super().__init__(file)
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only tensors "
                                     "and dicts may be in a checkpoint")

    def persistent_load(self, pid):
        return self._persistent_load(pid)


def _materialize(obj: Any) -> Any:
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, Mapping):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _flatten_state(obj: Any) -> dict[str, np.ndarray]:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` containers and keep arrays."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict) and not isinstance(obj[key], np.ndarray):
                return _flatten_state(obj[key])
        return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    raise CheckpointError(f"expected a dict of tensors, found {type(obj).__name__}")


def load_torch_file(path: Path) -> dict[str, np.ndarray]:
    if zipfile.is_zipfile(path):
        return _flatten_state(_load_torch_zip(path))
    return _flatten_state(_load_torch_legacy(path))


def _load_torch_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise CheckpointError(f"{path} is a zip without data.pkl: not a torch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            kind, storage_type, key, _location, numel = pid[:5]
            if kind != "storage":
                raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")
            if key not in storages:
                entry = f"{prefix}data/{key}"
                if entry not in names:
                    raise CheckpointError(f"{path} is missing tensor data {entry} (truncated?)")
                storages[key] = _Storage(storage_type.dtype, numel,
                                         lambda entry=entry: zf.read(entry))
            return storages[key]

        with zf.open(pkl[0]) as f:
            obj = _RestrictedUnpickler(f, persistent_load).load()
        return _materialize(obj)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_torch_legacy(path: Path) -> Any:
    with open(path, "rb") as f:
        refuse = lambda pid: (_ for _ in ()).throw(pickle.UnpicklingError("unexpected id"))
        try:
            magic = _RestrictedUnpickler(f, refuse).load()
        except Exception as e:
            raise CheckpointError(f"{path} is neither safetensors nor a torch checkpoint") from e
        if magic != _LEGACY_MAGIC:
            raise CheckpointError(f"{path} is not a torch checkpoint (bad magic number)")
        _protocol = _RestrictedUnpickler(f, refuse).load()
        _sys_info = _RestrictedUnpickler(f, refuse).load()
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            kind = pid[0]
            if kind != "storage":
                raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")
            storage_type, key, _location, numel, view = pid[1:6]
            if view is not None:
                raise pickle.UnpicklingError("storage views are not supported")
            if key not in storages:
                storages[key] = _Storage(storage_type.dtype, numel)
            return storages[key]

        obj = _RestrictedUnpickler(f, persistent_load).load()
        keys = _RestrictedUnpickler(f, refuse).load()
        for key in keys:
            header = f.read(8)
            if len(header) < 8:
                raise CheckpointError(f"{path} is truncated")
            (numel,) = struct.unpack("<q", header)
            st = storages[key]
            data = f.read(numel * st.dtype.itemsize)
            if len(data) < numel * st.dtype.itemsize:
                raise CheckpointError(f"{path} is truncated")
            st.set_bytes(data)
        return _materialize(obj)


# --------------------------------------------------------------------------- filling modules

Path_ = tuple[str | int, ...]


def path_key(path: Iterable[Any]) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def fill_module(abstract: nnx.Module, arrays: Mapping[str, np.ndarray],
                what: str = "checkpoint") -> nnx.Module:
    """Return ``abstract`` (from ``nnx.eval_shape``) with every parameter taken from
    ``arrays``, keyed by dotted nnx paths (``blocks.0.attn.query.kernel``). Every parameter
    must be present with its exact shape; extra arrays are an error too, so a mapping bug
    cannot silently leave random or zero weights."""
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    expected = {path_key(p): v for p, v in flat}
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{what} does not fit the model: missing {missing[:6]}"
                              f"{'...' if len(missing) > 6 else ''}, unexpected {extra[:6]}"
                              f"{'...' if len(extra) > 6 else ''}")
    leaves = []
    for p, var in flat:
        key = path_key(p)
        want = var.get_value()
        arr = np.asarray(arrays[key])
        if tuple(arr.shape) != tuple(want.shape):
            raise CheckpointError(f"{what}: {key} has shape {tuple(arr.shape)}, the model "
                                  f"expects {tuple(want.shape)}")
        leaves.append((p, var.replace(jnp.asarray(arr, dtype=want.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


class KeyMapper:
    """Collects ``our_path -> array`` from a Hugging Face state dict, tracking which source
    keys were used so that leftovers can be reported."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], prefix: str = ""):
        self.sd, self.prefix = state_dict, prefix
        self.out: dict[str, np.ndarray] = {}
        self.used: set[str] = set()

    def get(self, key: str) -> np.ndarray:
        full = self.prefix + key
        if full not in self.sd:
            raise CheckpointError(f"checkpoint has no tensor {full}")
        self.used.add(full)
        return np.asarray(self.sd[full])

    def has(self, key: str) -> bool:
        return self.prefix + key in self.sd

    def put(self, ours: str, value: np.ndarray) -> None:
        self.out[ours] = value

    def linear(self, ours: str, theirs: str, transpose: bool = True, bias: bool = True) -> None:
        """torch ``nn.Linear`` weight is [out, in]: transposed to our [in, out]."""
        w = self.get(f"{theirs}.weight")
        self.put(f"{ours}.kernel", w.T if transpose else w)
        if bias:
            self.put(f"{ours}.bias", self.get(f"{theirs}.bias"))

    def layer_norm(self, ours: str, theirs: str) -> None:
        self.put(f"{ours}.scale", self.get(f"{theirs}.weight"))
        self.put(f"{ours}.bias", self.get(f"{theirs}.bias"))

    def unused(self, under: str = "") -> list[str]:
        return sorted(k for k in self.sd if k.startswith(self.prefix + under)
                      and k not in self.used)


def param_counts(module: nnx.Module, frozen: Callable[[str], bool] | None = None
                 ) -> dict[str, int]:
    """``{"total", "trainable", "frozen"}`` parameter counts; ``frozen(path)`` says which."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    total = trainable = 0
    for p, v in flat:
        n = int(np.prod(v.get_value().shape))
        total += n
        if frozen is None or not frozen(path_key(p)):
            trainable += n
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def tree_size(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
