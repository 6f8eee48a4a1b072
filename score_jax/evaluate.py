"""Sample quality of checkpoints and of sampler settings (`main.py --mode=eval|sampler_sweep`).

* `eval`: every checkpoint in the workdir (between `eval.begin_step` and `eval.end_step`) draws
  `eval.num_samples` samples with the configured sampler from its first EMA parameters; one JSON
  line per checkpoint goes to `<workdir>/eval_metrics.jsonl` (and TensorBoard `tb/eval_metrics`),
  then a table and the best checkpoint are printed.
* `sampler_sweep`: the latest checkpoint samples with every combination of `eval.sweep_methods` x
  `sweep_step_lrs` x `sweep_steps_per_sigma` x `sweep_denoise` (knobs a method does not use are
  dropped, and CAS step sizes outside its feasibility interval sigma_L^2 (1 -/+ gamma) are
  recorded as skipped with the reason); rows go to `<workdir>/sampler_sweep.jsonl` and a table
  sorted by the main metric is printed.

Metrics (`score_jax.metrics`, `score_jax.toy`):
* toys: unbiased RBF-kernel MMD^2 (main metric) and energy distance against samples of the true
  distribution, plus mode weights for mixtures (`sample.toy_metrics`);
* images: FID (main metric; Heusel et al. 2017, the pytorch-fid computation), KID (Binkowski et al.
  2018) and, when the Inception weights carry the 1008-way logits, the Inception Score, on the
  pool3 features of the FID Inception network. Samples are mapped to [0, 1], clipped and
  quantized to 8 bits (as images saved to PNG, the protocol of the NCSN/NCSNv2 FID numbers);
  grayscale is repeated to three channels. Reference statistics come from `eval.reference_stats`
  or from the first `eval.num_samples` images of `data.eval_split` (unshuffled, not dequantized),
  cached with their features under `<workdir>/eval_cache/`.

Every draw uses keys folded from `config.seed`, the same for every checkpoint and every sweep
setting (common random numbers), so evaluations are reproducible and comparable.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from score_jax import (checkpoint, data, fetch_inception, inception, metrics, models, noise,
                       parallel, sample, samplers, toy, train)
from score_jax.metric_writers import MetricWriter
from score_jax.train_state import TrainState

_EVAL_TAG = 0xE7A1
_SAMPLE_TAG, _REFERENCE_TAG, _KID_TAG = 0, 1, 2
_FEATURES = ("auto", "inception", "mnist_classifier", "toy")
_METHODS = ("als", "cas", "pc")
# Knobs of `make_sampler` that each sampler reads (others are recorded as None and not swept).
_METHOD_KNOBS = {"als": ("step_lr", "steps_per_sigma"), "cas": ("step_lr",),
                 "pc": ("steps_per_sigma",)}
FETCH_COMMAND = "python -m score_jax.fetch_inception"

Features = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """Turns sample batches into features, and features of all samples into metrics.

  Attributes:
    main_metric: the metric that ranks checkpoints and sampler settings (lower is better).
    featurize: `[b, ...]` samples -> dict of per-example arrays `[b, ...]`.
    score: the concatenated features of all samples -> flat dict of metrics.
  """
  main_metric: str
  featurize: Callable[[np.ndarray], Features]
  score: Callable[[Features], dict[str, Any]]


# --------------------------------------------------------------------------------------------
# Images -> Inception features.


def to_inception_input(x: np.ndarray, *, centered: bool) -> tuple[np.ndarray, np.ndarray]:
  """Images as the FID network takes them: RGB in [0, 1], 8-bit levels.

  Args:
    x: images `[b, h, w, c]`, c in (1, 3), in [0, 1] (or [-1, 1] when `centered`).
    centered: whether `x` is in [-1, 1].

  Returns:
    `(images [b, h, w, 3], finite [b])`: non-finite pixels become 0 (and the example is flagged),
    values are clipped to [0, 1] and rounded to multiples of 1/255.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"Inception features need images [b, h, w, 1 or 3], got shape {x.shape}")
  finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
  if centered:
    x = (x + 1.0) / 2.0
  x = np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
  x = np.round(x * 255.0) / 255.0
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x, finite


def make_inception_fn(variables: inception.Variables) -> Callable[[np.ndarray], Features]:
  """A map from images `[b, h, w, 3]` in [0, 1] to `{"pool": [b, 2048]}` (+ `"logits"` `[b, 1008]`).

  Logits are returned when the weights hold the `fc` layer (`inception.has_logits`).
  """
  if inception.has_logits(variables):
    model = inception.InceptionV3FID(with_logits=True)
    apply = jax.jit(model.apply)
    return lambda x: {k: np.asarray(v) for k, v in apply(variables, x).items()}
  pool_fn = inception.features_fn(variables)
  return lambda x: {"pool": np.asarray(pool_fn(x))}


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
  if not os.path.isfile(path):
    raise ValueError(f"FID Inception weights not found at {path}: run `{FETCH_COMMAND}` first "
                     "(or set --config.eval.inception_weights to a converted .npz)")
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
    out["kid"], out["kid_std"] = metrics.kernel_inception_distance(
        features["pool"], reference["features"], rng=rng)
  if "logits" in features:
    splits = min(10, len(features["logits"]))
    out["inception_score"], out["inception_score_std"] = metrics.inception_score(
        features["logits"], splits=splits)
  return out


