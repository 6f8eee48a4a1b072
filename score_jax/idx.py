"""The idx file format of the MNIST distribution (LeCun et al.): big-endian dims, then uint8 data."""

from __future__ import annotations

import gzip
import os

import numpy as np


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an idx file (optionally .gz): the MNIST format, big-endian dims then uint8 data."""
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
    raise ValueError(f"{path} is not an unsigned-byte idx file")
  ndim = raw[3]
  dims = np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4").astype(int)
  return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)
