"""The eval modes' samplers: compiled once, over every device, with the params as an argument.

Both are `sampling.make_parallel_sampler` (the one multi-device sampling wrapper) for the run's
configured sampler. `make_checkpoint_sampler` draws one sampler setting; every checkpoint of
`--mode=eval` reuses its one compiled program. `make_step_lr_sampler` draws the samples of
several settings that differ only in step_lr as one program vmapped over the step sizes (the
sampler sweep's `eval.sweep_vmap`); each setting's samples are those its own sampler draws.
Both return `p_sample(params, rng, start, n)`: samples start..start+n-1 of one sequence (sample
k from the key folded from (rng, k)) and the network evaluations per sample.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from score_jax import experiment, models, parallel, sampling
from score_jax.eval.sweep import sampler_args

SampleFn = Callable[[Any, jax.Array, int, int], tuple[np.ndarray, np.ndarray]]


def _parallel_sampler(config: ml_collections.ConfigDict, method: str, overrides: dict,
                      grid: dict | None = None) -> SampleFn:
  """`sampling.make_parallel_sampler` of the configured `method` with `overrides` of its
  arguments, as `p_sample(params, rng, start, n) -> (samples, nfe [n])`."""
  sampler = sampling.make_parallel_sampler(
      models.build(config), experiment.sigmas_from_config(config),
      experiment.example_shape(config), method=method, mesh=parallel.make_mesh(),
      init=experiment.sampler_init(config, method),
      kwargs={**experiment.sampler_kwargs(config, method), **overrides}, grid=grid)

  def p_sample(params, rng, start, n):
    x, info = sampler(params, rng, start, n)
    return x, info["nfe"]

  return p_sample


def make_checkpoint_sampler(config: ml_collections.ConfigDict, method: str | None = None,
                            **overrides) -> SampleFn:
  """The configured sampler over all devices, taking the params as an argument.

  Args:
    config: the run's config (model, noise and sampling groups).
    method: the sampler (None: `sampling.method`).
    **overrides: sampler arguments that replace the configured ones.

  Returns:
    `p_sample(params, rng, start, n) -> (samples [n, ...], nfe [n])`, one compiled program for
    all checkpoints.
  """
  return _parallel_sampler(config, method or config.sampling.method, overrides)


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
  return _parallel_sampler(config, entries[0]["method"], sampler_args(entries[0]),
                           grid={"step_lr": [e["step_lr"] for e in entries]})
