"""Paths for every file the project reads or writes: local folders and cloud-storage URLs alike.

Everything goes through `etils.epath`, the path type of the JAX ecosystem (Orbax, TFDS and
TensorBoard take the same URLs). A URL such as `gs://bucket/run` is kept as it is; only local
paths are made absolute, so a URL never turns into a local folder named `gs:`. Without
TensorFlow, epath serves `gs://` through fsspec's `gcs` filesystem (the `gcsfs` package).

Objects on cloud storage are written whole, so a write there is already all-or-nothing; local
writes go to a temporary file in the same folder first and are renamed into place.
"""

from __future__ import annotations

import io
import os
import secrets
import zipfile
from typing import IO, Any

import numpy as np
from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
  """True for a `scheme://...` path (cloud storage), False for a local path."""
  return "://" in os.fspath(path)


def is_local(path: PathLike) -> bool:
  """True for a path on the local file system."""
  return not is_url(path)


class CloudStorageError(ValueError):
  """A cloud-storage URL this installation cannot read or write."""


_FSSPEC_PROTOCOL = {"gs": ("gcs", "gcsfs"), "s3": ("s3", "s3fs"), "az": ("az", "adlfs"),
                    "hf": ("hf", "huggingface_hub")}


def check_url_support(path: PathLike, *, checkpoints: bool = False) -> None:
  """Raises `CloudStorageError` (one line, naming the package to install) when `path` is a URL
  this installation cannot serve; local paths always pass.

  Args:
    path: the path to check.
    checkpoints: the path will also hold Orbax checkpoints. On `gs://`, Orbax asks the bucket's
      layout through `google-cloud-storage` and writes arrays with TensorStore's own GCS driver,
      neither of which goes through fsspec; other schemes have no Orbax support here.
  """
  s = os.fspath(path)
  if not is_url(s):
    return
  scheme = s.split("://", 1)[0]
  if scheme not in _FSSPEC_PROTOCOL:
    raise CloudStorageError(f"{s}: unsupported URL scheme {scheme}://; use a local path or one "
                            f"of {', '.join(k + '://' for k in _FSSPEC_PROTOCOL)}")
  protocol, package = _FSSPEC_PROTOCOL[scheme]
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
    fsspec.get_filesystem_class(protocol)
  except (ImportError, ValueError):
    raise CloudStorageError(f"{s}: reading and writing {scheme}:// needs the `{package}` package; "
                            f"pip install {package}") from None
  if not checkpoints:
    return
  if scheme != "gs":
    raise CloudStorageError(f"{s}: checkpoints on {scheme}:// are not supported; use a local "
                            "path or gs://")
  try:
    from google.cloud import storage  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise CloudStorageError(f"{s}: Orbax checkpoints on gs:// need the `google-cloud-storage` "
                            "package; pip install google-cloud-storage") from None


def as_path(path: PathLike) -> epath.Path:
  """`path` as an `epath.Path`: URLs untouched, local paths expanded (`~`) and made absolute."""
  if isinstance(path, epath.Path) and not is_local(path):
    return path
  s = os.fspath(path)
  if is_url(s):
    return epath.Path(s)
  return epath.Path(os.path.abspath(os.path.expanduser(s)))


def as_str(path: PathLike) -> str:
  """`as_path(path)` as a string (`gs://bucket/run` or an absolute local path)."""
  return os.fspath(as_path(path))


def join(path: PathLike, *parts: str) -> str:
  """`path / parts...` as a string, the URL kept a URL."""
  return os.fspath(as_path(path).joinpath(*parts))


def makedirs(path: PathLike) -> None:
  """Creates the folder `path` and its parents if absent (a no-op prefix on object storage)."""
  as_path(path).mkdir(parents=True, exist_ok=True)


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def isdir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def isfile(path: PathLike) -> bool:
  p = as_path(path)
  return p.exists() and not p.is_dir()


def open_file(path: PathLike, mode: str = "r") -> IO[Any]:
  """Opens `path` (local or URL) with mode r, w, a, rb, wb or ab."""
  return as_path(path).open(mode)


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` all-or-nothing, creating the parent folder."""
  p = as_path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(p):
    p.write_bytes(data)
    return
  # Created with mode 0o666 for the umask to reduce, as every tool creates files (mkstemp's 0600
  # would hide the outputs from the user's group); O_EXCL keeps the name this call's own.
  tmp = os.path.join(os.fspath(p.parent), f".{p.name}.{os.getpid()}.{secrets.token_hex(6)}")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, os.fspath(p))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: PathLike, text: str) -> None:
  """Writes UTF-8 `text` to `path` all-or-nothing."""
  write_bytes(path, text.encode("utf-8"))


def save_npz(path: PathLike, *, compressed: bool = False, **arrays: np.ndarray) -> None:
  """`np.savez` (or `np.savez_compressed`) of `arrays` to `path`, local or URL."""
  buf = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buf, **arrays)
  write_bytes(path, buf.getvalue())


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
  """All arrays of the `.npz` file at `path`, read into memory.

  Raises:
    OSError: the file cannot be opened.
    ValueError: its bytes are not a readable `.npz` of plain arrays (one line naming the file;
      numpy's own message for such bytes advises enabling pickles, which is never right here).
  """
  with open_file(path, "rb") as f:
    content = f.read()
  try:
    with np.load(io.BytesIO(content), allow_pickle=False) as data:
      if not hasattr(data, "files"):
        raise ValueError("a single .npy array, not an .npz archive")
      return {k: data[k] for k in data.files}
  except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
    why = ("it holds object arrays (pickles), which are not read" if "allow_pickle" in str(e)
           and content[:2] == b"PK" else "damaged, truncated or not written by numpy.savez")
    raise ValueError(f"{as_str(path)} is not a readable .npz file ({why})") from None
