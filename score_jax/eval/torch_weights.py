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
Totals are bounded as well as single sizes, before anything is inflated or materialized:

- bytes: the inflated sizes the zip directory states, summed over the distinct members read
  (storages shared by many tensors count once), stay within `max_bytes` and within DEFLATE's
  largest expansion of the archive's own size (directory entries that overlap one compressed
  member are counted each time); the arrays returned stay within `max_bytes` too, and identical
  views of one storage (tied weights) are materialized once and shared;
- pickle structure: every pickle is scanned op by op (`pickletools.genops`, which builds nothing)
  before it is unpickled, bounding its op count, its MARK nesting, its stack size and its memo
  (entry count and index: the C unpickler grows its memo table to the largest index written);
- object tree: collecting tensors from the unpickled tree visits a bounded number of nodes, so a
  memoized container referenced twice at each of many levels (a tree of 2^depth paths from a
  pickle of a few hundred bytes) is refused instead of walked.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
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

# Default bound on the bytes a file may inflate to and on the arrays it may yield: above the
# largest checkpoints this project reads (NCSNv2 runner checkpoints with optimizer and EMA states).
MAX_TOTAL_BYTES = 4 << 30
# Pickle structure bounds. A state_dict pickles a handful of ops per tensor and nests a few levels;
# TorchScript module trees nest one level per submodule.
_MAX_PICKLE_BYTES = 256 << 20
_MAX_PICKLE_OPS = 5_000_000
_MAX_PICKLE_DEPTH = 256
# Pickle batches container items 1000 per MARK, so a genuine pickle's stack stays far below this.
_MAX_PICKLE_STACK = 1 << 16
_MAX_MEMO = 1_000_000
# Tree walk budget: without shared containers a tree has at most one node per op; tied submodules
# repeat some subtrees, which a small multiple allows while a chain that doubles per level is not.
_TREE_VISITS_PER_OP = 4
_MIN_TREE_VISITS = 10_000
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})


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


def check_pickle_structure(data: bytes, offset: int = 0) -> tuple[int, int]:
  """Scans the pickle starting at `data[offset:]` without building any object.

  Returns:
    (ops, end): the pickle's op count and the offset just past its STOP.

  Raises:
    MalformedWeightsError: the pickle exceeds the op, depth or memo bounds, or is not a pickle.
  """
  depth, marks, ops, memo = 0, [], 0, 0
  f = io.BytesIO(data)
  f.seek(offset)
  end = offset
  try:
    for opcode, arg, pos in pickletools.genops(f):
      ops += 1
      if ops > _MAX_PICKLE_OPS:
        raise MalformedWeightsError(f"pickle has more than {_MAX_PICKLE_OPS} ops")
      if opcode.name in _MEMO_PUTS:
        memo += 1
        index = memo if arg is None else arg
        if memo > _MAX_MEMO or not 0 <= index <= _MAX_MEMO:
          raise MalformedWeightsError(f"pickle memo exceeds {_MAX_MEMO} entries")
      before, after = opcode.stack_before, opcode.stack_after
      if opcode.name == "MARK":
        marks.append(depth)
      else:
        if pickletools.markobject in before:
          if not marks:
            raise MalformedWeightsError(f"pickle op {opcode.name} without a MARK")
          depth = marks.pop()
          before = before[:before.index(pickletools.markobject)]
        depth -= len(before)
        depth += len(after)
      if depth < 0:
        raise MalformedWeightsError(f"pickle op {opcode.name} pops an empty stack")
      if len(marks) > _MAX_PICKLE_DEPTH:
        raise MalformedWeightsError(f"pickle nests more than {_MAX_PICKLE_DEPTH} MARKs")
      if depth > _MAX_PICKLE_STACK:
        raise MalformedWeightsError(f"pickle stack grows beyond {_MAX_PICKLE_STACK} items")
      end = pos + 1
  except ValueError as e:
    if isinstance(e, MalformedWeightsError):
      raise
    raise MalformedWeightsError(f"not a pickle ({' '.join(str(e).split())[:120]})") from None
  return ops, end


def restricted_loads(data: bytes) -> Any:
  """Unpickles `data` with the allow-list after bounding its structure.

  Tensors come back as `TensorRef`s.

  Raises:
    ForbiddenGlobalError: the pickle references a global outside the allow-list.
    MalformedWeightsError: the pickle exceeds the structure bounds.
  """
  return _restricted_load(data, 0)[0]


def _restricted_load(data: bytes, offset: int) -> tuple[Any, int, int]:
  """(object, ops, end offset) of the structure-checked pickle at `data[offset:]`."""
  ops, end = check_pickle_structure(data, offset)
  f = io.BytesIO(data)
  f.seek(offset)
  return _RestrictedUnpickler(f).load(), ops, end


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


