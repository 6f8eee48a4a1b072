"""Image data: TFDS ArrayRecord datasets read with `tfds` data sources and grain, or local files.

Preparation (`prepare`, `python -m score_jax.prepare_data`) builds ArrayRecord files with TFDS
builders, offline, from the original files in a manual directory:
* mnist, fashion_mnist (the four idx .gz files) and cifar10 (`cifar-10-binary.tar.gz`) use the
  TensorFlow-free TFDS builders of `score_jax.tfds_builders` (raw uint8 tensors; TFDS's own
  builders for these decode with `tf.io.gfile` and need TensorFlow);
* celeb_a and lsun use TFDS's own builders, which need TensorFlow to prepare and decode:
  `pip install -r requirements-prepare.txt` (the only place TensorFlow is ever used).

Reading (`create_iterator`) is a grain `MapDataset` pipeline: a global shuffle per epoch with the
seed, per-record preprocessing whose randomness (flips, dequantization) comes from grain's
per-record seeded generator, and global batches of which each process reads its own rows
(`ProcessRows`), so the data of a step do not depend on the number of processes. The iterator
state is a small JSON dict, saved in checkpoints, and a restored pipeline yields exactly the
batches of an uninterrupted one.

Preprocessing conventions (ermongroup/ncsnv2 `datasets/__init__.py`): values in [0, 1] (or [-1, 1] when `centered`);
uniform dequantization (x * 255 + U[0, 1)) / 256 as NCSN v1; Gaussian dequantization N(0, 0.01^2)
as NCSNv2; CelebA: center crop 140 then resize (NCSN); LSUN: resize the shorter side, then center
crop; other sizes: bilinear resize (PIL) when image_size differs from the native size.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import grain
import numpy as np
from PIL import Image

from score_jax import downloads, paths
from score_jax.idx import read_idx


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  tfds_name: str | None  # TFDS builder name (None: local files)
  native_size: int | None
  channels: int | None
  crop: str = "none"  # none | celeba | lsun
  needs_tensorflow: bool = False
  manual_files: tuple[str, ...] = ()


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("score_jax_mnist", 28, 1, manual_files=(
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz")),
    "fashion_mnist": DatasetInfo("score_jax_fashion_mnist", 28, 1, manual_files=(
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz")),
    "cifar10": DatasetInfo("score_jax_cifar10", 32, 3, manual_files=("cifar-10-binary.tar.gz",)),
    "celeb_a": DatasetInfo("celeb_a", None, 3, crop="celeba", needs_tensorflow=True),
    "lsun/church_outdoor": DatasetInfo("lsun/church_outdoor", None, 3, crop="lsun",
                                       needs_tensorflow=True),
    "lsun/bedroom": DatasetInfo("lsun/bedroom", None, 3, crop="lsun", needs_tensorflow=True),
    "folder": DatasetInfo(None, None, None),
    "npz": DatasetInfo(None, None, None),
}


def _info(dataset: str) -> DatasetInfo:
  if dataset not in DATASETS:
    raise ValueError(f"dataset={dataset!r} is unknown; use one of {sorted(DATASETS)}")
  return DATASETS[dataset]


def default_data_dir() -> str:
  return paths.as_str(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def prepare_command(dataset: str, data_dir: str | None) -> str:
  return (f"python -m score_jax.prepare_data --dataset={dataset} --manual_dir=DIR_WITH_ORIGINAL_FILES"
          + (f" --data_dir={data_dir}" if data_dir else ""))


# --------------------------------------------------------------------------------------------
# Raw MNIST files.


def load_mnist_raw(manual_dir: str | os.PathLike, split: str = "train"
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [n, 28, 28], labels int64 [n]) from the official MNIST idx files."""
  prefix = {"train": "train", "test": "t10k"}.get(split)
  if prefix is None:
    raise ValueError(f"split={split!r} must be 'train' or 'test'")
  d = paths.as_path(manual_dir)
  images = read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
  labels = read_idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
  return images, labels


# --------------------------------------------------------------------------------------------
# Preparation.


