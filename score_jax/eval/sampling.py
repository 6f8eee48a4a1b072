"""The eval modes' samplers: compiled once, over every device, with the params as an argument.

`make_checkpoint_sampler` is `experiment.make_sample_fn` for one sampler setting; every checkpoint
of `--mode=eval` reuses its one compiled program. `make_step_lr_sampler` draws the samples of
several settings that differ only in step_lr as one program vmapped over the step sizes (the
sampler sweep's `eval.sweep_vmap`); each setting's samples are those its own sampler draws.
Both return `p_sample(params, rng, start, n)`: samples start..start+n-1 of one sequence (sample
k from the key folded from (rng, k), `parallel.shard_sampler`) and the network evaluations per
sample.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from score_jax import experiment, models, parallel
from score_jax.eval.sweep import sampler_args

SampleFn = Callable[[Any, jax.Array, int, int], tuple[np.ndarray, np.ndarray]]


def _sample_fn(config: ml_collections.ConfigDict, method: str, overrides: dict) -> Callable:
  """`experiment.make_sample_fn` of the configured `method` with `overrides` of its arguments,
  returning `(samples, info)`."""
  return experiment.make_sample_fn(
      models.build(config), experiment.sigmas_from_config(config),
      experiment.example_shape(config), method=method,
      init=experiment.sampler_init(config, method), return_info=True,
      **{**experiment.sampler_kwargs(config, method), **overrides})


def make_checkpoint_sampler(config: ml_collections.ConfigDict, method: str | None = None,
                            **overrides) -> SampleFn:
  """`experiment.make_sample_fn` over all devices, taking the params as an argument.

  Args:
    config: the run's config (model, noise and sampling groups).
    method: the sampler (None: `sampling.method`).
    **overrides: sampler arguments that replace the configured ones.

  Returns:
    `p_sample(params, rng, start, n) -> (samples [n, ...], nfe [n])`, one compiled program for
    all checkpoints.
  """
  fn = _sample_fn(config, method or config.sampling.method, overrides)
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


def make_step_lr_sampler(config: ml_collections.ConfigDict, entries: list[dict]) -> SampleFn:
  """One program drawing the samples of sweep `entries` that differ only in step_lr (ALS, CAS).

  Args:
    config: the run's config (model, noise and sampling groups).
    entries: sweep settings of one method, equal but for `step_lr` (`sweep.step_lr_groups`).

  Returns:
    `p_sample(params, rng, start, n) -> (samples [n, k, ...], nfe [n])` for the k = len(entries)
    step sizes; setting j's samples equal those `make_checkpoint_sampler` draws for it alone, up
    to float rounding.
  """
  fn = _sample_fn(config, entries[0]["method"], sampler_args(entries[0]))
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

  return p_sample