def _flatten(obj: Any, prefix: str, out: dict[str, TensorRef], ops: int) -> None:
  """Collects the `TensorRef`s of a nested dict / list / ScriptObject tree by dotted path.

  Args:
    obj: the unpickled tree.
    prefix: the dotted path of `obj`.
    out: receives path -> `TensorRef`.
    ops: the op count of the pickle `obj` came from; bounds the nodes visited.
  """
  budget = [max(_MIN_TREE_VISITS, _TREE_VISITS_PER_OP * ops)]

  def visit(node: Any, path: str, depth: int) -> None:
    budget[0] -= 1
    if budget[0] < 0:
      raise MalformedWeightsError("the pickled tree has far more paths than objects (a container "
                                  "shared between paths at many levels)")
    if depth > _MAX_PICKLE_DEPTH:
      raise MalformedWeightsError(f"the pickled tree nests deeper than {_MAX_PICKLE_DEPTH} levels")
    if isinstance(node, TensorRef):
      out[path] = node
      return
    if isinstance(node, ScriptObject):
      items = node.attrs.items()
    elif isinstance(node, dict):
      items = node.items()
    elif isinstance(node, (list, tuple)):
      items = enumerate(node)
    else:
      return
    for key, value in items:
      visit(value, f"{path}.{key}" if path else str(key), depth + 1)

  visit(obj, prefix, 0)


def _view_key(ref: TensorRef) -> tuple:
  return ref.storage, ref.offset, ref.size, ref.stride


def _check_output_bytes(views: list[TensorRef], max_bytes: int) -> None:
  """Refuses before materializing when the distinct `views` would total more than `max_bytes`."""
  total = 0
  for ref in views:
    if any(n < 0 for n in ref.size):
      raise MalformedWeightsError(f"negative size in {ref}")
    total += math.prod(ref.size) * ref.storage.dtype.itemsize
    if total > max_bytes:
      raise MalformedWeightsError(f"the tensors total more than {max_bytes} bytes; raise "
                                  "max_bytes if this file is genuine")


def _materialize_views(refs: dict[str, tuple[str, TensorRef]], max_bytes: int,
                       storage_bytes: Callable[[str, StorageRef], bytes],
                       byteorder: str) -> dict[str, np.ndarray]:
  """Materializes each distinct (folder, view) once; names of one view (tied weights) share it."""
  distinct = {(folder, *_view_key(ref)): ref for folder, ref in refs.values()}
  _check_output_bytes(list(distinct.values()), max_bytes)
  arrays: dict[tuple, np.ndarray] = {}
  out = {}
  for name, (folder, ref) in refs.items():
    key = (folder, *_view_key(ref))
    if key not in arrays:
      arrays[key] = _materialize(ref, lambda st, folder=folder: storage_bytes(folder, st),
                                 byteorder)
    out[name] = arrays[key]
  return out


class _ZipReader:
  """Reads zip members after checking their directory sizes, charging inflated bytes to a budget.

  Every member is charged once, with the size the zip directory states, before it is inflated:
  the total stays within `max_bytes` and within the largest DEFLATE expansion of the archive.
  """

  def __init__(self, zf: zipfile.ZipFile, archive_size: int, max_bytes: int) -> None:
    self.zf, self.archive_size = zf, archive_size
    self.limit = min(max_bytes, _MAX_DEFLATE_RATIO * max(archive_size, 1))
    self.charged: dict[str, int] = {}

  def charge(self, name: str, need: int | None = None, limit: int | None = None) -> None:
    """Checks member `name`'s stated size and adds it to the total (once per member)."""
    info = self.zf.getinfo(name)
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE_RATIO
    if (info.compress_size > self.archive_size
        or info.file_size > ratio * max(info.compress_size, 1)):
      raise MalformedWeightsError(f"zip member '{name}' states {info.file_size} bytes, more than "
                                  "the archive can hold")
    if need is not None and info.file_size < need:
      raise MalformedWeightsError(f"zip member '{name}' has {info.file_size} bytes, its tensors "
                                  f"need {need}")
    if limit is not None and info.file_size > limit:
      raise MalformedWeightsError(f"zip member '{name}' states {info.file_size} bytes, more than "
                                  f"{limit}")
    if name not in self.charged:
      self.charged[name] = info.file_size
      total = sum(self.charged.values())
      if total > self.limit:
        raise MalformedWeightsError(
            f"the archive inflates to more than {self.limit} bytes (max_bytes {self.limit}, or "
            f"{_MAX_DEFLATE_RATIO}x its {self.archive_size} bytes)")

  def read(self, name: str, limit: int | None = None) -> bytes:
    self.charge(name, limit=limit)
    return self.zf.read(name)