def prepare(dataset: str, *, data_dir: str | None, manual_dir: str | None) -> None:
  """Builds `dataset` as ArrayRecord under `data_dir` from the original files in `manual_dir`.

  Never downloads: a dataset whose files are missing raises ValueError before TFDS is asked.
  """
  info = _info(dataset)
  if info.tfds_name is None:
    raise ValueError(f"dataset={dataset!r} reads local files directly (data.path); "
                     "nothing to prepare")
  data_dir = data_dir or default_data_dir()
  if info.needs_tensorflow:
    import importlib.util
    if importlib.util.find_spec("tensorflow") is None:
      raise ValueError(f"preparing {dataset} uses TFDS's own builder, which needs TensorFlow: "
                       "pip install -r requirements-prepare.txt")
  if manual_dir is None or not paths.isdir(manual_dir):
    raise ValueError(f"--manual_dir={manual_dir} must be a folder with the original files of "
                     f"{dataset}" + (f": {', '.join(info.manual_files)}" if info.manual_files else ""))
  missing = [f for f in info.manual_files if not paths.isfile(paths.join(manual_dir, f))]
  if missing:
    raise ValueError(f"--manual_dir={manual_dir} lacks {', '.join(missing)} (needed for {dataset})")
  import tensorflow_datasets as tfds
  # local import: tensorflow_datasets, for TFDS datasets only; registers the TF-free builders
  from score_jax import tfds_builders  # noqa: F401
  builder = tfds.builder(info.tfds_name, data_dir=data_dir, file_format="array_record")
  config = tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False,
                                        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=config)


def prepare_cached(dataset: str, manual_dir: str, cache_root: str) -> str:
  """Prepares `dataset` once into `cache_root` (reused when present) and returns that data_dir."""
  prepare(dataset, data_dir=cache_root, manual_dir=manual_dir)
  return cache_root


def _tfds_source(dataset: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds
  # local import: tensorflow_datasets, for TFDS datasets only; registers the TF-free builders
  from score_jax import tfds_builders  # noqa: F401
  info = _info(dataset)
  data_dir = data_dir or default_data_dir()
  # Checked before TFDS looks (and logs warnings about the folder it does not find).
  prepared = list(paths.as_path(data_dir).joinpath(info.tfds_name).glob("*/dataset_info.json"))
  builder = tfds.builder(info.tfds_name, data_dir=data_dir, file_format="array_record") \
      if prepared else None
  if builder is None or not builder.is_prepared():
    if dataset not in downloads.SOURCES:
      raise ValueError(f"data_dir={data_dir} holds no prepared {dataset}; prepare it offline "
                       f"with: {prepare_command(dataset, data_dir)}")
    # First use: the original files are downloaded (and checked), then prepared here.
    try:
      manual_dir = downloads.fetch(dataset)
    except downloads.DownloadError as e:
      raise ValueError(f"data_dir={data_dir} holds no prepared {dataset}, and its files were not "
                       f"downloaded: {e}; prepare it offline with: "
                       f"{prepare_command(dataset, data_dir)}") from None
    prepare(dataset, data_dir=data_dir, manual_dir=str(manual_dir))
    builder = tfds.builder(info.tfds_name, data_dir=data_dir, file_format="array_record")
  if split not in builder.info.splits:
    raise ValueError(f"split={split!r} is not a split of {dataset}; "
                     f"use one of {sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)


def _open_image(path) -> Image.Image:
  """A PIL image read whole from `path` (local or URL)."""
  with paths.open_file(path, "rb") as f:
    return Image.open(io.BytesIO(f.read()))


class _FolderSource:
  """Random access over a folder of PNG/JPEG images (sorted by name), decoded with PIL.

  Every file is checked when the source is made (PIL's header parse and `verify`, which checks
  PNG chunk checksums without decoding), so a damaged image is named before training starts.
  """

  def __init__(self, path: str):
    exts = {".png", ".jpg", ".jpeg"}
    self.files = sorted(root / name for root, _, names in paths.as_path(path).walk()
                        for name in names if os.path.splitext(name)[1].lower() in exts)
    if not self.files:
      raise ValueError(f"data.path={path} holds no .png/.jpg/.jpeg images")
    for f in self.files:
      try:
        with _open_image(f) as im:
          im.verify()
      except Exception as e:  # PIL raises many types for one damaged file.
        raise ValueError(f"data.path: {f} is not a readable image ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:120]}); remove or replace it") from None

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    try:
      with _open_image(self.files[i]) as im:
        return {"image": np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)}
    except Exception as e:  # PIL raises many types for one damaged file.
      raise ValueError(f"data.path: {self.files[i]} is not a readable image "
                       f"({type(e).__name__}: {' '.join(str(e).split())[:120]}); remove or "
                       "replace it") from None


class _ArraySource:
  """Random access over an array `x` [n, h, w(, c)] of an .npz file."""

  def __init__(self, path: str):
    f = paths.load_npz(path)
    if "x" not in f:
      raise ValueError(f"data.path={path} has no array named 'x' (keys: {list(f)})")
    self.x = f["x"]
    if self.x.ndim not in (3, 4):
      raise ValueError(f"{path}: x must be [n, h, w] or [n, h, w, c], got shape {self.x.shape}")

  def __len__(self) -> int:
    return len(self.x)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {"image": self.x[i]}


def _source(dataset: str, split: str, data_dir: str | None, path: str | None):
  if dataset in ("folder", "npz"):
    if not path:
      raise ValueError(f"dataset={dataset!r} needs data.path (a folder of images or an .npz)")
    if dataset == "folder":
      if not paths.isdir(path):
        raise ValueError(f"data.path={path} is not a folder")
      return _FolderSource(path)
    if not paths.isfile(path):
      raise ValueError(f"data.path={path} is not an .npz file")
    return _ArraySource(path)
  return _tfds_source(dataset, split, data_dir)


# --------------------------------------------------------------------------------------------
# Preprocessing.


def _center_crop(img: np.ndarray, size: int) -> np.ndarray:
  h, w = img.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return img[top:top + size, left:left + size]


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if img.shape[:2] == size:
    return img
  squeeze = img.shape[-1] == 1
  pil = Image.fromarray(img[..., 0] if squeeze else img)
  out = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))
  return out[..., None] if squeeze else out


