"""score_jax: score-based generative modeling (NCSN, NCSNv2, CAS, adversarial SM) in JAX/Flax.

Notebook entry points (imported lazily so `import score_jax` stays cheap):
  `load_checkpoint(workdir, step=None) -> (config, state)`
  `load(path_or_url) -> (config, state)` from a file written by `--mode=export`
  `make_sampler(config, state, method=None, **overrides) -> (rng, n) -> samples`
"""

import os
import pathlib

__all__ = ["cache_dir", "load", "load_checkpoint", "make_sampler"]


def cache_dir() -> pathlib.Path:
  """Where downloaded and built assets are kept: `$SCORE_JAX_CACHE`, else
  `~/.cache/score_jax`."""
  return pathlib.Path(os.environ.get("SCORE_JAX_CACHE")
                      or os.path.expanduser("~/.cache/score_jax"))


def load_checkpoint(workdir, step=None):
  """Returns `(config, state)` restored from `workdir` (latest step if `step` is None)."""
  from score_jax import experiment
  return experiment.load_checkpoint(workdir, step=step)


def load(path_or_url):
  """Returns `(config, state)` from an export file (a path or an http(s)/file URL).

  The file is one written by `python main.py --mode=export` (or `score_jax.export.write`): the
  EMA parameters and the config, no optimizer state. `make_sampler(config, state)` then samples
  exactly as from the workdir it was exported from.
  """
  from score_jax import export
  return export.load(path_or_url)


def make_sampler(config, state, method=None, **overrides):
  """A jit-compiled `(rng, n) -> samples` with the first EMA params and the configured sampler.

  `method` ("als", "cas", "pc") replaces `sampling.method`; keyword overrides replace that
  sampler's settings (`sampling.<method>`: step_lr, steps_per_sigma, n_sigma, snr,
  corrector_steps; denoise) or set `init`, `return_trajectory`, `save_every`.
  """
  from score_jax import experiment
  return experiment.make_sampler(config, state, method=method, **overrides)