def _load_zip(path: str, max_bytes: int) -> dict[str, np.ndarray]:
  archive_size = paths.as_path(path).stat().length
  with paths.open_file(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
    names = set(zf.namelist())
    pkls = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
    if len(pkls) != 1:
      raise MalformedWeightsError(f"expected one '<archive>/data.pkl', found {pkls[:3]}")
    prefix = pkls[0][: -len("data.pkl")]
    reader = _ZipReader(zf, archive_size, max_bytes)
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = reader.read(prefix + "byteorder", limit=16).decode().strip()
      if byteorder not in ("little", "big"):
        raise MalformedWeightsError(f"byteorder {byteorder[:20]!r} is neither little nor big")

    refs: dict[str, tuple[str, TensorRef]] = {}
    # TorchScript keeps constant tensors (not parameters) in constants.pkl; their storages live
    # in `constants/` in newer archives and in `data/` in older ones.
    sources = [("data.pkl", "data/", "")]
    if prefix + "constants.pkl" in names:
      folder = "constants/" if any(n.startswith(prefix + "constants/") for n in names) else "data/"
      sources.append(("constants.pkl", folder, "constants"))
    for pkl, folder, path_prefix in sources:
      tree, ops, _ = _restricted_load(reader.read(prefix + pkl, limit=_MAX_PICKLE_BYTES), 0)
      found: dict[str, TensorRef] = {}
      _flatten(tree, path_prefix, found, ops)
      refs.update({name: (folder, ref) for name, ref in found.items()})

    # Every storage's stated size is charged from the zip directory before any is inflated.
    for folder, ref in refs.values():
      member = f"{prefix}{folder}{ref.storage.key}"
      if member not in names:
        raise MalformedWeightsError(f"storage '{member}' is missing")
      if ref.storage.numel < 0:
        raise MalformedWeightsError(f"storage {ref.storage.key}: negative element count "
                                    f"{ref.storage.numel}")
      reader.charge(member, need=ref.storage.numel * ref.storage.dtype.itemsize)

    cache: dict[str, bytes] = {}

    def storage_bytes(folder: str, st: StorageRef) -> bytes:
      member = f"{prefix}{folder}{st.key}"
      if member not in cache:
        cache[member] = zf.read(member)
      return cache[member]

    return _materialize_views(refs, max_bytes, storage_bytes, byteorder)


def _load_legacy(path: str, max_bytes: int) -> dict[str, np.ndarray]:
  size = paths.as_path(path).stat().length
  if size > max_bytes:
    raise MalformedWeightsError(f"the file has {size} bytes, more than max_bytes {max_bytes}")
  # Read whole: a stated length then never makes a buffered read allocate more than the file.
  with paths.open_file(path, "rb") as fh:
    content = fh.read()
  try:
    magic, _, pos = _restricted_load(content, 0)
  except (pickle.UnpicklingError, EOFError, ValueError) as e:
    raise MalformedWeightsError("neither a zip archive nor a legacy torch.save file") from e
  if magic != _LEGACY_MAGIC:
    raise MalformedWeightsError("neither a zip archive nor a legacy torch.save file")
  protocol, _, pos = _restricted_load(content, pos)
  if protocol != _LEGACY_PROTOCOL:
    raise MalformedWeightsError(f"unsupported legacy protocol {str(protocol)[:40]}")
  _, _, pos = _restricted_load(content, pos)  # system info; storages are little-endian regardless
  tree, ops, pos = _restricted_load(content, pos)
  keys, _, pos = _restricted_load(content, pos)
  found: dict[str, TensorRef] = {}
  _flatten(tree, "", found, ops)
  dtypes = {ref.storage.key: ref.storage.dtype for ref in found.values()}
  if not isinstance(keys, (list, tuple)):
    raise MalformedWeightsError(f"the storage key list is a {type(keys).__name__}")
  f = io.BytesIO(content)
  f.seek(pos)
  blobs: dict[str, bytes] = {}
  for key in map(str, keys):
    if key not in dtypes:
      raise MalformedWeightsError(f"storage {key} has no tensor, cannot tell its element size")
    numel = int.from_bytes(f.read(8), "little")
    nbytes = numel * dtypes[key].itemsize
    if nbytes > len(content) - f.tell():
      raise MalformedWeightsError(f"storage {key} states {numel} elements, more than the file "
                                  "holds")
    blobs[key] = f.read(nbytes)
  missing = {ref.storage.key for ref in found.values()} - set(blobs)
  if missing:
    raise MalformedWeightsError(f"storage {sorted(missing)[0]} is missing")
  refs = {name: ("", ref) for name, ref in found.items()}
  return _materialize_views(refs, max_bytes, lambda _, st: blobs[st.key], "little")


def load_state_dict(path: str | os.PathLike, *,
                    max_bytes: int = MAX_TOTAL_BYTES) -> dict[str, np.ndarray]:
  """Reads every tensor of a PyTorch weight file as numpy, without torch or pickled code.

  Args:
    path: a zip `torch.save` file (`.pth`/`.pt`), a TorchScript archive (`torch.jit.save`), or
      a legacy (pre-1.6) `torch.save` file.
    max_bytes: the most bytes the file may inflate to, and the most its arrays may total.

  Returns:
    Dotted name -> array with the tensor's shape and dtype: the `state_dict` keys for
    `torch.save(module.state_dict())`, the attribute paths (e.g. `net.layers.conv.weight`) for
    TorchScript modules (constant tensors under `constants.<i>`). Names of one view of one
    storage (tied weights) share one array.

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
      return _load_zip(path, max_bytes)
    return _load_legacy(path, max_bytes)
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

