"""Read PyTorch weight files into numpy without torch and without running pickled code.

Handles the three layouts `torch.save` / `torch.jit.save` produce (PyTorch `torch/serialization.py`
and the TorchScript archive format, `torch/csrc/jit/docs/serialization.md`):

- zip `torch.save` (PyTorch >= 1.6): `<prefix>/data.pkl` pickles the object (typically a
  `state_dict` OrderedDict); every tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size,
  stride, ...)` whose storage is a persistent id `('storage', torch.<T>Storage, key, location,
  numel)` with raw little-endian bytes in `<prefix>/data/<key>`.
- TorchScript zip (`torch.jit.save`): `<prefix>/data.pkl` pickles the module tree as objects of
  `__torch__.*` classes (NEWOBJ + BUILD with an attribute dict); `<prefix>/constants.pkl` holds
  the constant tensors. Tensors are collected by attribute path (`net.layers.conv.weight`).
- legacy `torch.save` (PyTorch < 1.6): consecutive pickles (magic number, protocol version,
  system info, the object, the sorted storage keys), then each storage as an int64 element count
  followed by its raw bytes.

Safety: `_RestrictedUnpickler.find_class` returns stand-ins for an allow-list of globals (the
OrderedDict, the tensor/parameter rebuild functions, the typed storage classes, TorchScript's
list builders) and turns every `__torch__.*` class into an inert attribute record; any other
global raises `ForbiddenGlobalError` before anything is imported or called.

Robustness: every size a file states (storage element counts, tensor shapes and strides, zip member
sizes) is checked against the bytes the file really holds before anything is allocated, and a
malformed file of any kind raises `MalformedWeightsError` (a `ValueError`) with a one-line reason.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import ml_dtypes
import numpy as np

from score_jax import paths

# Legacy `torch.save` header (torch/serialization.py).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class MalformedWeightsError(ValueError):
  """A file that is not a readable PyTorch weight file (one line: the file and the reason)."""


class ForbiddenGlobalError(MalformedWeightsError, pickle.UnpicklingError):
  """A pickle referenced a global outside the allow-list."""

# The largest expansion DEFLATE allows; a zip member claiming more is malformed.
_MAX_DEFLATE_RATIO = 1032


@dataclass(frozen=True)
class StorageType:
  """Stand-in for a `torch.<T>Storage` class: only its element type is kept."""
  name: str
  dtype: np.dtype


@dataclass(frozen=True)
class StorageRef:
  """A storage named by a persistent id; its bytes are looked up after unpickling."""
  key: str
  dtype: np.dtype
  numel: int


@dataclass(frozen=True)
class TensorRef:
  """A strided view of a storage (sizes and strides in elements, as torch records them)."""
  storage: StorageRef
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


class ScriptObject:
  """Inert stand-in for a TorchScript `__torch__.*` object: a record of its pickled attributes.

  Subclasses are made per qualified class name (so NEWOBJ can instantiate them); they define no
  behavior beyond storing the BUILD state.
  """
  qualname: str = ""
  attrs: dict[str, Any] = {}  # replaced per instance by BUILD; NEWOBJ skips __init__

  def __setstate__(self, state: Any) -> None:
    if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
      state = state[0] or {}
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(
          f"{self.qualname}: expected a dict of attributes as state, got {type(state).__name__}")
    self.attrs = dict(state)

  def __repr__(self) -> str:
    return f"ScriptObject({self.qualname}, {sorted(self.attrs)})"


def _rebuild_tensor(storage: StorageRef, offset: int, size, stride, *unused: Any) -> TensorRef:
  if not isinstance(storage, StorageRef):
    raise pickle.UnpicklingError(f"tensor storage must come from a persistent id, got {storage!r}")
  return TensorRef(storage, int(offset), tuple(int(s) for s in size),
                   tuple(int(s) for s in stride))


def _rebuild_parameter(data: TensorRef, *unused: Any) -> TensorRef:
  return data


def _build_list(*items: Any) -> list:
  # TorchScript's `build_intlist(list)` etc. take one list argument.
  return list(items[0]) if len(items) == 1 else list(items)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.jit._pickle", "build_intlist"): _build_list,
    ("torch.jit._pickle", "build_doublelist"): _build_list,
    ("torch.jit._pickle", "build_boollist"): _build_list,
    ("torch.jit._pickle", "build_tensorlist"): _build_list,
    **{("torch", name): StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only allow-listed globals and maps storages to `StorageRef`s."""

  def __init__(self, file: io.BufferedIOBase) -> None:
    super().__init__(file)
    self._script_classes: dict[str, type[ScriptObject]] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "__torch__" or module.startswith("__torch__."):
      qualname = f"{module}.{name}"
      if qualname not in self._script_classes:
        self._script_classes[qualname] = type(name, (ScriptObject,), {"qualname": qualname})
      return self._script_classes[qualname]
    raise ForbiddenGlobalError(
        f"refusing to unpickle forbidden global {f'{module}.{name}'!r} (only torch tensors, "
        "storages, OrderedDict and TorchScript attribute records are allowed)")

  def persistent_load(self, pid: Any) -> StorageRef:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(storage_type, StorageType):
      raise pickle.UnpicklingError(f"persistent id names {storage_type!r}, not a storage class")
    if len(pid) > 5 and pid[5] is not None:
      # Legacy storage views (pre-1.6 `view_metadata`) never occur in state_dicts of nn.Modules.
      raise pickle.UnpicklingError(f"storage views are not supported: {pid!r}")
    return StorageRef(str(key), storage_type.dtype, int(numel))


