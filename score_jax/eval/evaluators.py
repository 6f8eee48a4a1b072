"""Evaluators: what the eval modes measure for each kind of data, made from the eval and data specs.

An `Evaluator` turns sample batches into features and the features of all samples into metrics,
and names what the numbers are measured against (its `identity`, part of every row's
`records.entry_key`). `eval.features` chooses the kind (`feature_kind`):

* toys: unbiased RBF-kernel MMD^2 (main metric) and energy distance against samples of the true
  distribution, plus mode weights for mixtures (`toy.sample_metrics`);
* images (`inception`): FID (main metric; Heusel et al. 2017, the pytorch-fid computation), KID
  (Binkowski et al. 2018) and, when the Inception weights carry the 1008-way logits, the Inception
  Score, on the pool3 features of the FID Inception network (`feature_nets`), against reference
  statistics (`reference_stats`);
* MNIST (`mnist_classifier`, 28x28x1 images only): the same FID formula and KID (`fid_mnist`, the
  main metric, and `kid_mnist`) on the 128-d penultimate features of the project's digit
  classifier (`score_jax.eval.mnist_classifier`). The weights come from
  `eval.mnist_classifier_weights` or the classifier's cache file; reference statistics are made
  as for Inception and cached keyed by a digest of the weights.

`make_evaluator` takes the run's `EvalSpec` and `DataSpec` (`experiment.build`), never a config.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np

from score_jax import data, rng_streams, sampling, toy
from score_jax import paths as storage
from score_jax.config_schema import UsageError
from score_jax.eval import fetch_inception, inception, metrics, mnist_classifier
from score_jax.eval.feature_nets import (Features, classifier_features, classifier_features_fn,
                                         image_features, make_inception_fn, params_digest)
from score_jax.eval.reference_stats import reference_statistics, stats_digest

if TYPE_CHECKING:
  from score_jax.experiment import DataSpec, EvalSpec

_FEATURES = ("auto", "inception", "mnist_classifier", "toy")
# The metric that ranks checkpoints and sampler settings, per feature kind (lower is better).
MAIN_METRICS = {"toy": "mmd_rbf", "inception": "fid", "mnist_classifier": "fid_mnist"}
# `image_metrics` names -> names in the classifier's feature space (not comparable to Inception's).
_CLASSIFIER_NAMES = {"fid": "fid_mnist", "fid_error": "fid_mnist_error", "kid": "kid_mnist",
                     "kid_std": "kid_mnist_std"}


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


def inception_weights_path(path: str | None) -> str:
  """`path` (`eval.inception_weights`), else the fetch CLI's default file, fetched on first use
  (`fetch_inception.ensure_weights`); UsageError if it is missing or cannot be fetched."""
  if path is not None and not storage.isfile(path):
    raise UsageError(f"FID Inception weights not found at {path}: run "
                     f"`{fetch_inception.COMMAND}` first (or set --config.eval.inception_weights "
                     "to a converted .npz)")
  if path is not None:
    return path
  try:
    return os.fspath(fetch_inception.ensure_weights())
  except fetch_inception.FetchError as e:
    raise UsageError(str(e)) from None


def classifier_weights_path(path: str | None, *, manual_dir: str | None = None) -> str:
  """`path` (`eval.mnist_classifier_weights`), else the classifier's cache file; UsageError if
  missing, naming the training command (with `manual_dir`, `data.manual_dir`, when set)."""
  path = path or os.fspath(mnist_classifier.default_params_path())
  if not storage.isfile(path):
    command = mnist_classifier.COMMAND.format(
        manual_dir=manual_dir or "<folder with the official MNIST .gz files>")
    raise UsageError(f"MNIST classifier weights not found at {path}: run `{command}` first (or "
                     "set --config.eval.mnist_classifier_weights to a saved classifier .npz)")
  return path


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
    out["kid"], kid_std = metrics.kernel_inception_distance(
        features["pool"], reference["features"], rng=rng)
    # The spread over subsets only when no subset is a whole set (see `fid.compare`).
    if min(len(features["pool"]), len(reference["features"])) > metrics.KID_SUBSET_SIZE:
      out["kid_std"] = kid_std
  if "logits" in features:
    splits = min(10, len(features["logits"]))
    out["inception_score"], out["inception_score_std"] = metrics.inception_score(
        features["logits"], splits=splits)
  return out


def classifier_metrics(features: Features, reference: dict[str, np.ndarray | None],
                       rng: jax.Array) -> dict[str, Any]:
  """`image_metrics` in the classifier's feature space, named `fid_mnist`, `kid_mnist`, ..."""
  out = image_metrics(features, reference, rng)
  return {_CLASSIFIER_NAMES.get(k, k): v for k, v in out.items()}


