"""FID, KID and IS between any two image sources, and reference statistics files.

    python -m score_jax.eval.fid A B [--num_images=N] [--batch_size=250] [--inception_weights=...]
    python -m score_jax.eval.fid cifar10:train --save_stats=cifar10_train_stats.npz

A source is one of:
* a folder of images (`.png`, `.jpg`, `.jpeg`, read in sorted file-name order);
* an `.npz` of images: the array `x` (a `samples/<tag>.npz` of `--mode=sample`) or its only
  array; uint8 in [0, 255], or floats in [0, 1] ([-1, 1] with `--centered`);
* an `.npz` of statistics: `mu` and `sigma` (and optionally `features`, for KID), e.g. one
  written by `--save_stats` or the TTUR `fid_stats_cifar10_train.npz`;
* `dataset:split` (e.g. `cifar10:train`, `celeb_a:test`): the dataset as score_jax prepares it
  (`--image_size`, `--num_channels`, `--data_dir`), unshuffled, not dequantized.

Images are quantized to 8 bits as if saved to PNG and go through the project's port of the
pytorch-fid Inception network (`score_jax.eval.inception`) over every device; FID is Heusel et al.
2017 (the pytorch-fid computation), KID Binkowski et al. 2018 (needs features on both sides), IS
Salimans et al. 2016 (needs images and weights with the 1008-way logits). With `--save_stats`,
the first source's statistics (`mu`, `sigma`, `features`) are written: on all 50k CIFAR-10
training images they play the role of the TTUR statistics the NCSNv2 FID numbers use.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zipfile
from typing import Any, Callable

import jax
import numpy as np

from score_jax import image_data, progress
from score_jax.eval import feature_nets, fetch_inception, inception, metrics

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_KID_TAG = 2

Source = dict[str, Any]


def load_source(spec: str, *, centered: bool = False, image_size: int = 32,
                num_channels: int = 3, data_dir: str | None = None,
                max_images: int | None = None) -> Source:
  """Reads a source: `{"images": [n, h, w, c] in [0, 1]}` or `{"mu", "sigma", "features"}`.

  Args:
    spec: a folder of images, an `.npz` of images or of statistics, or `dataset:split`.
    centered: `.npz` float images are in [-1, 1].
    image_size, num_channels, data_dir: how a `dataset:split` is prepared.
    max_images: keep the first this many images (None: all).
  """
  if os.path.isdir(spec):
    from PIL import Image
    names = sorted(n for n in os.listdir(spec) if n.lower().endswith(_IMAGE_SUFFIXES))
    if not names:
      raise ValueError(f"{spec} holds no {'/'.join(_IMAGE_SUFFIXES)} images")
    names = names[:max_images]
    images = [_read_image(os.path.join(spec, n)) for n in names]
    for n, image in zip(names, images):
      if image.shape != images[0].shape:
        raise ValueError(f"{os.path.join(spec, n)} is {image.shape[1]}x{image.shape[0]}, but "
                         f"{names[0]} is {images[0].shape[1]}x{images[0].shape[0]}: the images of "
                         "a folder must share one size")
    return {"images": np.stack(images).astype(np.float32) / 255.0, "name": spec}
  if spec.endswith(".npz"):
    if not os.path.isfile(spec):
      raise ValueError(f"{spec} does not exist")
    try:
      return _load_npz_source(spec, centered=centered, max_images=max_images)
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
      raise ValueError(f"{spec} is not a readable .npz ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:120]}); is it damaged?") from None
  dataset, sep, split = spec.partition(":")
  if not sep or not dataset or not split:
    raise ValueError(f"source {spec!r}: no such folder or .npz file, and not dataset:split "
                     "(e.g. cifar10:train)")
  images = image_data.load_array(dataset=dataset, split=split, image_size=image_size,
                                 num_channels=num_channels, data_dir=data_dir,
                                 max_examples=max_images)
  return {"images": images, "name": spec}


def _read_image(path: str) -> np.ndarray:
  """One image file as `[h, w, 3]` uint8; ValueError naming the file if it cannot be decoded."""
  from PIL import Image
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for damaged or foreign files
    raise ValueError(f"{path} is not a readable image ({' '.join(str(e).split())[:120]}); "
                     "replace or remove it") from None


def _load_npz_source(spec: str, *, centered: bool, max_images: int | None) -> Source:
  # allow_pickle stays False: an object array is refused here, not met with numpy's advice to
  # enable pickles.
  with np.load(spec, allow_pickle=False) as f:
    try:
      if "mu" in f.files and "sigma" in f.files:
        return {"mu": f["mu"], "sigma": f["sigma"], "name": spec,
                "features": f["features"] if "features" in f.files else None}
      if "x" in f.files:
        x = f["x"]
      elif len(f.files) == 1:
        x = f[f.files[0]]
      else:
        raise ValueError(f"{spec} holds {f.files}: give 'mu' and 'sigma' (statistics), 'x' "
                         "(images) or a single image array")
    except ValueError as e:
      if "allow_pickle" not in str(e):
        raise
      raise ValueError(f"{spec} holds object arrays (pickles), which are not read; save plain "
                       "numeric arrays") from None
  return {"images": _unit_images(x[:max_images], centered=centered, where=spec), "name": spec}


def _unit_images(x: np.ndarray, *, centered: bool, where: str) -> np.ndarray:
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"{where}: images must be [n, h, w, 1 or 3], got shape {x.shape}")
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  x = x.astype(np.float32)
  return (x + 1.0) / 2.0 if centered else x


def source_statistics(source: Source, featurize: Callable[[np.ndarray], dict], *,
                      batch_size: int) -> Source:
  """Statistics `{"mu", "sigma", "features"(, "logits")}` of a source (statistics pass through)."""
  if "images" not in source:
    return source
  images, parts = source["images"], []
  with progress.bar(len(images), f"features {source['name']}", unit="image") as pbar:
    for start in range(0, len(images), batch_size):
      parts.append(featurize(images[start:start + batch_size]))
      pbar.update(len(parts[-1]["pool"]))
  features = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  mu, sigma = metrics.feature_stats(features["pool"])
  out = {"mu": mu, "sigma": sigma, "features": features["pool"], "name": source["name"],
         "finite_fraction": float(np.mean(features["finite"]))}
  if "logits" in features:
    out["logits"] = features["logits"]
  return out


def compare(a: Source, b: Source, *, rng: jax.Array,
            kid_subset_size: int = metrics.KID_SUBSET_SIZE) -> dict[str, Any]:
  """FID between two sources' statistics; KID when both have features; IS of each image source.

  KID's spread over subsets (`kid_std`) is reported only when both sources have more images than
  `kid_subset_size`: otherwise every subset of the smaller one is that whole set, and the spread
  (zero up to rounding for two such sets) says nothing about the estimate; `kid_note` says so.
  """
  out: dict[str, Any] = {"a": a["name"], "b": b["name"]}
  out["fid"] = metrics.frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])
  if a.get("features") is not None and b.get("features") is not None:
    out["kid"], kid_std = metrics.kernel_inception_distance(
        a["features"], b["features"], rng=jax.random.fold_in(rng, _KID_TAG),
        subset_size=kid_subset_size)
    fewest = min(len(a["features"]), len(b["features"]))
    if fewest > kid_subset_size:
      out["kid_std"] = kid_std
    else:
      out["kid_note"] = (f"kid_std omitted: {fewest} images are not more than the KID subset "
                         f"size {kid_subset_size}, so every subset is the whole set")
  for side, s in (("a", a), ("b", b)):
    if "logits" in s:
      out[f"inception_score_{side}"], out[f"inception_score_std_{side}"] = (
          metrics.inception_score(s["logits"], splits=min(10, len(s["logits"]))))
  return out


def save_statistics(stats: Source, path: str) -> None:
  """Writes `mu`, `sigma` and `features` of `stats` to an `.npz` (a `reference_stats` file)."""
  arrays = {"mu": stats["mu"], "sigma": stats["sigma"]}
  if stats.get("features") is not None:
    arrays["features"] = np.asarray(stats["features"], np.float32)
  np.savez(path, **arrays)


def inception_featurize(weights: str | None) -> Callable[[np.ndarray], dict]:
  """Inception features (`feature_nets.image_features`) of images `[b, h, w, c]` in [0, 1]."""
  try:
    path = os.fspath(fetch_inception.ensure_weights(weights))  # fetched on first use
  except fetch_inception.FetchError as e:
    raise ValueError(str(e)) from None
  net = feature_nets.make_inception_fn(inception.load_params(path))
  return lambda x: feature_nets.image_features(net, x, centered=False)


def check_sources(sources: list[str], save_stats: str | None) -> None:
  """ValueError unless there are two sources, or one with a statistics file to write."""
  if not 1 <= len(sources) <= 2:
    raise ValueError(f"give one source (with --save_stats) or two to compare, got {len(sources)}")
  if len(sources) == 1 and not save_stats:
    raise ValueError("one source only makes sense with --save_stats=<file.npz>; give two sources "
                     "to compare")


def run(sources: list[str], *, featurize: Callable[[np.ndarray], dict], batch_size: int = 250,
        save_stats: str | None = None, seed: int = 0, **load_kwargs) -> dict[str, Any]:
  """The command's work: statistics of one or two sources, their comparison, saved statistics."""
  check_sources(sources, save_stats)
  stats = [source_statistics(load_source(s, **load_kwargs), featurize, batch_size=batch_size)
           for s in sources]
  out: dict[str, Any] = {}
  if save_stats:
    save_statistics(stats[0], save_stats)
    out["saved_stats"] = save_stats
  if len(stats) == 2:
    out.update(compare(stats[0], stats[1], rng=jax.random.key(seed)))
  for side, s in zip("ab", stats):
    if "finite_fraction" in s:
      out[f"finite_fraction_{side}"] = s["finite_fraction"]
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m score_jax.eval.fid", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--helpfull", action="help", help="the same as --help")
  parser.add_argument("sources", nargs="+", help="folder, .npz (images or statistics), or "
                      "dataset:split")
  parser.add_argument("--save_stats", help="write the first source's statistics to this .npz")
  parser.add_argument("--inception_weights", help="converted Inception .npz (default: the "
                      "fetch_inception cache)")
  parser.add_argument("--batch_size", type=int, default=250)
  parser.add_argument("--num_images", type=int, help="use the first N images of each source")
  parser.add_argument("--centered", action="store_true", help=".npz float images in [-1, 1]")
  parser.add_argument("--image_size", type=int, default=32, help="for dataset:split sources")
  parser.add_argument("--num_channels", type=int, default=3, help="for dataset:split sources")
  parser.add_argument("--data_dir", help="TFDS data dir for dataset:split sources")
  parser.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
  args = parser.parse_args(argv)
  try:
    if args.batch_size < 1:
      raise ValueError(f"--batch_size={args.batch_size} must be >= 1")
    check_sources(args.sources, args.save_stats)
    out = run(args.sources, featurize=inception_featurize(args.inception_weights),
              batch_size=args.batch_size, save_stats=args.save_stats, seed=args.seed,
              centered=args.centered, image_size=args.image_size,
              num_channels=args.num_channels, data_dir=args.data_dir,
              max_images=args.num_images)
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  # Nothing finite to report: a NaN FID (statistics that are not finite), or a source none of
  # whose images is finite (its features are those of the stand-in the network gets instead).
  empty = [args.sources[i] for i, side in enumerate("ab") if out.get(f"finite_fraction_{side}") == 0]
  if empty:
    print(f"error: no image of {empty[0]} is finite (NaN or infinite values): nothing to "
          "measure; check the source", file=sys.stderr)
    return 1
  if "fid" in out and not math.isfinite(out["fid"]):
    print(f"error: the FID is {out['fid']}: the statistics of {args.sources[0]} or "
          f"{args.sources[1]} hold non-finite values; check the sources", file=sys.stderr)
    return 1
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
