"""score_jax command line (`python main.py` runs `main` here).

  python main.py                                        # embedded default: train + sample
  python main.py --config=configs/mnist_cpu.py --workdir=runs/mnist
  python main.py --config=configs/two_d.py:swiss_roll --config.training.num_train_steps=500
  python main.py --mode=sample --workdir=runs/default   # sample from the latest checkpoint
  python main.py --mode=sweep --config=configs/default.py  # runs get_sweep() of the config file

Modes: train (train, then sample with each of `sampling.methods` and write results), sample (with
`sampling.method`), eval, sampler_sweep, sweep.
Bad input (unknown config file or key, wrong type, inconsistent values, unwritable workdir,
incompatible checkpoint) prints one line and exits with status 2, before anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys
import tempfile

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

_REPO = pathlib.Path(__file__).resolve().parents[1]
_MODES = ("train", "sample", "eval", "sampler_sweep", "sweep")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", str(_REPO / "configs" / "default.py"),
                                "Experiment config file, optionally file.py:arg.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, samples). "
                    "Default: runs/<config file name>.")
flags.DEFINE_enum("mode", "train", _MODES, "What to run.")
flags.DEFINE_integer("num_devices", None, "Use only the first N devices (default: all).")


class UsageError(ValueError):
  """Bad command-line input; reported in one line with exit status 2."""


def validate_config(config) -> None:
  """Checks values that types cannot; raises UsageError naming the field and the fix."""
  import jax
  from score_jax import data, experiment, models
  n, t, s = config.noise, config.training, config.sampling
  if not n.sigma_min > 0:
    raise UsageError(f"noise.sigma_min={n.sigma_min} must be > 0")
  if not n.sigma_max > n.sigma_min:
    raise UsageError(f"noise.sigma_max={n.sigma_max} must be > noise.sigma_min={n.sigma_min}")
  if n.num_scales < 2:
    raise UsageError(f"noise.num_scales={n.num_scales} must be >= 2")
  devices = FLAGS.num_devices or jax.device_count()
  if t.batch_size <= 0 or t.batch_size % devices:
    raise UsageError(f"training.batch_size={t.batch_size} must be a positive multiple of the "
                     f"{devices} devices in use")
  for name in ("num_train_steps", "log_every_steps", "ckpt_every_steps", "steps_per_dispatch"):
    if t[name] <= 0:
      raise UsageError(f"training.{name}={t[name]} must be > 0")
  data.check_dataset(config.data.dataset)
  if not data.is_toy(config.data.dataset) and config.model.name == "mlp":
    raise UsageError(f"model.name='mlp' is for toy data; {config.data.dataset} needs an image "
                     "network: set --config.model.name=ncsnv2 (or ncsn, unet)")
  models.build(config)  # rejects unknown names and image sizes the network cannot take
  for method in ("als", "cas"):
    if s[method].step_lr is not None and s[method].step_lr <= 0:
      raise UsageError(f"sampling.{method}.step_lr={s[method].step_lr} must be > 0")
  for field, method in (("method", s.method), *(("methods", m) for m in s.methods)):
    if method not in experiment.SAMPLERS:
      raise UsageError(f"sampling.{field} has {method!r}; use one of "
                       f"{', '.join(experiment.SAMPLERS)}")
    if method in experiment.ODE_SAMPLERS:
      g = s[method]
      try:
        experiment.sampling_ladder(experiment.sigmas_from_config(config), ladder=g.ladder,
                                   num_steps=g.num_steps, rho=g.rho, sigma_max=g.sigma_max,
                                   sigma_min=g.sigma_min)
      except ValueError as e:
        raise UsageError(f"sampling.{method}: {e}") from None
  if s.num_samples <= 0 or s.batch_size <= 0:
    raise UsageError("sampling.num_samples and sampling.batch_size must be > 0")


def _check_workdir(workdir: str) -> None:
  """Creates `workdir` and proves it writable, so a bad path fails before any training.

  Permission bits are not enough (root passes `os.access` everywhere, even on /proc), so
  this makes the directory and a probe file for real.
  """
  path = pathlib.Path(workdir).resolve()
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_probe_") as probe:
      probe.write(b"ok")
  except OSError as e:
    raise UsageError(f"--workdir={workdir}: {path} is not a writable directory "
                     f"({e.strerror or e}); pick a directory you can write to") from None


def _default_workdir() -> str:
  filename = config_flags.get_config_filename(FLAGS["config"])
  return os.path.join("runs", pathlib.Path(filename.split(":")[0]).stem)


def _load_sweep(config_file: str) -> list[dict]:
  path = config_file.split(":")[0]
  spec = importlib.util.spec_from_file_location("score_jax_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise UsageError(f"--mode=sweep: {path} defines no get_sweep() returning override dicts")
  return list(module.get_sweep())


def _apply_overrides(config, overrides: dict):
  config = config.copy_and_resolve_references()
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise UsageError(f"sweep override {dotted!r} names no config field")
    node[leaf] = tuple(value) if isinstance(node[leaf], tuple) else value
  return config


def _cli_override_keys(argv: list[str]) -> list[str]:
  keys = []
  for arg in argv:
    if arg.startswith("--config."):
      keys.append(arg[len("--config."):].split("=", 1)[0])
  return keys


def _with_cli_overrides(stored, cli_config):
  """The checkpoint's config with the `--config.a.b=v` flags of this command applied on top.

  Without `--config=FILE`, sample/eval modes start from the config the run was trained with, so
  `--mode=sample --config.sampling.method=cas` changes only the sampler.
  """
  values = {}
  for key in _cli_override_keys(sys.argv):
    node = cli_config
    for part in key.split("."):
      node = node[part]
    values[key] = node
  return _apply_overrides(stored, values) if values else stored


def _summary_table(results: dict) -> str:
  if not any("mmd_rbf" in m for m in results.values()):  # images: point at the outputs
    return "\n".join(f"{method:<7} {m['num_samples']} samples in samples/{method}_step{m['step']}"
                     "*.png/.npz" for method, m in results.items())
  fmt = lambda values, spec: " ".join(format(v, spec) for v in values)
  rows = [f"{'method':<17} {'nfe':>7}  {'mmd_rbf':<9} {'energy':<9} mode_weights (true)  "
          "mode_mean_err  mode_vars (true)"]
  for method, m in results.items():
    nfe = m.get("nfe")
    line = (f"{method:<17} {'-' if nfe is None else format(nfe, '.1f'):>7}  "
            f"{m.get('mmd_rbf', float('nan')):<9.4f} {m.get('energy_distance', float('nan')):<9.4f}")
    if m.get("mode_weights") is not None:
      mode_vars = [np.mean(v) for v in m["mode_vars"]]
      true_vars = [np.mean(v) for v in m["true_mode_vars"]]
      line += (f" {fmt(m['mode_weights'], '.3f')} ({fmt(m['true_mode_weights'], '.3f')})  "
               f"{m['mode_mean_error']:<13.3f}  {fmt(mode_vars, '.3f')} ({fmt(true_vars, '.3f')})")
    rows.append(line)
  return "\n".join(rows)


def run(config, workdir: str, mode: str) -> None:
  """Runs one mode on a validated config (the importable body of the CLI)."""
  from score_jax import experiment, parallel, sample, train
  if mode == "train":
    state = train.train_and_evaluate(config, workdir, num_devices=FLAGS.num_devices)
    results = sample.sample_and_write(config, state, workdir)
    if parallel.is_main_process():
      print(_summary_table(results))
      print(f"results in {os.path.abspath(workdir)}")
  elif mode == "sample":
    loaded_config, state = experiment.load_checkpoint(workdir)
    if FLAGS["config"].present:
      experiment.check_compatible(json.loads(loaded_config.to_json()), config, workdir)
    else:
      config = _with_cli_overrides(loaded_config, config)
    results = sample.sample_and_write(config, state, workdir, methods=(config.sampling.method,))
    if parallel.is_main_process():
      print(_summary_table(results))
  elif mode in ("eval", "sampler_sweep"):
    from score_jax import evaluate
    if not FLAGS["config"].present:
      config = _with_cli_overrides(experiment.load_checkpoint(workdir)[0], config)
    evaluate.run(config, workdir, mode=mode)
  elif mode == "sweep":
    sweep = _load_sweep(config_flags.get_config_filename(FLAGS["config"]))
    for i, overrides in enumerate(sweep):
      sub = os.path.join(workdir, f"sweep_{i:03d}_" + "_".join(
          f"{k.split('.')[-1]}={v}" for k, v in overrides.items()).replace("/", "-"))
      sub_config = _apply_overrides(config, overrides)
      validate_config(sub_config)
      print(f"[sweep {i + 1}/{len(sweep)}] {overrides} -> {sub}")
      run(sub_config, sub, "train")


def main(argv: list[str]) -> int:
  try:
    FLAGS(argv)
  except flags.Error as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except Exception as e:  # ml_collections reports bad config files/overrides with many types.
    print(f"error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  # Orbax logs every save at INFO; the run prints its own progress.
  logging.set_verbosity(logging.WARNING)
  logging.use_absl_handler()
  from score_jax import checkpoint, train
  try:
    config = FLAGS.config
    config.get("name")
  except Exception as e:  # config_flags defers file errors to the first access.
    print(f"error: --config: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  workdir = FLAGS.workdir or _default_workdir()
  try:
    if config.training.distributed:
      from score_jax import parallel
      parallel.initialize_distributed(True)
    validate_config(config)
    _check_workdir(workdir)
    run(config, workdir, FLAGS.mode)
  except (UsageError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except train.TrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except ValueError as e:
    if os.environ.get("SCORE_JAX_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
