"""The idx file format of the MNIST distribution (LeCun et al.): big-endian dims, then uint8 data."""

from __future__ import annotations

import gzip
import os

import numpy as np

from score_jax import paths


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an idx file (optionally .gz; a local path or a URL): the MNIST format, big-endian dims then uint8 data."""
  with paths.open_file(path, "rb") as f:
    raw = f.read()
  if str(path).endswith(".gz"):
    raw = gzip.decompress(raw)
  if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
    raise ValueError(f"{path} is not an unsigned-byte idx file")
  ndim = raw[3]
  dims = np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4").astype(int)
  return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)
