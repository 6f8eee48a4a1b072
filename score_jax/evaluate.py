"""Sample quality of checkpoints and of sampler settings (`main.py --mode=eval|sampler_sweep`).

* `eval`: every checkpoint in the workdir (between `eval.begin_step` and `eval.end_step`) draws
  `eval.num_samples` samples with the configured sampler from its first EMA parameters; one JSON
  line per checkpoint goes to `<workdir>/eval_metrics.jsonl` (and TensorBoard `tb/eval_metrics`),
  then a table and the best checkpoint are printed, the table is written to
  `<workdir>/eval_metrics.csv` and the metrics against the step are plotted in `eval_metrics.png`.
* `sampler_sweep`: the latest checkpoint samples with every combination of `eval.sweep_methods` x
  `sweep_step_lrs` x `sweep_steps_per_sigma` x `sweep_denoise` (knobs a method does not use are
  dropped, and CAS step sizes outside its feasibility interval sigma_L^2 (1 -/+ gamma) are
  recorded as skipped with the reason); rows go to `<workdir>/sampler_sweep.jsonl`, a table
  sorted by the main metric is printed and written to `sampler_sweep.csv`, and the main metric
  against step_lr (one line per method, steps per level and denoising) to `sampler_sweep.png`.

Both modes resume: an entry whose `eval.records.entry_key` (checkpoint step, sampler settings,
number of samples, feature space, seed, digests of the feature weights and of the reference
statistics) already has a row in the JSON lines is not evaluated again; its stored row joins the
table, the CSV, the plot and the ranking. Within an entry, the features of each finished batch
of samples are kept under `<workdir>/eval_cache/batches/<digest>/` until the row is written, so
an evaluation interrupted mid-way continues from its last finished batch. Every row states its
protocol (`protocol`: sample count and reference set).

Samples are drawn over every device of every host (`parallel.shard_sampler`): sample k comes
from the key folded from (seed, k), so the numbers do not depend on the device count, the hosts
or `eval.batch_size`. Inception and classifier features run over every device too
(`parallel.batch_map`). Progress bars (`tqdm.auto`) show the rate and the time left.

Metrics (`score_jax.eval.metrics`, `score_jax.toy`):
* toys: unbiased RBF-kernel MMD^2 (main metric) and energy distance against samples of the true
  distribution, plus mode weights for mixtures (`toy.sample_metrics`);
* images: FID (main metric; Heusel et al. 2017, the pytorch-fid computation), KID (Binkowski et al.
  2018) and, when the Inception weights carry the 1008-way logits, the Inception Score, on the
  pool3 features of the FID Inception network. Samples are mapped to [0, 1], clipped and
  quantized to 8 bits (as images saved to PNG, the protocol of the NCSN/NCSNv2 FID numbers);
  grayscale is repeated to three channels. Reference statistics come from `eval.reference_stats`
  or from the first `eval.reference_num_images` images of `eval.reference_split` (defaults:
  `eval.num_samples`, `data.eval_split`; unshuffled, not dequantized), cached with their features
  under `<workdir>/eval_cache/`;
* MNIST (`eval.features="mnist_classifier"`, 28x28x1 images only): the same FID formula and KID
  (`fid_mnist`, the main metric, and `kid_mnist`) on the 128-d penultimate features of the
  project's digit classifier (`score_jax.eval.mnist_classifier`), with samples mapped and quantized as
  above (one channel). The weights come from `eval.mnist_classifier_weights` or the classifier's
  cache file; reference statistics are made as for Inception and cached keyed by a digest of the
  weights.

Every draw uses keys folded from `config.seed`, the same for every checkpoint and every sweep
setting (common random numbers), so evaluations are reproducible and comparable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from score_jax import (checkpoint, data, experiment, image_data, models, noise, parallel, progress,
                       samplers, toy)
from score_jax import paths as storage
from score_jax.config_schema import UsageError
from score_jax.eval import fetch_inception, inception, metrics, mnist_classifier
from score_jax.eval.records import (as_float, entry_key, format_table, plot_eval, plot_sweep,
                                    rank_key, stored_rows, table_metric_columns, write_outputs,
                                    write_row)
from score_jax.metric_writers import MetricWriter
from score_jax.train_state import TrainState

_EVAL_TAG = 0xE7A1
_SAMPLE_TAG, _REFERENCE_TAG, _KID_TAG = 0, 1, 2
_FEATURES = ("auto", "inception", "mnist_classifier", "toy")
# Sampler arguments the sweep grid sets per sampler (others are recorded as None and not swept);
# `eval.sweep_steps_per_sigma` gives ALS's steps and PC's corrector steps per level.
_METHOD_KNOBS = {"als": ("step_lr", "steps_per_sigma"), "cas": ("step_lr",),
                 "pc": ("corrector_steps",), "euler": ("num_steps",), "heun": ("num_steps",),
                 "dpm_solver_pp_2m": ("num_steps",), "adaptive": ("rel_tol",)}
_METHODS = tuple(_METHOD_KNOBS)
FETCH_COMMAND = "python -m score_jax.eval.fetch_inception"
CLASSIFIER_COMMAND = "python -m score_jax.eval.mnist_classifier --manual_dir={manual_dir}"
# The metric that ranks checkpoints and sampler settings, per feature kind (lower is better).
MAIN_METRICS = {"toy": "mmd_rbf", "inception": "fid", "mnist_classifier": "fid_mnist"}
# `image_metrics` names -> names in the classifier's feature space (not comparable to Inception's).
_CLASSIFIER_NAMES = {"fid": "fid_mnist", "fid_error": "fid_mnist_error", "kid": "kid_mnist",
                     "kid_std": "kid_mnist_std"}

Features = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """Turns sample batches into features, and features of all samples into metrics.

  Attributes:
    main_metric: the metric that ranks checkpoints and sampler settings (lower is better).
    featurize: `[b, ...]` samples -> dict of per-example arrays `[b, ...]`.
    score: the concatenated features of all samples -> flat dict of metrics.
    identity: what the numbers are measured against, stored in every row and part of its
      `entry_key`: `protocol` (a readable description of the reference), `features_digest` (the
      feature network's weights) and `reference_digest` (the reference statistics).
  """
  main_metric: str
  featurize: Callable[[np.ndarray], Features]
  score: Callable[[Features], dict[str, Any]]
  identity: dict[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Images -> Inception features.


def to_unit_images(x: np.ndarray, *, centered: bool) -> tuple[np.ndarray, np.ndarray]:
  """Images as if saved to PNG: in [0, 1], 8-bit levels, channels kept.

  Args:
    x: images `[b, h, w, c]` in [0, 1] (or [-1, 1] when `centered`).
    centered: whether `x` is in [-1, 1].

  Returns:
    `(images [b, h, w, c] float32, finite [b])`: non-finite pixels become 0 (and the example is
    flagged), values are clipped to [0, 1] and rounded to multiples of 1/255.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 4:
    raise ValueError(f"image features need images [b, h, w, c], got shape {x.shape}")
  finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
  if centered:
    x = (x + 1.0) / 2.0
  x = np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
  return (np.round(x * 255.0) / 255.0).astype(np.float32), finite


def to_inception_input(x: np.ndarray, *, centered: bool) -> tuple[np.ndarray, np.ndarray]:
  """Images as the FID network takes them: RGB in [0, 1], 8-bit levels (see `to_unit_images`).

  Args:
    x: images `[b, h, w, c]`, c in (1, 3), in [0, 1] (or [-1, 1] when `centered`).
    centered: whether `x` is in [-1, 1].

  Returns:
    `(images [b, h, w, 3], finite [b])`; grayscale is repeated to three channels.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"Inception features need images [b, h, w, 1 or 3], got shape {x.shape}")
  x, finite = to_unit_images(x, centered=centered)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x, finite


def make_inception_fn(variables: inception.Variables, mesh: jax.sharding.Mesh | None = None
                      ) -> Callable[[np.ndarray], Features]:
  """A map from images `[b, h, w, 3]` in [0, 1] to `{"pool": [b, 2048]}` (+ `"logits"` `[b, 1008]`).

  Runs over every device of `mesh` (all devices of all hosts by default). Logits are returned
  when the weights hold the `fc` layer (`inception.has_logits`).
  """
  with_logits = inception.has_logits(variables)
  model = inception.InceptionV3FID(with_logits=with_logits)
  if not with_logits:
    variables = {"params": {k: v for k, v in variables["params"].items() if k != "fc"},
                 "batch_stats": variables["batch_stats"]}
  return device_features(lambda v, x: dict(model.apply(v, x)), variables, mesh)


def device_features(apply: Callable[[Any, jax.Array], Any], params: Any,
                    mesh: jax.sharding.Mesh | None = None) -> Callable[[np.ndarray], Any]:
  """`apply(params, x)` over the rows of host batches split across every device of `mesh`.

  The parameters are placed on the devices once; a batch of any size (padded to the device
  count, see `parallel.batch_map`) returns host arrays.
  """
  mesh = mesh or parallel.make_mesh()
  params = parallel.replicate(params, mesh)
  p_apply = parallel.batch_map(apply, mesh)
  return lambda x: p_apply(params, np.asarray(x, np.float32))


def image_features(net: Callable[[np.ndarray], Features], x: np.ndarray, *,
                   centered: bool) -> Features:
  """Inception features of one batch of images (see `to_inception_input`).

  Returns:
    `{"pool": [b, 2048], "finite": [b]}`, plus `"logits"` `[b, 1008]` when `net` gives them.
  """
  images, finite = to_inception_input(x, centered=centered)
  return {**net(images), "finite": finite}


def inception_weights_path(config: ml_collections.ConfigDict) -> str:
  """`eval.inception_weights`, else the fetch CLI's default file; ValueError if it is missing."""
  path = config.eval.inception_weights or os.fspath(fetch_inception.default_npz_path())
  if not storage.isfile(path):
    raise UsageError(f"FID Inception weights not found at {path}: run `{FETCH_COMMAND}` first "
                     "(or set --config.eval.inception_weights to a converted .npz)")
  return path


# --------------------------------------------------------------------------------------------
# MNIST digits -> classifier features.


def classifier_weights_path(config: ml_collections.ConfigDict) -> str:
  """`eval.mnist_classifier_weights`, else the classifier's cache file; ValueError if missing."""
  path = (config.eval.mnist_classifier_weights
          or os.fspath(mnist_classifier.default_params_path()))
  if not storage.isfile(path):
    command = CLASSIFIER_COMMAND.format(
        manual_dir=config.data.manual_dir or "<folder with the official MNIST .gz files>")
    raise UsageError(f"MNIST classifier weights not found at {path}: run `{command}` first (or "
                     "set --config.eval.mnist_classifier_weights to a saved classifier .npz)")
  return path


def params_digest(params: Any) -> str:
  """sha256 of a parameter tree's paths, dtypes, shapes and values: names one feature space."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    a = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
    digest.update(a.tobytes())
  return digest.hexdigest()


def classifier_features_fn(params: Any, mesh: jax.sharding.Mesh | None = None
                           ) -> Callable[[np.ndarray], np.ndarray]:
  """The classifier's 128-d features of digits `[b, 28, 28, 1]` in [0, 1], over all devices."""
  model = mnist_classifier.MnistClassifier()
  return device_features(lambda p, x: model.apply({"params": p}, x)[1], params, mesh)


def classifier_features(net: Callable[[np.ndarray], np.ndarray], x: np.ndarray, *,
                        centered: bool) -> Features:
  """Classifier features of one batch of digits (mapped as in `to_unit_images`).

  Args:
    net: `mnist_classifier.features_fn(params)`: `[b, 28, 28, 1]` in [0, 1] -> `[b, 128]`.
    x: digits `[b, 28, 28, 1]` in the data's range.
    centered: whether `x` is in [-1, 1].

  Returns:
    `{"pool": [b, 128], "finite": [b]}` (`pool` names the penultimate features, as for Inception).
  """
  images, finite = to_unit_images(x, centered=centered)
  return {"pool": np.asarray(net(images)), "finite": finite}


def classifier_metrics(features: Features, reference: dict[str, np.ndarray | None],
                       rng: jax.Array) -> dict[str, Any]:
  """`image_metrics` in the classifier's feature space, named `fid_mnist`, `kid_mnist`, ..."""
  out = image_metrics(features, reference, rng)
  return {_CLASSIFIER_NAMES.get(k, k): v for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Features -> metrics, reference statistics.


def image_metrics(features: Features, reference: dict[str, np.ndarray | None],
                  rng: jax.Array) -> dict[str, Any]:
  """FID, KID (when reference features exist) and IS (when logits exist) of sample features.

  Args:
    features: `{"pool": [n, 2048], "finite": [n]}` (+ `"logits"` `[n, 1008]`).
    reference: `{"mu": [2048], "sigma": [2048, 2048], "features": [m, 2048] or None}`.
    rng: key of the KID subsets.
  """
  mu, sigma = metrics.feature_stats(features["pool"])
  out: dict[str, Any] = {"finite_fraction": float(np.mean(features["finite"]))}
  try:
    out["fid"] = metrics.frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
  except ValueError as e:  # A degenerate covariance; the other metrics are still meaningful.
    out["fid"], out["fid_error"] = float("nan"), str(e)
  if reference.get("features") is not None:
    out["kid"], out["kid_std"] = metrics.kernel_inception_distance(
        features["pool"], reference["features"], rng=rng)
  if "logits" in features:
    splits = min(10, len(features["logits"]))
    out["inception_score"], out["inception_score_std"] = metrics.inception_score(
        features["logits"], splits=splits)
  return out


def reference_split(config: ml_collections.ConfigDict) -> tuple[str, int]:
  """The split and image count of computed reference statistics.

  `eval.reference_split` (None: `data.eval_split`) and `eval.reference_num_images` (None:
  `eval.num_samples`). The papers' protocol: the 50k CIFAR-10 training images (the TTUR
  statistics of NCSNv2 and the adversarial/CAS paper), the CelebA test set.
  """
  ev = config.eval
  split = ev.reference_split or config.data.eval_split
  n = ev.reference_num_images or ev.num_samples
  if n < 2:
    raise ValueError(f"eval.reference_num_images={n}: reference statistics need at least 2 images")
  return split, int(n)


def _reference_path(config: ml_collections.ConfigDict, workdir: str, kind: str) -> str:
  d = config.data
  split, n = reference_split(config)
  prefix = "ref_stats" if kind == "inception" else f"ref_stats_{kind}"
  name = f"{prefix}_{d.dataset.replace('/', '-')}_{split}_{n}.npz"
  return storage.join(workdir, "eval_cache", name)


def reference_statistics(config: ml_collections.ConfigDict, workdir: str,
                         featurize: Callable[[np.ndarray], Features], weights_id: str, *,
                         kind: str = "inception") -> dict[str, np.ndarray | None]:
  """Reference `{"mu", "sigma", "features"}`: from `eval.reference_stats`, the cache, or data.

  A given `.npz` must hold `mu` and `sigma` (KID also needs `features`, else it is skipped).
  Computed statistics use the first `reference_num_images` images of the reference split
  (`reference_split`) without shuffling, flips or dequantization, and are cached (one file per
  feature kind) with a description of how they were made (feature kind, weights, image size, channels, data path); a
  cache made differently is recomputed.

  Args:
    config: the run's config (data and eval groups).
    workdir: holds the cache, `<workdir>/eval_cache/`.
    featurize: `[b, ...]` images in the data's range -> `{"pool": [b, d], ...}`.
    weights_id: names the feature network's weights (Inception: the file name; the MNIST
      classifier: `params_digest` of its parameters).
    kind: the feature kind ("inception" or "mnist_classifier").
  """
  ev = config.eval
  if ev.reference_stats:
    f = storage.load_npz(ev.reference_stats)
    if "mu" not in f or "sigma" not in f:
      raise UsageError(f"eval.reference_stats={ev.reference_stats} must hold arrays 'mu' and "
                       f"'sigma' (found {list(f)})")
    return {"mu": f["mu"], "sigma": f["sigma"], "features": f.get("features"),
            "protocol": f"statistics file {os.path.basename(ev.reference_stats)}"}
  d = config.data
  description = {"weights": weights_id, "image_size": d.image_size,
                 "num_channels": d.num_channels, "path": d.path, "data_dir": d.data_dir}
  if kind != "inception":  # Inception caches made before other kinds existed stay valid.
    description = {"kind": kind, **description}
  meta = json.dumps(description)
  path = _reference_path(config, workdir, kind)
  split, n = reference_split(config)
  protocol = f"{d.dataset}:{split} first {n} images"
  if storage.isfile(path):
    f = storage.load_npz(path)
    if "meta" in f and str(f["meta"]) == meta:
      return {"mu": f["mu"], "sigma": f["sigma"], "features": f["features"],
              "protocol": protocol}
  available = image_data.num_records(dataset=d.dataset, split=split, data_dir=d.data_dir,
                                     path=d.path)
  if n > available:
    setting = "eval.reference_num_images" if ev.reference_num_images else "eval.num_samples"
    raise ValueError(f"{setting}={n} exceeds the {available} images of {d.dataset}/{split} (the "
                     f"reference statistics would repeat images); lower {setting} or give "
                     "eval.reference_stats")
  ref_config = config.copy_and_resolve_references()
  ref_config.data.uniform_dequantization = False
  ref_config.data.gaussian_dequantization = False
  batch = min(ev.batch_size, n)
  # Every process reads the same images: `featurize` splits each batch over all devices.
  it = experiment.iterator_from_config(ref_config, split=split, seed=config.seed,
                                       batch_size=batch, shuffle=False, per_process=False)
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


def stats_digest(reference: dict[str, Any]) -> str:
  """sha256 (first 16 hex digits) of reference statistics `mu` and `sigma`: names the reference."""
  digest = hashlib.sha256()
  for name in ("mu", "sigma"):
    a = np.ascontiguousarray(np.asarray(reference[name], np.float64))
    digest.update(f"{name}:{a.shape};".encode())
    digest.update(a.tobytes())
  return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Config -> evaluator.


def feature_kind(config: ml_collections.ConfigDict) -> str:
  """`eval.features` resolved to "toy", "inception" or "mnist_classifier"; ValueError if unusable.

  "auto" is "toy" for toys and "inception" for images; "mnist_classifier" needs 28x28x1 images.
  """
  f, d = config.eval.features, config.data
  dataset = d.dataset
  if f not in _FEATURES:
    raise UsageError(f"eval.features={f!r} is unknown; use one of {_FEATURES}")
  is_toy = data.is_toy(dataset)
  if f == "auto":
    return "toy" if is_toy else "inception"
  if f == "mnist_classifier":
    shape = (d.image_size, d.image_size, d.num_channels)
    if is_toy or shape != mnist_classifier.IMAGE_SHAPE:
      got = "toy points" if is_toy else "x".join(map(str, shape)) + " images"
      raise UsageError(f"eval.features='mnist_classifier' needs 28x28x1 images (MNIST digits); "
                       f"data.dataset={dataset!r} has {got}; use 'inception' or 'auto'")
    return f
  if (f == "toy") != is_toy:
    raise UsageError(f"eval.features={f!r} does not fit data.dataset={dataset!r}; use 'auto'")
  return f


def _toy_evaluator(config: ml_collections.ConfigDict, rng: jax.Array) -> Evaluator:
  distribution = toy.get_toy(config.data.dataset, dim=config.data.toy_dim)
  reference_rng = jax.random.fold_in(rng, _REFERENCE_TAG)
  return Evaluator(
      main_metric=MAIN_METRICS["toy"],
      featurize=lambda x: {"x": np.asarray(x, np.float32)},
      score=lambda f: toy.sample_metrics(f["x"], distribution, reference_rng),
      identity={"protocol": f"against exact samples of {config.data.dataset}"})


def _inception_evaluator(config: ml_collections.ConfigDict, workdir: str,
                         rng: jax.Array) -> Evaluator:
  weights_path = inception_weights_path(config)
  variables = inception.load_params(weights_path)
  net = make_inception_fn(variables)
  centered = config.data.centered
  featurize = lambda x: image_features(net, x, centered=centered)
  reference = reference_statistics(config, workdir, featurize, os.path.basename(weights_path))
  kid_rng = jax.random.fold_in(rng, _KID_TAG)
  return Evaluator(main_metric=MAIN_METRICS["inception"], featurize=featurize,
                   score=lambda f: image_metrics(f, reference, kid_rng),
                   identity=_identity(reference, params_digest(variables)))


def _identity(reference: dict[str, Any], weights_digest: str) -> dict[str, str]:
  return {"protocol": f"against {reference['protocol']}",
          "features_digest": weights_digest[:16], "reference_digest": stats_digest(reference)}


def _classifier_evaluator(config: ml_collections.ConfigDict, workdir: str,
                          rng: jax.Array) -> Evaluator:
  params = mnist_classifier.load_checked(classifier_weights_path(config))
  net = classifier_features_fn(params)
  centered = config.data.centered
  featurize = lambda x: classifier_features(net, x, centered=centered)
  reference = reference_statistics(config, workdir, featurize, params_digest(params),
                                   kind="mnist_classifier")
  if np.shape(reference["mu"]) != (mnist_classifier.NUM_FEATURES,):
    raise UsageError(f"eval.reference_stats={config.eval.reference_stats} holds "
                     f"{np.shape(reference['mu'])[0]}-d statistics; the MNIST classifier's "
                     f"features are {mnist_classifier.NUM_FEATURES}-d (unset it to compute them)")
  kid_rng = jax.random.fold_in(rng, _KID_TAG)
  return Evaluator(main_metric=MAIN_METRICS["mnist_classifier"], featurize=featurize,
                   score=lambda f: classifier_metrics(f, reference, kid_rng),
                   identity=_identity(reference, params_digest(params)))


def make_evaluator(config: ml_collections.ConfigDict, workdir: str, rng: jax.Array) -> Evaluator:
  """The evaluator of the config's data: toy distances, Inception or MNIST-classifier metrics.

  Args:
    config: the run's config (data and eval groups).
    workdir: holds the reference-statistics cache.
    rng: key of the reference samples (toys) and of the KID subsets (images).
  """
  kind = feature_kind(config)
  if kind == "toy":
    return _toy_evaluator(config, rng)
  if kind == "mnist_classifier":
    return _classifier_evaluator(config, workdir, rng)
  return _inception_evaluator(config, workdir, rng)


# --------------------------------------------------------------------------------------------
# Drawing, checkpoints, tables.


def draw_features(sample_batch: Callable[[int, int], np.ndarray], evaluator: Evaluator, *,
                  num_samples: int, batch_size: int, cache_dir: str | None = None,
                  desc: str = "sample") -> Features:
  """Features of samples 0..num_samples-1 drawn in batches (see `draw_features_stacked`).

  Args:
    sample_batch: `(start, n) -> samples [n, ...]` (or `(samples, nfe [n])`), samples
      start..start+n-1 of one sequence.
  """
  def stacked(start: int, n: int):
    out = sample_batch(start, n)
    if isinstance(out, tuple):  # (samples, nfe per sample)
      return np.asarray(out[0])[:, None], out[1]
    return np.asarray(out)[:, None]

  return draw_features_stacked(stacked, evaluator, num_samples=num_samples, batch_size=batch_size,
                               cache_dir=cache_dir, desc=desc)[0]


def draw_features_stacked(sample_batch: Callable[[int, int], np.ndarray], evaluator: Evaluator,
                          *, num_samples: int, batch_size: int, cache_dir: str | None = None,
                          desc: str = "sample") -> list[Features]:
  """Features of k settings' samples, drawn in batches with a progress bar; resumable.

  Every call draws a full batch, so the sampler and the feature network compile once; the
  surplus of the last batch is dropped. With `cache_dir`, each finished batch's features are
  saved there, and batches found there are not drawn again: an interrupted evaluation, rerun,
  continues where it stopped. The caller names the directory by everything that determines the
  features (settings, sample count, batch size, feature weights, seed).

  Args:
    sample_batch: `(start, n) -> samples [n, k, ...]`: samples start..start+n-1 of each of k
      settings (setting j's samples are those a sampler of setting j alone draws).
    evaluator: its `featurize` maps samples `[b, ...]` to per-example features.
    num_samples: the number of samples per setting.
    batch_size: samples per batch.
    cache_dir: where finished batches are kept, or None.
    desc: the progress bar's label.

  Returns:
    One features dict per setting, each array `[num_samples, ...]`.
  """
  batch = min(batch_size, num_samples)
  num_batches = -(-num_samples // batch)
  keep = [min(batch, num_samples - i * batch) for i in range(num_batches)]
  parts = _load_batches(cache_dir, num_batches)
  with progress.bar(num_samples, desc, initial=sum(keep[i] for i in parts)) as pbar:
    for i in range(num_batches):
      if i in parts:
        continue
      out = sample_batch(i * batch, batch)
      xs, nfe = out if isinstance(out, tuple) else (out, None)
      xs = np.asarray(xs)[:keep[i]]
      parts[i] = [evaluator.featurize(xs[:, j]) for j in range(xs.shape[1])]
      if nfe is not None:  # network evaluations per sample, `[n]` or `[n, k]`
        nfe = np.asarray(nfe, np.float64).reshape(len(nfe), -1)
        for j, features in enumerate(parts[i]):
          features["nfe"] = np.broadcast_to(nfe[:, min(j, nfe.shape[1] - 1)], (batch,))[:keep[i]]
      if cache_dir is not None and parallel.is_main_process():
        _save_batch(cache_dir, i, parts[i])
      pbar.update(keep[i])
  return [{name: np.concatenate([parts[i][j][name] for i in range(num_batches)])
           for name in parts[0][j]} for j in range(len(parts[0]))]


def _batch_path(cache_dir: str, i: int) -> str:
  return storage.join(cache_dir, f"batch_{i:06d}.npz")


def _save_batch(cache_dir: str, i: int, features: list[Features]) -> None:
  storage.save_npz(_batch_path(cache_dir, i),
                   **{f"{j}.{name}": v for j, f in enumerate(features) for name, v in f.items()})


def _load_batches(cache_dir: str | None, num_batches: int) -> dict[int, list[Features]]:
  """The finished batches kept in `cache_dir` (a file that does not load is drawn again)."""
  parts: dict[int, list[Features]] = {}
  if cache_dir is None or not storage.isdir(cache_dir):
    return parts
  for i in range(num_batches):
    try:
      f = storage.load_npz(_batch_path(cache_dir, i))
      settings: dict[int, Features] = {}
      for key in f:
        j, name = key.split(".", 1)
        settings.setdefault(int(j), {})[name] = f[key]
    except (OSError, ValueError, EOFError):
      continue
    parts[i] = [settings[j] for j in sorted(settings)]
  return parts


def batch_cache_dir(workdir: str, entries: list[dict], batch_size: int) -> str:
  """Where the finished batches of `entries` (evaluated together) are kept until their rows are.

  The name is a digest of the entries' keys (settings, checkpoint, sample count, features,
  reference, seed) and the batch size, so batches of another evaluation are never mixed in.
  """
  ident = json.dumps([list(entry_key(e)) for e in entries] + [batch_size], default=str)
  name = hashlib.sha256(ident.encode()).hexdigest()[:20]
  return storage.join(workdir, "eval_cache", "batches", name)


def _drop_batches(cache_dir: str) -> None:
  if parallel.is_main_process():
    try:
      storage.as_path(cache_dir).rmtree(missing_ok=True)
    except OSError as e:  # the rows are already written; a cache left behind is only disk space
      print(f"warning: could not remove the batch cache {cache_dir}: {e}", file=sys.stderr)


def _checkpoint_steps(workdir: str) -> list[int]:
  """The checkpoint steps in `workdir`, ascending (read-only); CheckpointError when none."""
  manager = checkpoint.open_reader(workdir)
  try:
    return checkpoint.all_steps(manager)
  finally:
    manager.close()


def score_finite(evaluator: Evaluator, features: Features) -> dict[str, Any]:
  """The evaluator's metrics of the finite samples only, plus `finite_fraction`.

  Non-finite samples would make FID, KID and the toy distances NaN or meaningless, so they are
  dropped; when none is finite only `finite_fraction` (0) is returned.
  """
  finite = features.get("finite")
  if finite is None:
    finite = experiment.finite_rows(next(iter(features.values())))
  finite = np.asarray(finite, bool)
  if not finite.any():
    return {"finite_fraction": 0.0}
  if not finite.all():
    features = {k: np.asarray(v)[finite] for k, v in features.items()}
  return {**evaluator.score(features), "finite_fraction": float(finite.mean())}


def _check_finite(row: dict, *, fatal: bool) -> None:
  """Warns about a row with non-finite samples; with `fatal`, all non-finite is an error."""
  fraction = row.get("finite_fraction", 1.0)
  if fraction == 0.0 and fatal:
    raise experiment.NonFiniteSamplesError(
        f"all {row['num_samples']} samples at step {row['step']} are non-finite "
        f"({row['method']}, step_lr={row['step_lr']}); no metrics computed. Lower "
        "sampling.step_lr or check the checkpoint")
  if fraction < 1.0 and parallel.is_main_process():
    print(f"warning: {1 - fraction:.1%} of the samples at step {row['step']} ({row['method']}, "
          f"step_lr={row['step_lr']}) are non-finite; metrics use the finite ones",
          file=sys.stderr)


def _restore(config: ml_collections.ConfigDict, workdir: str, step: int | None) -> TrainState:
  """The checkpoint's state, after checking that `config` describes the same model and data."""
  stored, state = experiment.load_checkpoint(workdir, step)
  experiment.check_compatible(json.loads(stored.to_json()), config, workdir)
  return state


def _checkpoint_sampler(config: ml_collections.ConfigDict, method: str | None = None,
                        **overrides) -> Callable[[Any, jax.Array, int, int], np.ndarray]:
  """`experiment.make_sample_fn` over all devices, taking the params as an argument.

  Returns:
    `p_sample(params, rng, start, n)`: samples start..start+n-1 (`parallel.shard_sampler`), one
    compiled program for all checkpoints.
  """
  method = method or config.sampling.method
  fn = experiment.make_sample_fn(models.build(config), experiment.sigmas_from_config(config),
                                 experiment.example_shape(config),
                                 method=method, init=experiment.sampler_init(config, method),
                                 return_info=True,
                                 **{**experiment.sampler_kwargs(config, method), **overrides})
  count = {}

  def with_nfe(params, keys):
    x, info = fn(params, keys)
    if isinstance(info["nfe"], int):  # fixed-step samplers: one count, known when traced
      count["nfe"] = info["nfe"]
      return x
    return x, info["nfe"]  # the adaptive solver: a count per sample

  p_sample = parallel.shard_sampler(with_nfe, parallel.make_mesh())

  def sample(params, rng, start, n):
    out = p_sample(params, rng, start, n)
    return out if isinstance(out, tuple) else (out, np.full((len(out),), count["nfe"]))

  return sample


def _evaluate_sampler(p_sample, params: Any, evaluator: Evaluator, entry: dict,
                      config: ml_collections.ConfigDict, workdir: str, rng: jax.Array,
                      desc: str) -> tuple[dict[str, Any], str]:
  """Measures one sampler setting; returns the measurements and its batch cache directory."""
  start = time.time()
  cache_dir = batch_cache_dir(workdir, [entry], config.eval.batch_size)
  sample_rng = jax.random.fold_in(rng, _SAMPLE_TAG)
  features = draw_features(lambda first, n: p_sample(params, sample_rng, first, n), evaluator,
                           num_samples=config.eval.num_samples,
                           batch_size=config.eval.batch_size, cache_dir=cache_dir, desc=desc)
  measured = {**_score(evaluator, features), "seconds": time.time() - start}
  return measured, cache_dir


def _score(evaluator: Evaluator, features: Features) -> dict[str, Any]:
  """`score_finite`'s metrics, plus `nfe` (mean network evaluations per sample) when drawn."""
  nfe = features.pop("nfe", None)
  return {**score_finite(evaluator, features),
          **({} if nfe is None else {"nfe": float(np.mean(nfe))})}


def _evaluate_step_lrs(config: ml_collections.ConfigDict, state: TrainState, entries: list[dict],
                       evaluator: Evaluator, workdir: str, rng: jax.Array
                       ) -> tuple[list[dict[str, Any]], str]:
  """Evaluates settings that differ only in step_lr as one program vmapped over the step sizes.

  Each setting draws the samples `_evaluate_sampler` would give it alone, so the numbers equal a
  one-setting-at-a-time sweep up to float rounding; `seconds` is the group's time per setting.
  """
  e0 = entries[0]
  kwargs = {**experiment.sampler_kwargs(config, e0["method"]), **_sampler_args(e0)}
  fn = experiment.make_sample_fn(models.build(config), experiment.sigmas_from_config(config),
                                 experiment.example_shape(config), method=e0["method"],
                                 init=experiment.sampler_init(config, e0["method"]),
                                 return_info=True, **kwargs)
  lrs = np.asarray([e["step_lr"] for e in entries], np.float32)

  count = {}

  def one_lr(params, keys, lr):
    x, info = fn(params, keys, step_lr=lr)
    count["nfe"] = info["nfe"]  # ALS/CAS: one count, known when traced, the same for every lr
    return x

  def many(params, keys):
    xs = jax.vmap(lambda lr: one_lr(params, keys, lr))(lrs)
    return jax.numpy.moveaxis(xs, 0, 1)

  p_many = parallel.shard_sampler(many, parallel.make_mesh())

  def p_sample(params, rng, start, n):
    xs = p_many(params, rng, start, n)
    return xs, np.full((len(xs),), count["nfe"])

  params = experiment.sampling_params(config, state)
  sample_rng = jax.random.fold_in(rng, _SAMPLE_TAG)
  cache_dir = batch_cache_dir(workdir, entries, config.eval.batch_size)
  start = time.time()
  features = draw_features_stacked(lambda first, n: p_sample(params, sample_rng, first, n),
                                   evaluator, num_samples=config.eval.num_samples,
                                   batch_size=config.eval.batch_size, cache_dir=cache_dir,
                                   desc=f"sweep {e0['method']} x{len(entries)} step_lr")
  seconds = (time.time() - start) / len(entries)
  return [{**_score(evaluator, f), "seconds": seconds, "vmapped_settings": len(entries)}
          for f in features], cache_dir


def _step_lr_groups(entries: list[dict]) -> list[list[dict]]:
  """`entries` grouped by everything but step_lr (ALS/CAS only), in first-appearance order."""
  groups: dict[tuple, list[dict]] = {}
  for e in entries:
    key = ((e["method"], e.get("steps_per_sigma"), e["denoise"]) if e.get("step_lr") is not None
           else id(e))
    groups.setdefault(key, []).append(e)
  return list(groups.values())


def _entry(config: ml_collections.ConfigDict, evaluator: Evaluator, kind: str, **settings
           ) -> dict:
  """An evaluation's settings: checkpoint, sampler, sample count, features, seed, reference."""
  identity = dict(evaluator.identity)
  identity["protocol"] = f"{config.eval.num_samples} samples {identity.get('protocol', '')}".strip()
  return {**settings, "num_samples": config.eval.num_samples, "features": kind,
          "seed": config.seed, **identity}


def _record(writer: MetricWriter | None, fresh: dict[tuple, dict], entry: dict,
            measured: dict) -> dict:
  """The entry's row with its measurements, kept in `fresh` and written as one JSON line."""
  row = {**entry, **measured}
  fresh[entry_key(row)] = row
  write_row(writer, row, {k: v for k, v in measured.items() if k != "skipped"})
  return row


def _in_order(entries: list[dict], fresh: dict[tuple, dict], done: dict[tuple, dict]
              ) -> list[dict]:
  """The row of every entry, fresh or stored, in the entries' order."""
  return [fresh.get(entry_key(e)) or done[entry_key(e)] for e in entries]


def _split_done(entries: list[dict], path: str) -> tuple[dict[tuple, dict], list[dict]]:
  """The stored rows of `entries` (by key) and the entries still to evaluate, in order."""
  stored = stored_rows(path)
  done = {entry_key(e): stored[entry_key(e)] for e in entries if entry_key(e) in stored}
  return done, [e for e in entries if entry_key(e) not in done]


# --------------------------------------------------------------------------------------------
# Modes.


def evaluate_checkpoints(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Samples from every checkpoint in range with the configured sampler; returns the rows.

  Checkpoints already evaluated with these settings (`entry_key`) in `eval_metrics.jsonl` are
  not evaluated again; their stored rows are returned, tabulated and plotted with the new ones.
  """
  ev = config.eval
  available = _checkpoint_steps(workdir)
  steps = [s for s in available if (ev.begin_step is None or s >= ev.begin_step) and
           (ev.end_step is None or s <= ev.end_step)]
  if not steps:
    raise UsageError(f"no checkpoint with eval.begin_step={ev.begin_step} <= step <= "
                     f"eval.end_step={ev.end_step} in {workdir}; available steps: {available}")
  kind = feature_kind(config)
  main_metric = MAIN_METRICS[kind]
  settings = experiment.sampler_settings(config)
  rng = jax.random.fold_in(jax.random.key(config.seed), _EVAL_TAG)
  evaluator = make_evaluator(config, workdir, rng)
  entries = [_entry(config, evaluator, kind, step=s, **settings) for s in steps]
  done, todo = _split_done(entries, storage.join(workdir, "eval_metrics.jsonl"))
  main = parallel.is_main_process()
  if main:
    print(f"[eval] {len(done)} of {len(entries)} checkpoints reused from eval_metrics.jsonl; "
          f"evaluating {len(todo)}", flush=True)
  fresh = {}
  if todo:
    sampler = _checkpoint_sampler(config)
    writer = MetricWriter(workdir, name="eval_metrics") if main else None
    try:
      for entry in todo:
        state = _restore(config, workdir, entry["step"])
        measured, cache_dir = _evaluate_sampler(sampler, experiment.sampling_params(config, state),
                                                evaluator, entry, config, workdir, rng,
                                                desc=f"eval step {entry['step']}")
        row = _record(writer, fresh, entry, measured)
        _drop_batches(cache_dir)
        _check_finite(row, fatal=True)
        if main:
          print(f"[eval] step {row['step']}: {main_metric}="
                f"{row.get(main_metric, float('nan')):.4g} ({row['seconds']:.1f}s)", flush=True)
    finally:
      if writer is not None:
        writer.close()
  rows = _in_order(entries, fresh, done)
  if main:
    paths = write_outputs(rows, main_metric, workdir, "eval_metrics", plot_eval)
    print(format_table(rows, ["step", "method", "nfe", "step_lr"] +
                       table_metric_columns(rows, main_metric)))
    best = min(rows, key=rank_key(main_metric))
    print(f"best checkpoint by {main_metric}: step {best['step']} "
          f"({main_metric}={as_float(best.get(main_metric)):.4g}); "
          f"{len(done)} of {len(rows)} rows reused")
    print(f"rows in {paths['jsonl']}; table {paths['csv']}; plot {paths['png']}")
  return rows


def sweep_grid(methods: tuple[str, ...], step_lrs: tuple[float, ...],
               steps_per_sigma: tuple[int, ...], denoise: tuple[bool, ...],
               num_steps: tuple[int, ...] = (), rel_tols: tuple[float, ...] = ()) -> list[dict]:
  """The distinct sampler settings of the grid, in grid order.

  A knob the method does not read (CAS has no steps per level, PC no step_lr) is None, so the
  grid holds each real setting once. The ODE samplers (euler, heun, dpm_solver_pp_2m) take
  `num_steps` (the length of their configured ladder), the adaptive solver `rel_tols`; neither
  reads the shared `denoise`.
  """
  unknown = [m for m in methods if m not in _METHODS]
  if unknown:
    raise ValueError(f"eval.sweep_methods has unknown samplers {unknown}; use {_METHODS}")
  settings: list[dict] = []
  for method in methods:
    knobs = _METHOD_KNOBS[method]
    if method in experiment.ODE_SAMPLERS or method == "adaptive":
      grid = num_steps if "num_steps" in knobs else rel_tols
      if not grid:
        raise ValueError(f"eval.sweep_methods has {method}: give its grid in "
                         f"eval.{'sweep_num_steps' if 'num_steps' in knobs else 'sweep_rel_tols'}")
      for value in grid:
        s = {"method": method, "step_lr": None, "steps_per_sigma": None,
             "corrector_steps": None, "denoise": None,
             knobs[0]: int(value) if knobs[0] == "num_steps" else float(value)}
        if s not in settings:
          settings.append(s)
      continue
    for lr in step_lrs:
      for spp in steps_per_sigma:
        for den in denoise:
          s = {"method": method, "step_lr": float(lr) if "step_lr" in knobs else None,
               "steps_per_sigma": int(spp) if "steps_per_sigma" in knobs else None,
               "corrector_steps": int(spp) if "corrector_steps" in knobs else None,
               "denoise": bool(den)}
          if s not in settings:
            settings.append(s)
  return settings


def _setting(entry: dict) -> dict:
  return {"method": entry["method"], **_sampler_args(entry)}


def _sampler_args(entry: dict) -> dict:
  """The sampler arguments a sweep entry sets (its method's knobs and `denoise`)."""
  return {k: entry[k] for k in (*_METHOD_KNOBS[entry["method"]], "denoise")
          if entry.get(k) is not None}


def sampler_sweep(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Samples from the latest checkpoint with every sweep setting; returns the rows.

  Settings already in `sampler_sweep.jsonl` for this checkpoint (`entry_key`) are not evaluated
  again; their stored rows join the table, the CSV and the plot. With `eval.sweep_vmap`, settings
  that differ only in step_lr run as one compiled program vmapped over the step sizes (memory:
  the group's size times `eval.batch_size` samples at once).
  """
  ev = config.eval
  settings = sweep_grid(tuple(ev.sweep_methods), tuple(ev.sweep_step_lrs),
                        tuple(ev.sweep_steps_per_sigma), tuple(ev.sweep_denoise),
                        tuple(ev.sweep_num_steps), tuple(ev.sweep_rel_tols))
  step = _checkpoint_steps(workdir)[-1]
  kind = feature_kind(config)
  main_metric = MAIN_METRICS[kind]
  rng = jax.random.fold_in(jax.random.key(config.seed), _EVAL_TAG)
  evaluator = make_evaluator(config, workdir, rng)
  entries = [_entry(config, evaluator, kind, step=step,
                    **{**experiment.sampler_settings(config, s["method"]), **s})
             for s in settings]
  done, todo = _split_done(entries, storage.join(workdir, "sampler_sweep.jsonl"))
  main = parallel.is_main_process()
  if main:
    print(f"[sweep] checkpoint step {step}: {len(done)} of {len(entries)} settings reused from "
          f"sampler_sweep.jsonl; evaluating {len(todo)}", flush=True)
  fresh = {}
  if todo:
    state = _restore(config, workdir, step)
    cas_ladder = samplers.cas_ladder(experiment.sigmas_from_config(config),
                                     config.sampling.cas.n_sigma)
    writer = MetricWriter(workdir, name="sampler_sweep", tensorboard=False) if main else None
    try:
      feasible = []
      for entry in todo:
        if entry["method"] == "cas":
          try:
            noise.check_cas_step_lr(cas_ladder, entry["step_lr"])
          except ValueError as e:
            row = _record(writer, fresh, entry, {"skipped": str(e)})
            if main:
              print(f"[sweep] {_setting(entry)}: skipped: {row['skipped']}", flush=True)
            continue
        feasible.append(entry)
      for group in _step_lr_groups(feasible):
        if len(group) > 1 and ev.sweep_vmap:
          results, cache_dir = _evaluate_step_lrs(config, state, group, evaluator, workdir, rng)
          cache_dirs = [cache_dir]
        else:
          results, cache_dirs = [], []
          for entry in group:
            measured, cache_dir = _evaluate_sampler(
                _checkpoint_sampler(config, method=entry["method"], **_sampler_args(entry)),
                experiment.sampling_params(config, state), evaluator, entry, config, workdir, rng,
                desc=f"sweep {_setting(entry)}")
            results.append(measured)
            cache_dirs.append(cache_dir)
        for entry, measured in zip(group, results):
          row = _record(writer, fresh, entry, measured)
          _check_finite(row, fatal=False)  # a sweep maps where samplers diverge
          if main:
            print(f"[sweep] {_setting(entry)}: "
                  f"{main_metric}={row.get(main_metric, float('nan')):.4g}", flush=True)
        for cache_dir in cache_dirs:
          _drop_batches(cache_dir)
    finally:
      if writer is not None:
        writer.close()
  rows = _in_order(entries, fresh, done)
  if main:
    paths = write_outputs(rows, main_metric, workdir, "sampler_sweep", plot_sweep)
    ranked = sorted(rows, key=rank_key(main_metric))
    print(format_table(ranked, ["method", "nfe", "step_lr", "steps_per_sigma", "corrector_steps",
                                "num_steps", "rel_tol", "denoise"] +
                       table_metric_columns(rows, main_metric) + ["skipped"]))
    print(f"checkpoint step {step}; {len(done)} of {len(rows)} rows reused")
    print(f"rows in {paths['jsonl']}; table {paths['csv']}; plot {paths['png']}")
  return rows


def run(config: ml_collections.ConfigDict, workdir: str, *, mode: str) -> list[dict]:
  """The `eval` or `sampler_sweep` mode of the CLI; returns the metric rows.

  `config` must describe the checkpoint's model and data (checked as in `--mode=sample` with a
  `--config`); its `sampling` and `eval` groups choose how to sample and what to measure.
  """
  if mode == "eval":
    return evaluate_checkpoints(config, workdir)
  if mode == "sampler_sweep":
    return sampler_sweep(config, workdir)
  raise ValueError(f"evaluate.run: mode={mode!r} is unknown; use 'eval' or 'sampler_sweep'")
