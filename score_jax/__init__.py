"""score_jax: score-based generative modeling (NCSN, NCSNv2, CAS, adversarial SM) in JAX/Flax.

Notebook entry points (imported lazily so `import score_jax` stays cheap):
  `load_checkpoint(workdir, step=None) -> (config, state)`
  `load(path_or_url) -> (config, state)` from a file written by `--mode=export`
  `make_sampler(config, state, method=None, **overrides) -> (rng, n) -> samples`
"""

import importlib.metadata
import os
import pathlib
import re
import sys

# The supported range: requires-python and the jax lower bound of pyproject.toml.
PYTHON_RANGE = ((3, 11), (3, 13))
MIN_JAX = (0, 7, 2)


def _check_versions(python: tuple[int, ...] = tuple(sys.version_info),
                    version=importlib.metadata.version) -> None:
  """Raises ImportError naming the supported range when Python, jax or jaxlib is outside it.

  Args:
    python: the interpreter's version, `(major, minor, ...)`.
    version: `distribution name -> version string` (`importlib.metadata.version`).
  """
  if not PYTHON_RANGE[0] <= tuple(python[:2]) <= PYTHON_RANGE[1]:
    raise ImportError(f"score_jax supports Python 3.11 to 3.13, not "
                      f"{'.'.join(map(str, python[:3]))}; create the environment with one of those")
  for dist in ("jax", "jaxlib"):
    try:
      found = version(dist)
    except importlib.metadata.PackageNotFoundError:
      raise ImportError(f"score_jax needs {dist} 0.7.2 or newer, which is not installed; "
                        "pip install score_jax (or score_jax[cuda12], score_jax[tpu])") from None
    if tuple(int(p) for p in re.findall(r"\d+", found)[:3]) < MIN_JAX:
      raise ImportError(f"score_jax supports {dist} 0.7.2 and newer, not {found}; "
                        'pip install -U "jax>=0.7.2" (with its CUDA plugin or libtpu of the same '
                        "version)")


_check_versions()

__all__ = ["cache_dir", "configs_dir", "load", "load_checkpoint", "make_sampler"]


def cache_dir() -> pathlib.Path:
  """Where downloaded and built assets are kept: `$SCORE_JAX_CACHE`, else
  `~/.cache/score_jax`."""
  return pathlib.Path(os.environ.get("SCORE_JAX_CACHE")
                      or os.path.expanduser("~/.cache/score_jax"))


def configs_dir() -> pathlib.Path:
  """The folder of the shipped configs (`default.py` is the schema): `configs/` of the source
  checkout that holds this package, else `score_jax/configs` of an installed package.

  The checkout comes first: an editable install maps `score_jax.configs` to the checkout it was
  made from, which is not this package's when the package is imported from another checkout
  (a git worktree) with the same environment.
  """
  try:
    # Installed (also in editable mode). Importing it also makes `configs`, the name the config
    # files import each other by, resolve outside a checkout.
    # local import: may be absent (caught below); importing it aliases `configs`
    from score_jax import configs
  except ImportError:
    configs = None
  checkout = pathlib.Path(__file__).resolve().parent.parent
  if (checkout / "configs" / "default.py").is_file() and (checkout / "pyproject.toml").is_file():
    return checkout / "configs"
  if configs is None:
    return checkout / "configs"
  return pathlib.Path(configs.__file__).resolve().parent


def load_checkpoint(workdir, step=None, *, allow_undigested=False):
  """Returns `(config, state)` restored from `workdir` (latest step if `step` is None).

  Every step is checked against the digest saved with it; `allow_undigested=True` also reads
  steps without one, unverified (only for checkpoints written before digests existed).
  """
  # local import: every submodule import runs this file; experiment loads Flax and Orbax
  from score_jax import experiment
  return experiment.load_checkpoint(workdir, step=step, allow_undigested=allow_undigested)


def load(path_or_url):
  """Returns `(config, state)` from an export file (a path or an http(s)/file URL).

  The file is one written by `python main.py --mode=export` (or `score_jax.export.write`): the
  EMA parameters and the config, no optimizer state. `make_sampler(config, state)` then samples
  exactly as from the workdir it was exported from.
  """
  # local import: every submodule import runs this file; export loads Flax and Orbax
  from score_jax import export
  return export.load(path_or_url)


def make_sampler(config, state, method=None, **overrides):
  """A jit-compiled `(rng, n) -> samples` with the first EMA params and the configured sampler.

  `method` ("als", "cas", "pc") replaces `sampling.method`; keyword overrides replace that
  sampler's settings (`sampling.<method>`: step_lr, steps_per_sigma, n_sigma, snr,
  corrector_steps; denoise) or set `init`, `return_trajectory`, `save_every`.
  """
  # local import: every submodule import runs this file; experiment loads Flax and Orbax
  from score_jax import experiment
  return experiment.make_sampler(config, state, method=method, **overrides)
