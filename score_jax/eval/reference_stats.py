"""Reference statistics of the image metrics: from a statistics file, the workdir's cache, or data.

FID compares the mean and covariance of sample features with those of a reference set (Heusel et
al. 2017); KID also needs the reference features. They come from `eval.reference_stats` (an
`.npz` with `mu`, `sigma` and optionally `features`, e.g. the TTUR statistics) or are computed
from the first `eval.reference_num_images` images of `eval.reference_split` (the papers'
protocol: the 50k CIFAR-10 training images, the CelebA test set), unshuffled, not dequantized, and
cached under `<workdir>/eval_cache/` with a description of how they were made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from score_jax import image_data, parallel, progress
from score_jax import paths as storage
from score_jax.config_schema import UsageError
from score_jax.eval import metrics
from score_jax.eval.feature_nets import Features

if TYPE_CHECKING:
  from score_jax.experiment import DataSpec, EvalSpec


def reference_split(ev: EvalSpec, d: DataSpec) -> tuple[str, int]:
  """The split and image count of computed reference statistics: `eval.reference_split` (None:
  `data.eval_split`) and `eval.reference_num_images` (None: `eval.num_samples`); the values
  `config_schema.reference_split` checks before a run starts."""
  split = ev.reference_split or d.eval_split
  n = ev.reference_num_images or ev.num_samples
  if n < 2:
    raise ValueError(f"eval.reference_num_images={n}: reference statistics need at least 2 images")
  return split, int(n)


def _reference_path(ev: EvalSpec, d: DataSpec, workdir: str, kind: str) -> str:
  split, n = reference_split(ev, d)
  prefix = "ref_stats" if kind == "inception" else f"ref_stats_{kind}"
  name = f"{prefix}_{d.dataset.replace('/', '-')}_{split}_{n}.npz"
  return storage.join(workdir, "eval_cache", name)


def reference_statistics(ev: EvalSpec, d: DataSpec, workdir: str,
                         featurize: Callable[[np.ndarray], Features], weights_id: str, *,
                         seed: int, kind: str = "inception") -> dict[str, np.ndarray | None]:
  """Reference `{"mu", "sigma", "features"}`: from `eval.reference_stats`, the cache, or data.

  A given `.npz` must hold `mu` and `sigma` (KID also needs `features`, else it is skipped).
  Computed statistics use the first `reference_num_images` images of the reference split
  (`reference_split`) without shuffling, flips or dequantization, and are cached (one file per
  feature kind) with a description of how they were made (feature kind, weights, image size,
  channels, data path); a cache made differently is recomputed.

  Args:
    ev: the run's eval spec (`Experiment.eval`).
    d: the run's data spec (`Experiment.data`).
    workdir: holds the cache, `<workdir>/eval_cache/`.
    featurize: `[b, ...]` images in the data's range -> `{"pool": [b, d], ...}`.
    weights_id: names the feature network's weights (Inception: the file name; the MNIST
      classifier: `params_digest` of its parameters).
    seed: the run's seed (the reference images' reader).
    kind: the feature kind ("inception" or "mnist_classifier").
  """
  if ev.reference_stats:
    f = storage.load_npz(ev.reference_stats)
    if "mu" not in f or "sigma" not in f:
      raise UsageError(f"eval.reference_stats={ev.reference_stats} must hold arrays 'mu' and "
                       f"'sigma' (found {list(f)})")
    return {"mu": f["mu"], "sigma": f["sigma"], "features": f.get("features"),
            "protocol": f"statistics file {os.path.basename(ev.reference_stats)}"}
  description = {"weights": weights_id, "image_size": d.image_size,
                 "num_channels": d.num_channels, "path": d.path, "data_dir": d.data_dir}
  if kind != "inception":  # Inception caches made before other kinds existed stay valid.
    description = {"kind": kind, **description}
  meta = json.dumps(description)
  path = _reference_path(ev, d, workdir, kind)
  split, n = reference_split(ev, d)
  protocol = f"{d.dataset}:{split} first {n} images"
  # Process 0 reads the cache for every process: all of them compute the statistics or none.
  cached = parallel.from_main(lambda: _cached(path, meta))
  if cached is not None:
    return {**cached, "protocol": protocol}
  available = image_data.num_records(dataset=d.dataset, split=split, data_dir=d.data_dir,
                                     path=d.path)
  if n > available:
    setting = "eval.reference_num_images" if ev.reference_num_images else "eval.num_samples"
    raise ValueError(f"{setting}={n} exceeds the {available} images of {d.dataset}/{split} (the "
                     f"reference statistics would repeat images); lower {setting} or give "
                     "eval.reference_stats")
  ref_data = dataclasses.replace(d, uniform_dequantization=False, gaussian_dequantization=False)
  batch = min(ev.batch_size, n)
  # Every process reads the same images: `featurize` splits each batch over all devices.
  it = ref_data.iterator(split=split, seed=seed, batch_size=batch, shuffle=False,
                         per_process=False)
  parts, count = [], 0
  with progress.bar(n, f"reference {d.dataset}:{split}",
                    unit="image") as pbar:
    while count < n:
      parts.append(featurize(np.asarray(next(it)["x"])))
      pbar.update(min(batch, n - count))
      count += batch
  features = np.concatenate([p["pool"] for p in parts])[:n]
  mu, sigma = metrics.feature_stats(features)
  if parallel.is_main_process():
    storage.save_npz(path, mu=mu, sigma=sigma, features=features.astype(np.float32),
                     meta=np.array(meta))
  return {"mu": mu, "sigma": sigma, "features": features, "protocol": protocol}


def _cached(path: str, meta: str) -> dict[str, np.ndarray] | None:
  """The cached `{"mu", "sigma", "features"}` at `path` if it was made as `meta` says."""
  if not storage.isfile(path):
    return None
  f = storage.load_npz(path)
  if "meta" not in f or str(f["meta"]) != meta:
    return None
  return {"mu": f["mu"], "sigma": f["sigma"], "features": f["features"]}


def stats_digest(reference: dict[str, Any]) -> str:
  """sha256 (first 16 hex digits) of reference statistics `mu` and `sigma`: names the reference."""
  digest = hashlib.sha256()
  for name in ("mu", "sigma"):
    a = np.ascontiguousarray(np.asarray(reference[name], np.float64))
    digest.update(f"{name}:{a.shape};".encode())
    digest.update(a.tobytes())
  return digest.hexdigest()[:16]