def restricted_loads(data: bytes) -> Any:
  """Unpickles `data` with the allow-list; tensors come back as `TensorRef`s.

  Raises:
    ForbiddenGlobalError: the pickle references a global outside the allow-list.
  """
  return _RestrictedUnpickler(io.BytesIO(data)).load()


def restricted_loads_from(f: io.BufferedIOBase) -> Any:
  """Unpickles one pickle from an open binary file with the allow-list."""
  return _RestrictedUnpickler(f).load()


def _materialize(ref: TensorRef, storage_bytes: Callable[[StorageRef], bytes],
                 byteorder: str) -> np.ndarray:
  """The numpy array (own, contiguous memory) of a strided view into a storage."""
  st = ref.storage
  dtype = st.dtype.newbyteorder("<" if byteorder == "little" else ">")
  if st.numel < 0:
    raise MalformedWeightsError(f"storage {st.key}: negative element count {st.numel}")
  if any(s < 0 for s in ref.size) or any(s < 0 for s in ref.stride):
    raise MalformedWeightsError(f"negative size or stride in {ref}")
  if len(ref.stride) != len(ref.size):
    raise MalformedWeightsError(f"tensor size {ref.size} and stride {ref.stride} differ in rank")
  # A saved weight never holds more elements than its storage (no overlapping views), so this
  # bounds the allocation by the bytes the file holds.
  if math.prod(ref.size) > st.numel:
    raise MalformedWeightsError(f"tensor {ref.size} has more elements than its storage {st.key} "
                                f"({st.numel})")
  raw = storage_bytes(st)
  if len(raw) < st.numel * dtype.itemsize:
    raise MalformedWeightsError(f"storage {st.key}: {len(raw)} bytes < {st.numel} x "
                                f"{dtype.itemsize}")
  base = np.frombuffer(raw, dtype=dtype, count=st.numel)
  if 0 in ref.size:
    return np.zeros(ref.size, st.dtype)
  last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
  if ref.offset < 0 or last >= st.numel:
    raise MalformedWeightsError(f"tensor {ref.size} stride {ref.stride} offset {ref.offset} "
                                f"overruns storage {st.key} of {st.numel} elements")
  view = np.lib.stride_tricks.as_strided(
      base[ref.offset:], shape=ref.size,
      strides=tuple(s * dtype.itemsize for s in ref.stride), writeable=False)
  return np.array(view, dtype=st.dtype)


def _flatten(obj: Any, prefix: str, out: dict[str, TensorRef]) -> None:
  """Collects the `TensorRef`s of a nested dict / list / ScriptObject tree by dotted path."""
  if isinstance(obj, TensorRef):
    out[prefix] = obj
    return
  if isinstance(obj, ScriptObject):
    items = obj.attrs.items()
  elif isinstance(obj, dict):
    items = obj.items()
  elif isinstance(obj, (list, tuple)):
    items = enumerate(obj)
  else:
    return
  for key, value in items:
    _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)


def _read_member(zf: zipfile.ZipFile, name: str, archive_size: int,
                 need: int | None = None) -> bytes:
  """A zip member's bytes, after checking its stated size against the archive's real size."""
  info = zf.getinfo(name)
  ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE_RATIO
  if info.compress_size > archive_size or info.file_size > ratio * max(info.compress_size, 1):
    raise MalformedWeightsError(f"zip member '{name}' states {info.file_size} bytes, more than "
                                "the archive can hold")
  if need is not None and info.file_size < need:
    raise MalformedWeightsError(f"zip member '{name}' has {info.file_size} bytes, its tensors "
                                f"need {need}")
  return zf.read(name)