def _reference_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  d, n = config.data, config.eval.num_samples
  name = f"ref_stats_{d.dataset.replace('/', '-')}_{d.eval_split}_{n}.npz"
  return os.path.join(workdir, "eval_cache", name)


def reference_statistics(config: ml_collections.ConfigDict, workdir: str,
                         featurize: Callable[[np.ndarray], Features], weights_path: str
                         ) -> dict[str, np.ndarray | None]:
  """Reference `{"mu", "sigma", "features"}`: from `eval.reference_stats`, the cache, or data.

  A given `.npz` must hold `mu` and `sigma` (KID also needs `features`, else it is skipped).
  Computed statistics use the first `eval.num_samples` images of `data.eval_split` without
  shuffling, flips or dequantization, and are cached with a description of how they were made
  (weights file, image size, channels, data path); a cache made differently is recomputed.
  """
  ev = config.eval
  if ev.reference_stats:
    with np.load(ev.reference_stats) as f:
      if "mu" not in f.files or "sigma" not in f.files:
        raise ValueError(f"eval.reference_stats={ev.reference_stats} must hold arrays 'mu' and "
                         f"'sigma' (found {f.files})")
      return {"mu": f["mu"], "sigma": f["sigma"],
              "features": f["features"] if "features" in f.files else None}
  d = config.data
  meta = json.dumps({"weights": os.path.basename(weights_path), "image_size": d.image_size,
                     "num_channels": d.num_channels, "path": d.path, "data_dir": d.data_dir})
  path = _reference_path(config, workdir)
  if os.path.isfile(path):
    with np.load(path) as f:
      if "meta" in f.files and str(f["meta"]) == meta:
        return {"mu": f["mu"], "sigma": f["sigma"], "features": f["features"]}
  ref_config = config.copy_and_resolve_references()
  ref_config.data.uniform_dequantization = False
  ref_config.data.gaussian_dequantization = False
  batch = min(ev.batch_size, ev.num_samples)
  it = train.iterator_from_config(ref_config, split=d.eval_split, seed=config.seed,
                                  batch_size=batch, shuffle=False)
  parts, count = [], 0
  while count < ev.num_samples:
    parts.append(featurize(np.asarray(next(it)["x"])))
    count += batch
  features = np.concatenate([p["pool"] for p in parts])[:ev.num_samples]
  mu, sigma = metrics.feature_stats(features)
  if parallel.is_main_process():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, features=features.astype(np.float32), meta=np.array(meta))
    os.replace(tmp, path)
  return {"mu": mu, "sigma": sigma, "features": features}


# --------------------------------------------------------------------------------------------
# Config -> evaluator.


def feature_kind(config: ml_collections.ConfigDict) -> str:
  """`eval.features` resolved to "toy" or "inception"; ValueError for unusable choices."""
  f, dataset = config.eval.features, config.data.dataset
  if f not in _FEATURES:
    raise ValueError(f"eval.features={f!r} is unknown; use one of {_FEATURES}")
  is_toy = data.is_toy(dataset)
  if f == "auto":
    return "toy" if is_toy else "inception"
  if f == "mnist_classifier":
    raise ValueError("eval.features='mnist_classifier' is not available yet; use 'inception' "
                     "(grayscale images are repeated to 3 channels) or 'auto'")
  if (f == "toy") != is_toy:
    raise ValueError(f"eval.features={f!r} does not fit data.dataset={dataset!r}; use 'auto'")
  return f


def make_evaluator(config: ml_collections.ConfigDict, workdir: str, rng: jax.Array) -> Evaluator:
  """The evaluator of the config's data: toy distances, or Inception-feature metrics.

  Args:
    config: the run's config (data and eval groups).
    workdir: holds the reference-statistics cache.
    rng: key of the reference samples (toys) and of the KID subsets (images).
  """
  kind = feature_kind(config)
  if kind == "toy":
    distribution = toy.get_toy(config.data.dataset, dim=config.data.toy_dim)
    reference_rng = jax.random.fold_in(rng, _REFERENCE_TAG)
    return Evaluator(
        main_metric="mmd_rbf",
        featurize=lambda x: {"x": np.asarray(x, np.float32)},
        score=lambda f: sample.toy_metrics(f["x"], distribution, reference_rng))
  weights_path = inception_weights_path(config)
  net = make_inception_fn(inception.load_params(weights_path))
  centered = config.data.centered
  featurize = lambda x: image_features(net, x, centered=centered)
  reference = reference_statistics(config, workdir, featurize, weights_path)
  kid_rng = jax.random.fold_in(rng, _KID_TAG)
  return Evaluator(main_metric="fid", featurize=featurize,
                   score=lambda f: image_metrics(f, reference, kid_rng))


