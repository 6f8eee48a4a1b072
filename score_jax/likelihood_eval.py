"""Test-set likelihood of a checkpoint (`main.py --mode=likelihood`): a resumable host loop.

Images: bits per dimension of the first `likelihood.num_examples` images of `likelihood.split`,
uniformly dequantized `likelihood.repeats` times (score_sde's `likelihood.py` and its bits/dim
conversion). Toys: the negative log-likelihood in nats of `likelihood.num_examples` points drawn
from the toy distribution (a key of its own, not the training stream); where the toy has an exact
density, next to the true NLL of the same points and to the NLL the toy's exact score gets under
the same protocol (the estimator's own error, e.g. of the prior, included: compare models through
their excess over it), and for 2-D toys the model's log-density on a grid beside the true one.
Both come from `score_jax.likelihood` (the probability-flow ODE in sigma, Song et al. 2021,
Eq. 13 and Appendix D.2) between the ends of the trained noise ladder,
sigma_min = sigma_L and sigma_max = sigma_1, with the prior N(0, sigma_max^2 I): what is measured
is the likelihood of the data convolved with N(0, sigma_min^2 I).

The reported mean has the standard error of the per-example values (each the average over its
repeats), which covers both the spread over examples and the dequantization/probe noise. Example
i draws its dequantization noise and probes from the key folded from (seed, i), so values do not
depend on the batch size or the device count; batches run over all devices
(`parallel.batch_map`) and each finished batch is kept in the workdir, so an interrupted run
continues where it stopped. Every result row carries its protocol and goes to
`<workdir>/likelihood.jsonl` and `<workdir>/likelihood.csv`.

`run` takes the run's `experiment.Experiment` (its model, ladder, seed, and its `likelihood` and
`data` specs), never a config.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from score_jax import data, likelihood, parallel, plots, rng_streams, sampling, toy
from score_jax import progress as progress_lib
from score_jax.eval import records
from score_jax.experiment import DataSpec, Experiment, LikelihoodSpec
from score_jax.metric_writers import read_jsonl
from score_jax.score import make_score_fn

MEASURES = ("the likelihood of the data convolved with N(0, sigma_min^2 I) (probability-flow "
            "ODE from sigma_min to sigma_max, prior N(0, sigma_max^2 I))")
# Columns of likelihood.csv, in order: what was measured, then the protocol.
CSV_COLUMNS = ("step", "dataset", "metric", "mean", "se", "bpd_bound", "true_mean", "true_se",
               "minus_true_mean", "minus_true_se", "exact_mean", "exact_se", "minus_exact_mean",
               "minus_exact_se", "num_examples", "repeats", "split", "trace",
               "num_probes", "rtol", "atol", "sigma_min", "sigma_max", "nfe_mean", "nfe_max",
               "num_failed", "seed", "measures")
# Points per axis of the 2-D toys' log-density grid.
GRID_POINTS = 48


class NothingFiniteError(sampling.NonFiniteSamplesError):
  """Nothing finite to measure: non-finite parameters, or no solve ended in a finite value.

  A `NonFiniteSamplesError`, so the command line reports it in one line with exit status 1.
  """


def _check_params_finite(params: Any, step: int) -> None:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  bad = [jax.tree_util.keystr(path) for path, leaf in leaves
         if not bool(jnp.all(jnp.isfinite(leaf)))]
  if bad:
    raise NothingFiniteError(
        f"the EMA parameters of step {step} are not finite ({len(bad)} of {len(leaves)} arrays, "
        f"e.g. {bad[0]}): no likelihood can be measured; evaluate an earlier checkpoint")


def resolve_trace(lik: LikelihoodSpec, dataset: str) -> str:
  """`likelihood.trace`, with "auto" resolved: exact for toys, rademacher for images."""
  if lik.trace == "auto":
    return "exact" if data.is_toy(dataset) else "rademacher"
  return lik.trace


def check_spec(lik: LikelihoodSpec) -> None:
  """Raises ValueError naming the first bad `likelihood.*` field and the fix."""
  if lik.trace != "auto" and lik.trace not in likelihood.TRACES:
    raise ValueError(f"likelihood.trace={lik.trace!r} is unknown; use auto or one of "
                     f"{', '.join(likelihood.TRACES)}")
  for name in ("num_probes", "num_examples", "repeats", "batch_size"):
    value = getattr(lik, name)
    if not int(value) >= 1:
      raise ValueError(f"likelihood.{name}={value} must be >= 1")
  for name in ("rtol", "atol"):
    value = getattr(lik, name)
    if not float(value) > 0:
      raise ValueError(f"likelihood.{name}={value} must be > 0 (e.g. 1e-5)")


def protocol(exp: Experiment, step: int) -> dict[str, Any]:
  """What a likelihood row was measured with: it identifies the row and its stored batches."""
  lik = exp.likelihood
  sigmas = np.asarray(exp.sigmas)
  is_toy = exp.data.is_toy
  trace = resolve_trace(lik, exp.data.dataset)
  repeats = 1 if is_toy and trace == "exact" else int(lik.repeats)
  return {"step": int(step), "dataset": exp.data.dataset,
          "metric": "nll_nats" if is_toy else "bits_per_dim",
          "split": "drawn from the toy" if is_toy else lik.split,
          "num_examples": int(lik.num_examples), "repeats": repeats, "trace": trace,
          "num_probes": 1 if trace == "exact" else int(lik.num_probes),
          "rtol": float(lik.rtol), "atol": float(lik.atol), "sigma_min": float(sigmas[-1]),
          "sigma_max": float(sigmas[0]), "seed": int(exp.seed), "measures": MEASURES}


def _protocol_id(proto: dict) -> str:
  return hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:12]


def eval_examples(lik: LikelihoodSpec, d: DataSpec, *, seed: int) -> np.ndarray:
  """The evaluated examples `[n, ...]`: toy draws, or images in [0, 1] on the grid k / 255."""
  if d.is_toy:
    rng = rng_streams.key(seed, "likelihood_test_set")
    return np.asarray(toy.get_toy(d.dataset, dim=d.toy_dim).sample(rng, int(lik.num_examples)),
                      np.float32)
  from score_jax import image_data  # local import: grain, for image data sets only
  x = image_data.load_array(dataset=d.dataset, split=lik.split, image_size=d.image_size,
                            num_channels=d.num_channels, data_dir=d.data_dir, path=d.path,
                            max_examples=int(lik.num_examples), centered=False)
  if len(x) < int(lik.num_examples):
    raise ValueError(f"likelihood.num_examples={lik.num_examples} exceeds the {len(x)} examples "
                     f"of {d.dataset}/{lik.split}; lower it")
  return x


# Compiled batch programs by what they depend on (network, data, protocol, devices), so runs in
# one process trace once.
_BATCH_FNS: dict[tuple, Any] = {}
# The protocol fields a batch program depends on (the rest only label rows).
_PROGRAM_KEYS = ("repeats", "trace", "num_probes", "rtol", "atol", "sigma_min", "sigma_max",
                 "seed")


def make_batch_fn(exp: Experiment, proto: dict, *, exact_score: bool = False):
  """`p_fn(params, x [n, ...], index [n]) -> dict of [n, repeats]` over all devices.

  Toys give "logp" (nats); images "bpd_repeats" and "logp" (nats of the dequantized images in
  [0, 1]); both "nfe" and "success". Example i's keys fold from (seed, index i, repeat). With
  `exact_score` (toys with an exact density) the toy's own score replaces the network's, under the
  same protocol: what a perfect model gets from this estimator.
  """
  key = (exp.model, exp.data, tuple(proto[k] for k in _PROGRAM_KEYS), parallel.device_count(),
         exact_score)
  if key not in _BATCH_FNS:
    _BATCH_FNS[key] = _make_batch_fn(exp.model, exp.data, proto, exact_score)
  return _BATCH_FNS[key]


def _make_batch_fn(model: Any, d: DataSpec, proto: dict, exact_score: bool):
  dist = toy.get_toy(d.dataset, dim=d.toy_dim) if exact_score else None
  is_toy = d.is_toy
  centered = bool(d.centered)
  root = rng_streams.key(proto["seed"], "likelihood_examples")
  kwargs = dict(sigma_min=proto["sigma_min"], sigma_max=proto["sigma_max"], trace=proto["trace"],
                num_probes=proto["num_probes"], rtol=proto["rtol"], atol=proto["atol"])

  def body(params, batch):
    score_fn = dist.score if exact_score else make_score_fn(model, params)
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(batch["index"])
    if not is_toy:
      _, info = likelihood.bits_per_dim(score_fn, batch["x"], keys, num_repeats=proto["repeats"],
                                        centered=centered, **kwargs)
      return {k: info[k].T for k in ("bpd_repeats", "logp", "nfe", "success")}

    def one_repeat(r):
      rep_keys = jax.vmap(lambda k: jax.random.fold_in(k, r))(keys)
      logp, info = likelihood.log_prob(score_fn, batch["x"], rep_keys, **kwargs)
      return logp, info["nfe"], info["success"]

    logp, nfe, ok = jax.lax.map(one_repeat, jnp.arange(proto["repeats"]))
    return {"logp": logp.T, "nfe": nfe.T, "success": ok.T}

  p_body = parallel.batch_map(body, parallel.make_mesh())
  return lambda params, x, index: p_body(params, {"x": x, "index": index})


def _padded(x: np.ndarray, size: int) -> np.ndarray:
  """`x` with its last row repeated up to `size` rows: one compiled shape for every batch."""
  return x if len(x) == size else np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _mean_se(v: np.ndarray) -> tuple[float, float]:
  v = np.asarray(v, np.float64)
  se = float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
  return float(np.mean(v)), se


def run(exp: Experiment, state: Any, workdir: str, *,
        progress: bool = True) -> dict[str, Any]:
  """Measures the test-set likelihood of `state`'s first EMA parameters and writes the row.

  Batches already stored under `<workdir>/likelihood/<protocol id>/` are reused, not redone.

  Args:
    exp: the run's experiment (its `likelihood` spec sets the protocol).
    state: a train state (or an exported one) with `step` and `ema_params`.
    workdir: where the stored batches, `likelihood.jsonl`, `likelihood.csv` and (2-D toys) the
      log-density plot go.
    progress: show a progress bar (main process only).

  Returns:
    The row written: the mean and standard error with its protocol (`CSV_COLUMNS`).
  """
  check_spec(exp.likelihood)
  step = int(jax.device_get(state.step))
  _check_params_finite(state.ema_params[0], step)
  proto = protocol(exp, step)
  is_toy = exp.data.is_toy
  x = eval_examples(exp.likelihood, exp.data, seed=exp.seed)
  batch = int(exp.likelihood.batch_size)
  main = parallel.is_main_process()
  folder = os.path.join(workdir, "likelihood", _protocol_id(proto))
  if main:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "protocol.json"), "w", encoding="utf-8") as f:
      json.dump(proto, f, indent=1)
  starts = list(range(0, len(x), batch))
  paths = {s: os.path.join(folder, f"batch_{s:08d}.npz") for s in starts}
  # The stored batches as process 0 finds them, on every process: all draw the same batches.
  done = parallel.from_main(lambda: {s: _load_npz(paths[s]) for s in starts
                                     if os.path.isfile(paths[s])})
  todo = [s for s in starts if s not in done]
  p_fn = make_batch_fn(exp, proto) if todo else None
  params = state.ema_params[0]
  with progress_lib.bar(len(x), "likelihood", unit="example",
                        initial=len(x) - sum(min(batch, len(x) - s) for s in todo),
                        enabled=progress and main) as pbar:
    for s in todo:
      n = min(batch, len(x) - s)
      out = p_fn(params, _padded(x[s:s + n], batch), np.arange(s, s + batch, dtype=np.int32))
      done[s] = {k: np.asarray(v)[:n] for k, v in out.items()}
      if main:
        _save_npz(paths[s], done[s])
      pbar.update(n)
  values = {k: np.concatenate([done[s][k] for s in starts]) for k in done[starts[0]]}
  row = dict(proto)
  nfe = values["nfe"]
  value = values["logp"] if is_toy else values["bpd_repeats"]
  failed = ~values["success"].astype(bool) | ~np.isfinite(value)
  row.update(nfe_mean=float(np.mean(nfe)), nfe_max=int(np.max(nfe)),
             num_failed=int(np.sum(failed)))
  _check_solves(failed, step, folder)
  if is_toy:
    nll = -np.mean(values["logp"], axis=1)
    row["mean"], row["se"] = _mean_se(nll)
    dist = toy.get_toy(exp.data.dataset, dim=exp.data.toy_dim)
    if hasattr(dist, "log_prob"):
      true_nll = -np.asarray(dist.log_prob(jnp.asarray(x), proto["sigma_min"]), np.float64)
      row["true_mean"], row["true_se"] = _mean_se(true_nll)
      row["minus_true_mean"], row["minus_true_se"] = _mean_se(nll - true_nll)
      p_exact = make_batch_fn(exp, proto, exact_score=True)
      exact_nll = np.concatenate([
          -np.mean(p_exact(params, _padded(x[s:s + batch], batch),
                           np.arange(s, s + batch, dtype=np.int32))["logp"][:len(x[s:s + batch])],
                   axis=1) for s in starts])
      row["exact_mean"], row["exact_se"] = _mean_se(exact_nll)
      row["minus_exact_mean"], row["minus_exact_se"] = _mean_se(nll - exact_nll)
    if x.shape[1] == 2:
      _plot_log_density(proto, dist, x, params, make_batch_fn(exp, proto) if
                        p_fn is None else p_fn, batch, workdir)
  else:
    row["mean"], row["se"] = _mean_se(np.mean(values["bpd_repeats"], axis=1))
    row["bpd_bound"] = likelihood.bpd_lower_bound(proto["sigma_min"],
                                                  centered=bool(exp.data.centered))
  if main:
    _write_row(row, workdir)
  return row


def _check_solves(failed: np.ndarray, step: int, folder: str) -> None:
  """Refuses a result none of whose solves succeeded; warns when some failed.

  Args:
    failed: `[examples, repeats]` True where the ODE solve failed or its value is not finite.
  """
  fix = ("loosen likelihood.rtol / likelihood.atol, or check the checkpoint; the stored batches "
         f"are in {folder}")
  if failed.all():
    raise NothingFiniteError(f"every one of the {failed.size} likelihood solves at step {step} "
                             f"failed or gave a non-finite value: no likelihood to report; {fix}")
  if failed.any() and parallel.is_main_process():
    print(f"warning: {int(failed.sum())} of the {failed.size} likelihood solves at step {step} "
          f"failed or gave a non-finite value; the mean includes them (row's num_failed); {fix}",
          file=sys.stderr)


def _load_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return dict(f)


def _plot_log_density(proto, dist, x, params, p_fn, batch, workdir) -> None:
  """The model's log-density on a grid beside the truth's (2-D toys).

  Every process evaluates the grid (the batches run over all devices); process 0 plots it.
  """
  if hasattr(dist, "means"):
    means = np.asarray(dist.means, np.float64)
    pad = 3.0 * (float(np.max(dist.stds)) + proto["sigma_min"])
    lo, hi = means.min(axis=0) - pad, means.max(axis=0) + pad
  else:
    lo, hi = x.min(axis=0) - proto["sigma_min"], x.max(axis=0) + proto["sigma_min"]
  grid = plots.density_grid(lo, hi, GRID_POINTS)
  offset = proto["num_examples"]  # keys distinct from the test examples'
  logp = []
  for s in range(0, len(grid), batch):
    n = min(batch, len(grid) - s)
    out = p_fn(params, _padded(grid[s:s + n], batch),
               np.arange(offset + s, offset + s + batch, dtype=np.int32))
    logp.append(np.mean(out["logp"][:n], axis=1))
  panels = {"model": np.concatenate(logp).reshape(GRID_POINTS, GRID_POINTS)}
  if hasattr(dist, "log_prob"):
    panels["truth"] = np.asarray(dist.log_prob(jnp.asarray(grid), proto["sigma_min"])).reshape(
        GRID_POINTS, GRID_POINTS)
  if parallel.is_main_process():
    plots.save_log_density(panels, os.path.join(workdir, f"likelihood_step{proto['step']}.png"),
                           lo=lo, hi=hi, sigma_min=proto["sigma_min"])


def _write_row(row: dict, workdir: str) -> None:
  """Appends `row` to likelihood.jsonl (replacing a row of the same protocol) and rewrites the
  CSV."""
  path = os.path.join(workdir, "likelihood.jsonl")
  key = _protocol_id({k: row[k] for k in protocol_keys()})
  rows = [r for r in (read_jsonl(path) if os.path.isfile(path) else [])
          if _protocol_id({k: r.get(k) for k in protocol_keys()}) != key]
  rows.append(row)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(tmp, path)
  records.write_csv(rows, list(CSV_COLUMNS), os.path.join(workdir, "likelihood.csv"))


def protocol_keys() -> tuple[str, ...]:
  """The fields of `protocol`'s dict (a row's identity)."""
  return ("step", "dataset", "metric", "split", "num_examples", "repeats", "trace", "num_probes",
          "rtol", "atol", "sigma_min", "sigma_max", "seed", "measures")


def format_row(row: dict) -> str:
  """One line for the terminal: the number, its standard error and the protocol."""
  unit = "nats" if row["metric"] == "nll_nats" else "bits/dim"
  name = "NLL" if row["metric"] == "nll_nats" else "bits/dim"
  text = f"{name} {row['mean']:.4f} +- {row['se']:.4f} {unit}"
  if row.get("bpd_bound") is not None:
    bound = (f"the least any density smoothed by N(0, sigma_min^2 I) gives is "
             f"{row['bpd_bound']:.4f}")
    if row["mean"] < row["bpd_bound"]:
      bound += "; below it, this is not the likelihood of the data smoothed at sigma_min"
    text += f" ({bound})"
  if row.get("true_mean") is not None:
    text += (f" (truth {row['true_mean']:.4f}; exact score, same protocol "
             f"{row['exact_mean']:.4f}; model - exact score {row['minus_exact_mean']:.4f} +- "
             f"{row['minus_exact_se']:.4f})")
  return (f"{text}; step {row['step']}, {row['num_examples']} examples x {row['repeats']} "
          f"repeats, trace {row['trace']} ({row['num_probes']} probes), rtol {row['rtol']:g}, "
          f"atol {row['atol']:g}, NFE mean {row['nfe_mean']:.0f} max {row['nfe_max']}, "
          f"sigma {row['sigma_min']:g}..{row['sigma_max']:g}: {MEASURES}")