def feature_kind(f: str, *, dataset: str, image_size: int, num_channels: int) -> str:
  """`f` (`eval.features`) resolved to "toy", "inception" or "mnist_classifier" for the data set
  `dataset` (`data.*`); UsageError if unusable.

  "auto" is "toy" for toys and "inception" for images; "mnist_classifier" needs 28x28x1 images.
  """
  if f not in _FEATURES:
    raise UsageError(f"eval.features={f!r} is unknown; use one of {_FEATURES}")
  is_toy = data.is_toy(dataset)
  if f == "auto":
    return "toy" if is_toy else "inception"
  if f == "mnist_classifier":
    shape = (image_size, image_size, num_channels)
    if is_toy or shape != mnist_classifier.IMAGE_SHAPE:
      got = "toy points" if is_toy else "x".join(map(str, shape)) + " images"
      raise UsageError(f"eval.features='mnist_classifier' needs 28x28x1 images (MNIST digits); "
                       f"data.dataset={dataset!r} has {got}; use 'inception' or 'auto'")
    return f
  if (f == "toy") != is_toy:
    raise UsageError(f"eval.features={f!r} does not fit data.dataset={dataset!r}; use 'auto'")
  return f


def _toy_evaluator(d: DataSpec, rng: jax.Array) -> Evaluator:
  distribution = toy.get_toy(d.dataset, dim=d.toy_dim)
  reference_rng = rng_streams.fold(rng, "eval.reference")
  return Evaluator(
      main_metric=MAIN_METRICS["toy"],
      featurize=lambda x: {"x": np.asarray(x, np.float32)},
      score=lambda f: toy.sample_metrics(f["x"], distribution, reference_rng),
      identity={"protocol": f"against exact samples of {d.dataset}"})


def _inception_evaluator(ev: EvalSpec, d: DataSpec, workdir: str, rng: jax.Array, *,
                         seed: int) -> Evaluator:
  weights_path = inception_weights_path(ev.inception_weights)
  variables = inception.load_params(weights_path)
  net = make_inception_fn(variables)
  centered = d.centered
  featurize = lambda x: image_features(net, x, centered=centered)
  reference = reference_statistics(ev, d, workdir, featurize, os.path.basename(weights_path),
                                   seed=seed)
  kid_rng = rng_streams.fold(rng, "eval.kid")
  return Evaluator(main_metric=MAIN_METRICS["inception"], featurize=featurize,
                   score=lambda f: image_metrics(f, reference, kid_rng),
                   identity=_identity(reference, params_digest(variables)))


def _identity(reference: dict[str, Any], weights_digest: str) -> dict[str, str]:
  return {"protocol": f"against {reference['protocol']}",
          "features_digest": weights_digest[:16], "reference_digest": stats_digest(reference)}


def _classifier_evaluator(ev: EvalSpec, d: DataSpec, workdir: str, rng: jax.Array, *,
                          seed: int) -> Evaluator:
  params = mnist_classifier.load_checked(
      classifier_weights_path(ev.mnist_classifier_weights, manual_dir=d.manual_dir))
  net = classifier_features_fn(params)
  centered = d.centered
  featurize = lambda x: classifier_features(net, x, centered=centered)
  reference = reference_statistics(ev, d, workdir, featurize, params_digest(params), seed=seed,
                                   kind="mnist_classifier")
  if np.shape(reference["mu"]) != (mnist_classifier.NUM_FEATURES,):
    raise UsageError(f"eval.reference_stats={ev.reference_stats} holds "
                     f"{np.shape(reference['mu'])[0]}-d statistics; the MNIST classifier's "
                     f"features are {mnist_classifier.NUM_FEATURES}-d (unset it to compute them)")
  kid_rng = rng_streams.fold(rng, "eval.kid")
  return Evaluator(main_metric=MAIN_METRICS["mnist_classifier"], featurize=featurize,
                   score=lambda f: classifier_metrics(f, reference, kid_rng),
                   identity=_identity(reference, params_digest(params)))


def make_evaluator(ev: EvalSpec, d: DataSpec, workdir: str, rng: jax.Array, *,
                   seed: int) -> Evaluator:
  """The evaluator of the run's data: toy distances, Inception or MNIST-classifier metrics.

  Args:
    ev: the run's eval spec (`Experiment.eval`).
    d: the run's data spec (`Experiment.data`).
    workdir: holds the reference-statistics cache.
    rng: key of the reference samples (toys) and of the KID subsets (images).
    seed: the run's seed (the reference images' reader).
  """
  kind = feature_kind(ev.features, dataset=d.dataset, image_size=d.image_size,
                      num_channels=d.num_channels)
  if kind == "toy":
    return _toy_evaluator(d, rng)
  if kind == "mnist_classifier":
    return _classifier_evaluator(ev, d, workdir, rng, seed=seed)
  return _inception_evaluator(ev, d, workdir, rng, seed=seed)


def score_finite(evaluator: Evaluator, features: Features) -> dict[str, Any]:
  """The evaluator's metrics of the finite samples only, plus `finite_fraction`.

  Non-finite samples would make FID, KID and the toy distances NaN or meaningless, so they are
  dropped; when none is finite only `finite_fraction` (0) is returned.
  """
  finite = features.get("finite")
  if finite is None:
    finite = sampling.finite_rows(next(iter(features.values())))
  finite = np.asarray(finite, bool)
  if not finite.any():
    return {"finite_fraction": 0.0}
  if not finite.all():
    features = {k: np.asarray(v)[finite] for k, v in features.items()}
  return {**evaluator.score(features), "finite_fraction": float(finite.mean())}