def _load_zip(path: str) -> dict[str, np.ndarray]:
  archive_size = paths.as_path(path).stat().length
  with paths.open_file(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise MalformedWeightsError(f"expected one '<archive>/data.pkl', found {pkls[:3]}")
    prefix = pkls[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = _read_member(zf, prefix + "byteorder", archive_size).decode().strip()
      if byteorder not in ("little", "big"):
        raise MalformedWeightsError(f"byteorder {byteorder[:20]!r} is neither little nor big")

    refs: dict[str, TensorRef] = {}
    # TorchScript keeps constant tensors (not parameters) in constants.pkl; their storages live
    # in `constants/` in newer archives and in `data/` in older ones.
    sources = [("data.pkl", "data/", "")]
    if prefix + "constants.pkl" in names:
      folder = "constants/" if any(n.startswith(prefix + "constants/") for n in names) else "data/"
      sources.append(("constants.pkl", folder, "constants"))
    folder_of: dict[int, str] = {}
    for pkl, folder, path_prefix in sources:
      tree = restricted_loads(_read_member(zf, prefix + pkl, archive_size))
      found: dict[str, TensorRef] = {}
      _flatten(tree, path_prefix, found)
      for name, ref in found.items():
        refs[name] = ref
        folder_of[id(ref)] = folder

    cache: dict[str, bytes] = {}

    def storage_bytes(folder: str) -> Callable[[StorageRef], bytes]:
      def read(st: StorageRef) -> bytes:
        member = f"{prefix}{folder}{st.key}"
        if member not in cache:
          if member not in names:
            raise MalformedWeightsError(f"storage '{member}' is missing")
          cache[member] = _read_member(zf, member, archive_size,
                                       need=st.numel * st.dtype.itemsize)
        return cache[member]
      return read

    return {name: _materialize(ref, storage_bytes(folder_of[id(ref)]), byteorder)
            for name, ref in refs.items()}


def _load_legacy(path: str) -> dict[str, np.ndarray]:
  # Read whole: a stated length then never makes a buffered read allocate more than the file.
  with paths.open_file(path, "rb") as fh:
    content = fh.read()
  f = io.BytesIO(content)
  try:
    magic = restricted_loads_from(f)
  except (pickle.UnpicklingError, EOFError, ValueError) as e:
    raise MalformedWeightsError("neither a zip archive nor a legacy torch.save file") from e
  if magic != _LEGACY_MAGIC:
    raise MalformedWeightsError("neither a zip archive nor a legacy torch.save file")
  protocol = restricted_loads_from(f)
  if protocol != _LEGACY_PROTOCOL:
    raise MalformedWeightsError(f"unsupported legacy protocol {str(protocol)[:40]}")
  restricted_loads_from(f)  # system info; storages are written little-endian regardless
  tree = restricted_loads_from(f)
  keys = restricted_loads_from(f)
  refs: dict[str, TensorRef] = {}
  _flatten(tree, "", refs)
  dtypes = {ref.storage.key: ref.storage.dtype for ref in refs.values()}
  if not isinstance(keys, (list, tuple)):
    raise MalformedWeightsError(f"the storage key list is a {type(keys).__name__}")
  blobs: dict[str, bytes] = {}
  for key in map(str, keys):
    if key not in dtypes:
      raise MalformedWeightsError(f"storage {key} has no tensor, cannot tell its element size")
    numel = int.from_bytes(f.read(8), "little")
    size = numel * dtypes[key].itemsize
    if size > len(content) - f.tell():
      raise MalformedWeightsError(f"storage {key} states {numel} elements, more than the file "
                                  "holds")
    blobs[key] = f.read(size)
  missing = {ref.storage.key for ref in refs.values()} - set(blobs)
  if missing:
    raise MalformedWeightsError(f"storage {sorted(missing)[0]} is missing")
  return {name: _materialize(ref, lambda st: blobs[st.key], "little")
          for name, ref in refs.items()}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every tensor of a PyTorch weight file as numpy, without torch or pickled code.

  Args:
    path: a zip `torch.save` file (`.pth`/`.pt`), a TorchScript archive (`torch.jit.save`), or
      a legacy (pre-1.6) `torch.save` file.

  Returns:
    Dotted name -> array with the tensor's shape and dtype: the `state_dict` keys for
    `torch.save(module.state_dict())`, the attribute paths (e.g. `net.layers.conv.weight`) for
    TorchScript modules (constant tensors under `constants.<i>`).

  Raises:
    ForbiddenGlobalError: the file's pickles reference a global outside the allow-list.
    MalformedWeightsError: the file is malformed, truncated, or a storage is missing or too short
      (a `ValueError`; `ForbiddenGlobalError` is one too).
    OSError: the file cannot be opened.
  """
  path = os.fspath(path)
  try:
    with paths.open_file(path, "rb") as fh:
      is_zip = zipfile.is_zipfile(fh)
    if is_zip:
      return _load_zip(path)
    return _load_legacy(path)
  except ForbiddenGlobalError as e:
    raise ForbiddenGlobalError(f"{path}: {e}") from None
  except MalformedWeightsError as e:
    raise MalformedWeightsError(f"{path}: {e}") from None
  except OSError:
    if not paths.isfile(path):
      raise
    raise MalformedWeightsError(f"{path}: not a readable PyTorch weight file (damaged or "
                                "truncated)") from None
  # A crafted pickle or archive can fail in any of the unpickler's and zipfile's ways.
  except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError,
          AttributeError, OverflowError, RecursionError, UnicodeDecodeError,
          zipfile.BadZipFile, NotImplementedError, zlib.error) as e:
    why = " ".join(str(e).split())[:160]
    raise MalformedWeightsError(f"{path}: not a readable PyTorch weight file "
                                f"({type(e).__name__}: {why})") from None