# --------------------------------------------------------------------------------------------
# Drawing, checkpoints, tables.


def draw_features(sample_fn: Callable[[jax.Array, int], jax.Array], evaluator: Evaluator, *,
                  num_samples: int, batch_size: int, rng: jax.Array) -> Features:
  """Features of `num_samples` samples drawn in batches (batch i uses `fold_in(rng, i)`).

  Every call draws a full batch, so the sampler and the feature network compile once; the
  surplus of the last batch is dropped.
  """
  batch = min(batch_size, num_samples)
  parts = []
  for i in range(-(-num_samples // batch)):
    x = np.asarray(sample_fn(jax.random.fold_in(rng, i), batch))
    keep = min(batch, num_samples - i * batch)
    parts.append({k: v[:keep] for k, v in evaluator.featurize(x).items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _checkpoint_steps(workdir: str) -> list[int]:
  manager = checkpoint.create_manager(workdir, async_save=False)
  try:
    return checkpoint.all_steps(manager)
  finally:
    manager.close()


def _restore(config: ml_collections.ConfigDict, workdir: str, step: int | None) -> TrainState:
  """The checkpoint's state, after checking that `config` describes the same model and data."""
  stored, state = sample.load_checkpoint(workdir, step)
  train.check_compatible(json.loads(stored.to_json()), config, workdir)
  return state


def _checkpoint_sampler(config: ml_collections.ConfigDict) -> Callable[..., jax.Array]:
  """`sample.make_sampler` taking the params as an argument: one program for all checkpoints.

  Returns:
    A jitted `(params, rng, n) -> samples` with the configured sampler.
  """
  fn = sample.make_sample_fn(models.build(config), train.sigmas_from_config(config),
                             train.example_shape(config), **sample.sampler_kwargs(config))
  return jax.jit(fn, static_argnums=2)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rank_key(main: str) -> Callable[[dict], float]:
  def key(row: dict) -> float:
    v = row.get(main)
    return v if _is_number(v) and math.isfinite(v) else math.inf
  return key


def format_table(rows: list[dict], columns: list[str]) -> str:
  """A fixed-width text table of `columns` (missing values print as '-')."""

  def cell(v: Any) -> str:
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)

  cells = [[cell(r.get(c)) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
  lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
  return "\n".join(lines)


def _metric_columns(rows: list[dict], main: str) -> list[str]:
  order = [main, "energy_distance", "kid", "kid_std", "inception_score", "finite_fraction",
           "seconds"]
  return [c for c in order if any(c in r for r in rows)]


def _write(writer: MetricWriter | None, row: dict, measured: dict) -> None:
  """One JSON line; numeric measurements are also TensorBoard scalars, settings keep their types."""
  if writer is None:
    return
  scalars = {k: v for k, v in measured.items() if _is_number(v)}
  extra = {k: v for k, v in row.items() if k not in scalars and k != "step"}
  writer.write(row["step"], scalars, **extra)


def _evaluate_sampler(sample_fn: Callable[[jax.Array, int], jax.Array], evaluator: Evaluator,
                      config: ml_collections.ConfigDict, rng: jax.Array) -> dict[str, Any]:
  start = time.time()
  features = draw_features(sample_fn, evaluator, num_samples=config.eval.num_samples,
                           batch_size=config.eval.batch_size,
                           rng=jax.random.fold_in(rng, _SAMPLE_TAG))
  return {**evaluator.score(features), "seconds": time.time() - start}


# --------------------------------------------------------------------------------------------
# Modes.


def evaluate_checkpoints(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Samples from every checkpoint in range with the configured sampler; returns the rows."""
  ev = config.eval
  available = _checkpoint_steps(workdir)
  if not available:
    raise checkpoint.CheckpointError(f"no checkpoint in {os.path.abspath(workdir)}/checkpoints; "
                                     "train first (python main.py --workdir=...)")
  steps = [s for s in available if (ev.begin_step is None or s >= ev.begin_step) and
           (ev.end_step is None or s <= ev.end_step)]
  if not steps:
    raise ValueError(f"no checkpoint with eval.begin_step={ev.begin_step} <= step <= "
                     f"eval.end_step={ev.end_step} in {workdir}; available steps: {available}")
  rng = jax.random.fold_in(jax.random.key(config.seed), _EVAL_TAG)
  evaluator = make_evaluator(config, workdir, rng)
  kwargs = sample.sampler_kwargs(config)
  sampler = _checkpoint_sampler(config)
  main = parallel.is_main_process()
  writer = MetricWriter(workdir, name="eval_metrics") if main else None
  rows = []
  try:
    for step in steps:
      state = _restore(config, workdir, step)
      sample_fn = functools.partial(sampler, state.ema_params[0])
      measured = _evaluate_sampler(sample_fn, evaluator, config, rng)
      row = {"step": step, **kwargs, "num_samples": ev.num_samples, **measured}
      rows.append(row)
      _write(writer, row, measured)
      if main:
        print(f"[eval] step {step}: {evaluator.main_metric}="
              f"{row.get(evaluator.main_metric, float('nan')):.4g} ({row['seconds']:.1f}s)",
              flush=True)
  finally:
    if writer is not None:
      writer.close()
  if main:
    print(format_table(rows, ["step", "method", "step_lr"] +
                       _metric_columns(rows, evaluator.main_metric)))
    best = min(rows, key=_rank_key(evaluator.main_metric))
    print(f"best checkpoint by {evaluator.main_metric}: step {best['step']} "
          f"({evaluator.main_metric}={best.get(evaluator.main_metric, float('nan')):.4g}); "
          f"rows in {os.path.join(os.path.abspath(workdir), 'eval_metrics.jsonl')}")
  return rows


def sweep_grid(methods: tuple[str, ...], step_lrs: tuple[float, ...],
               steps_per_sigma: tuple[int, ...], denoise: tuple[bool, ...]) -> list[dict]:
  """The distinct sampler settings of the grid, in grid order.

  A knob the method does not read (CAS has no steps per level, PC no step_lr) is None, so the
  grid holds each real setting once.
  """
  unknown = [m for m in methods if m not in _METHODS]
  if unknown:
    raise ValueError(f"eval.sweep_methods has unknown samplers {unknown}; use {_METHODS}")
  settings: list[dict] = []
  for method in methods:
    knobs = _METHOD_KNOBS[method]
    for lr in step_lrs:
      for spp in steps_per_sigma:
        for den in denoise:
          s = {"method": method, "step_lr": float(lr) if "step_lr" in knobs else None,
               "steps_per_sigma": int(spp) if "steps_per_sigma" in knobs else None,
               "denoise": bool(den)}
          if s not in settings:
            settings.append(s)
  return settings


def sampler_sweep(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Samples from the latest checkpoint with every sweep setting; returns the rows."""
  ev = config.eval
  settings = sweep_grid(tuple(ev.sweep_methods), tuple(ev.sweep_step_lrs),
                        tuple(ev.sweep_steps_per_sigma), tuple(ev.sweep_denoise))
  state = _restore(config, workdir, None)
  step = int(jax.device_get(state.step))
  rng = jax.random.fold_in(jax.random.key(config.seed), _EVAL_TAG)
  evaluator = make_evaluator(config, workdir, rng)
  cas_ladder = samplers.cas_ladder(train.sigmas_from_config(config), config.sampling.n_sigma)
  main = parallel.is_main_process()
  writer = MetricWriter(workdir, name="sampler_sweep", tensorboard=False) if main else None
  rows = []
  try:
    for i, setting in enumerate(settings):
      row = {"step": step, **sample.sampler_kwargs(config, setting["method"]), **setting,
             "num_samples": ev.num_samples}
      if setting["method"] == "cas":
        try:
          noise.check_cas_step_lr(cas_ladder, setting["step_lr"])
        except ValueError as e:
          row["skipped"] = str(e)
      measured = {}
      if "skipped" not in row:
        overrides = {k: v for k, v in setting.items() if v is not None}
        sample_fn = sample.make_sampler(config, state, **overrides)
        measured = _evaluate_sampler(sample_fn, evaluator, config, rng)
      row.update(measured)
      rows.append(row)
      _write(writer, row, measured)
      if main:
        result = (f"skipped: {row['skipped']}" if "skipped" in row else
                  f"{evaluator.main_metric}={row.get(evaluator.main_metric, float('nan')):.4g}")
        print(f"[sweep {i + 1}/{len(settings)}] {setting}: {result}", flush=True)
  finally:
    if writer is not None:
      writer.close()
  if main:
    ranked = sorted(rows, key=_rank_key(evaluator.main_metric))
    print(format_table(ranked, ["method", "step_lr", "steps_per_sigma", "denoise"] +
                       _metric_columns(rows, evaluator.main_metric) + ["skipped"]))
    print(f"checkpoint step {step}; rows in "
          f"{os.path.join(os.path.abspath(workdir), 'sampler_sweep.jsonl')}")
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
