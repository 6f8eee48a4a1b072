"""The original files of MNIST, Fashion-MNIST and CIFAR-10, downloaded on first use.

The URLs, sizes and SHA-256 values are those TFDS registers for its own builders
(`tensorflow_datasets/url_checksums/{mnist,fashion_mnist,cifar10}.txt`); every file is checked
against both before it is kept. The files go to `<cache>/downloads/<dataset>/`
(`score_jax.cache_dir()`), the manual directory `image_data.prepare` then builds the ArrayRecord
files from, as `python -m score_jax.prepare_data --manual_dir=...` does with files fetched by hand.

Environment:
  SCORE_JAX_OFFLINE=1: never download (the error names the prepare_data command instead).
  SCORE_JAX_DATA_MIRROR=URL: a base URL holding the files under their original names, used
    instead of each dataset's own site (an institutional mirror; the tests' local server).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import secrets
import sys
import urllib.error
import urllib.request

import score_jax

# dataset -> (base URL, {file name: (bytes, sha256)}).
SOURCES: dict[str, tuple[str, dict[str, tuple[int, str]]]] = {
    "mnist": ("https://storage.googleapis.com/cvdf-datasets/mnist/", {
        "train-images-idx3-ubyte.gz":
            (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train-labels-idx1-ubyte.gz":
            (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "t10k-images-idx3-ubyte.gz":
            (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "t10k-labels-idx1-ubyte.gz":
            (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    }),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz":
            (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        "train-labels-idx1-ubyte.gz":
            (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        "t10k-images-idx3-ubyte.gz":
            (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        "t10k-labels-idx1-ubyte.gz":
            (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    }),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/", {
        "cifar-10-binary.tar.gz":
            (170052171, "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
    }),
}

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
  """Downloads are off, or a file could not be fetched or failed its check (one line)."""


def offline() -> bool:
  """True when `SCORE_JAX_OFFLINE` forbids downloads."""
  return os.environ.get("SCORE_JAX_OFFLINE", "") not in ("", "0")


def default_folder(dataset: str) -> pathlib.Path:
  return score_jax.cache_dir() / "downloads" / dataset


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def _download(url: str, target: pathlib.Path, size: int, sha256: str) -> None:
  """`url` into `target`, all or nothing, with a byte progress bar; checks size and sha256."""
  from tqdm import auto
  tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}")
  h = hashlib.sha256()
  got = 0
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out, \
        auto.tqdm(total=size, desc=f"download {target.name}", unit="B", unit_scale=True,
                  unit_divisor=1024, dynamic_ncols=True, file=sys.stderr) as bar:
      for chunk in iter(lambda: response.read(_CHUNK), b""):
        out.write(chunk)
        h.update(chunk)
        got += len(chunk)
        bar.update(len(chunk))
    if got != size or h.hexdigest() != sha256:
      raise DownloadError(f"{url} is not the original file: {got} bytes, sha256 {h.hexdigest()} "
                          f"(expected {size} bytes, {sha256})")
    os.replace(tmp, target)
  except (urllib.error.URLError, OSError, ValueError) as e:
    raise DownloadError(f"could not download {url} "
                        f"({' '.join(str(getattr(e, 'reason', e)).split())})") from None
  finally:
    if tmp.exists():
      tmp.unlink()


def fetch(dataset: str, folder: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder holding `dataset`'s original files, downloading and checking the missing ones.

  Args:
    dataset: a key of `SOURCES`.
    folder: where the files go; default `<cache>/downloads/<dataset>`.

  Raises:
    DownloadError: `SCORE_JAX_OFFLINE` is set, or a file could not be fetched or checked.
  """
  base, files = SOURCES[dataset]
  base = os.environ.get("SCORE_JAX_DATA_MIRROR") or base
  folder = pathlib.Path(folder) if folder is not None else default_folder(dataset)
  missing = {name: spec for name, spec in files.items()
             if not ((folder / name).is_file() and (folder / name).stat().st_size == spec[0]
                     and _sha256(folder / name) == spec[1])}
  if missing and offline():
    raise DownloadError("downloads are off (SCORE_JAX_OFFLINE)")
  if missing:
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{dataset}: downloading its original files from {base} into {folder} (once)",
          file=sys.stderr, flush=True)
  for name, (size, sha256) in missing.items():
    _download(base.rstrip("/") + "/" + name, folder / name, size, sha256)
  return folder