def to_uint8_image(image: np.ndarray, *, image_size: int, num_channels: int,
                   crop: str = "none") -> np.ndarray:
  """A record's image as uint8 [image_size, image_size, num_channels] (crop, resize, channels)."""
  img = np.asarray(image)
  if img.dtype != np.uint8:
    img = np.clip(np.rint(img * 255.0 if img.max() <= 1.0 else img), 0, 255).astype(np.uint8)
  if img.ndim == 2:
    img = img[..., None]
  if crop == "celeba":
    img = _center_crop(img, 140)
  elif crop == "lsun":
    h, w = img.shape[:2]
    scale = image_size / min(h, w)
    img = _resize(img, (max(image_size, round(h * scale)), max(image_size, round(w * scale))))
    img = _center_crop(img, image_size)
  img = _resize(img, (image_size, image_size))
  c = img.shape[-1]
  if c != num_channels:
    if c == 1 and num_channels == 3:
      img = np.repeat(img, 3, axis=-1)
    elif c == 3 and num_channels == 1:
      img = np.rint(img.astype(np.float32) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
    else:
      raise ValueError(f"cannot turn {c}-channel images into data.num_channels={num_channels}")
  return img


@dataclasses.dataclass(frozen=True)
class Preprocess:
  image_size: int
  num_channels: int
  crop: str = "none"
  random_flip: bool = False
  uniform_dequantization: bool = False
  gaussian_dequantization: bool = False
  centered: bool = False

  def deterministic(self, record: dict[str, Any]) -> np.ndarray:
    img = to_uint8_image(record["image"], image_size=self.image_size,
                         num_channels=self.num_channels, crop=self.crop)
    x = img.astype(np.float32) / 255.0
    return 2.0 * x - 1.0 if self.centered else x

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    img = to_uint8_image(record["image"], image_size=self.image_size,
                         num_channels=self.num_channels, crop=self.crop)
    if self.random_flip and rng.random() < 0.5:
      img = img[:, ::-1]
    x = img.astype(np.float32)
    if self.uniform_dequantization:
      x = (x + rng.random(x.shape, dtype=np.float32)) / 256.0
    else:
      x = x / 255.0
    if self.gaussian_dequantization:
      x = x + 0.01 * rng.standard_normal(x.shape, dtype=np.float32)
    return 2.0 * x - 1.0 if self.centered else x


def _check_shape(dataset: str, image_size: int, num_channels: int) -> None:
  if image_size < 4:
    raise ValueError(f"data.image_size={image_size} is too small (>= 4)")
  if num_channels not in (1, 3):
    raise ValueError(f"data.num_channels={num_channels} must be 1 or 3")
  info = _info(dataset)
  if info.crop == "celeba" and image_size > 140:
    raise ValueError(f"celeb_a is center-cropped to 140 px: data.image_size={image_size} must be "
                     "<= 140")


class ProcessRows(grain.MapDataset):
  """Element `n`: this process's rows of global batch `n` of the example stream `parent`.

  Global batch n is examples `n * global_batch ... (n + 1) * global_batch - 1` of the stream, and
  process p of P reads its `global_batch / P` consecutive rows of it, so the global batch of each
  step (and the order of the whole stream) is that of one process whatever the process count, and
  every example is read by exactly one process. Trailing examples short of a global batch are
  dropped (`drop_remainder`).
  """

  def __init__(self, parent: grain.MapDataset, *, global_batch: int, shard_index: int,
               shard_count: int):
    super().__init__(parent)
    if global_batch % shard_count:
      raise ValueError(f"the global batch {global_batch} does not split over {shard_count} "
                       "processes")
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index={shard_index} must be in 0..{shard_count - 1}")
    self._global = global_batch
    self._local = global_batch // shard_count
    self._first = shard_index * self._local

  def __len__(self) -> int:
    return len(self._parent) // self._global

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    start = index * self._global + self._first
    rows = [self._parent[start + r] for r in range(self._local)]
    return {"x": np.stack(rows).astype(np.float32)}

  def __str__(self) -> str:
    return f"ProcessRows(global_batch={self._global}, rows={self._first}+{self._local})"


class ImageIterator:
  """Batches `{"x": float32 [b, s, s, c]}` with a JSON-serializable `get_state`/`set_state`.

  The state counts global batches (`ProcessRows`), so a checkpoint's data state resumes the same
  stream on any number of processes.
  """

  def __init__(self, batched: grain.MapDataset, prefetch: int, num_workers: int):
    read = grain.ReadOptions(num_threads=max(1, prefetch), prefetch_buffer_size=max(1, prefetch))
    iter_ds = batched.to_iter_dataset(read_options=read)
    if num_workers > 0:
      iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    self._it = iter(iter_ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict:
    state = self._it.get_state()
    return {"kind": "grain", "state": _jsonable(state)}

  def set_state(self, state: dict) -> None:
    if state.get("kind") != "grain":
      raise ValueError(f"data state {state!r} is not an image pipeline's state")
    self._it.set_state(_from_jsonable(state["state"]))


def _jsonable(v):
  if isinstance(v, bytes):
    return {"__bytes__": v.hex()}
  if isinstance(v, dict):
    return {k: _jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  if isinstance(v, np.integer):
    return int(v)
  return v


def _from_jsonable(v):
  if isinstance(v, dict):
    if set(v) == {"__bytes__"}:
      return bytes.fromhex(v["__bytes__"])
    return {k: _from_jsonable(x) for k, x in v.items()}
  if isinstance(v, list):
    return [_from_jsonable(x) for x in v]
  return v


def create_iterator(*, dataset: str, split: str, batch_size: int, image_size: int,
                    num_channels: int, data_dir: str | None = None, path: str | None = None,
                    random_flip: bool = False, uniform_dequantization: bool = False,
                    gaussian_dequantization: bool = False, centered: bool = False, seed: int = 0,
                    shard_index: int = 0, shard_count: int = 1, num_workers: int = 0,
                    prefetch: int = 2, num_epochs: int | None = None, shuffle: bool = True,
                    drop_remainder: bool = True) -> ImageIterator:
  """The training (or evaluation) iterator of an image dataset for one process.

  Args:
    batch_size: rows per batch on this process; the global batch is `batch_size * shard_count`.
    seed: shuffling and per-record randomness.
    shard_index, shard_count: this process's rows of each global batch (`ProcessRows`): the
      stream of global batches is the same for any process count.
    num_epochs: None repeats forever.
    shuffle: global shuffle per epoch (off for evaluation reads).
  """
  _check_shape(dataset, image_size, num_channels)
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  if not drop_remainder:
    raise ValueError("drop_remainder=False is not supported: every step needs a full batch")
  info = _info(dataset)
  source = _source(dataset, split, data_dir, path)
  ds = grain.MapDataset.source(source)
  global_batch = batch_size * shard_count
  if len(ds) < global_batch:
    raise ValueError(f"{dataset}/{split} has {len(ds)} records, fewer than the global batch "
                     f"{global_batch}")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  pre = Preprocess(image_size=image_size, num_channels=num_channels, crop=info.crop,
                   random_flip=random_flip, uniform_dequantization=uniform_dequantization,
                   gaussian_dequantization=gaussian_dequantization, centered=centered)
  ds = ds.random_map(pre, seed=seed + 1)
  batched = ProcessRows(ds, global_batch=global_batch, shard_index=shard_index,
                        shard_count=shard_count)
  return ImageIterator(batched, prefetch, num_workers)


def num_records(*, dataset: str, split: str, data_dir: str | None = None,
                path: str | None = None) -> int:
  """The number of records in `dataset`/`split` (a folder is checked as for training)."""
  return len(_source(dataset, split, data_dir, path))


def load_array(*, dataset: str, split: str, image_size: int, num_channels: int,
               data_dir: str | None = None, path: str | None = None,
               max_examples: int | None = None, centered: bool = False) -> np.ndarray:
  """The first `max_examples` records, unshuffled and without random augmentation: [n, s, s, c]."""
  _check_shape(dataset, image_size, num_channels)
  info = _info(dataset)
  source = _source(dataset, split, data_dir, path)
  n = len(source) if max_examples is None else min(max_examples, len(source))
  pre = Preprocess(image_size=image_size, num_channels=num_channels, crop=info.crop,
                   centered=centered)
  return np.stack([pre.deterministic(source[i]) for i in range(n)]).astype(np.float32)
