"""score_jax command line (`python main.py` runs `main` here).

  python main.py                                        # embedded default: train + sample
  python main.py --config=configs/mnist_cpu.py --workdir=runs/mnist
  python main.py --config=configs/two_d.py:swiss_roll --config.training.num_train_steps=500
  python main.py --mode=sample --workdir=runs/default   # sample from the latest checkpoint
  python main.py --mode=sweep --config=configs/default.py  # runs get_sweep() of the config file
  python main.py --mode=likelihood --workdir=runs/default  # test-set NLL / bits per dim
  python main.py --mode=export --workdir=runs/default   # EMA params + config in one file

Modes: train (train, then sample with each of `sampling.methods` and write results), sample (with
`sampling.method`), eval, sampler_sweep, sweep, likelihood (the test set's likelihood under the
latest checkpoint, `score_jax.likelihood_eval`), export (the latest checkpoint's EMA parameters and
config as one file, `score_jax.export`; `--export_path`, default `<workdir>/export.msgpack`).
Bad input (unknown config file or key, wrong type, inconsistent values, unwritable workdir,
incompatible checkpoint) prints one line and exits with status 2, before anything is written. A
full disk (status 1), a read-only file system or a permission error (status 2) met on the way is
one line naming the path and what to do.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging as std_logging
import os
import pathlib
import re
import socket
import sys
import textwrap

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

import score_jax
from score_jax import config_schema, help_flags, paths, workdir_lock
from score_jax.config_schema import UsageError

# Each mode with the one line `--help` shows for it.
_MODE_HELP = {
    "train": "train (resuming the workdir's checkpoint), then sample with each of "
             "sampling.methods and print the results table",
    "sample": "sample the latest checkpoint with sampling.method",
    "eval": "FID/KID (IS) of every kept checkpoint against eval.reference_split; reports the best",
    "sampler_sweep": "the main metric of the latest checkpoint over a grid of sampler settings "
                     "(eval.sweep_*)",
    "sweep": "train each run of the config file's get_sweep() into <workdir>/sweep_<i>_<overrides>",
    "likelihood": "test-set NLL and bits per dim of the latest checkpoint (probability-flow ODE)",
    "export": "the latest checkpoint's EMA parameters and config as one file (--export_path)",
}
_MODES = tuple(_MODE_HELP)

FLAGS = flags.FLAGS
try:
  config_flags.DEFINE_config_file("config", str(score_jax.configs_dir() / "default.py"),
                                  "Experiment config file, optionally file.py:arg.",
                                  lock_config=True)
  _CONFIG_FLAG_ERROR = None
except (AttributeError, KeyError, TypeError, ValueError) as e:
  # ml_collections applies the command line's --config.* overrides to the default config as soon
  # as the flag is defined, at import; `main` reports such a failure as a one-line usage error.
  _CONFIG_FLAG_ERROR = e
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, samples). "
                    "Default: runs/<config file name>.")
flags.DEFINE_enum("mode", "train", _MODES, "What to run.")
flags.DEFINE_integer("num_devices", None, "Use only the first N devices (default: all).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0's "
                    "coordinator (with --num_processes and --process_id; see score_jax.launch).")
flags.DEFINE_integer("num_processes", None, "Multi-host: the number of processes of the job.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index in 0..N-1.")
flags.DEFINE_list("local_device_ids", None, "Multi-host: the local device ids this process uses "
                  "(default: all).")
flags.DEFINE_bool("distributed", False, "Multi-host: join the cluster JAX detects (TPU pod, "
                  "SLURM, Open MPI); the same as --config.training.distributed=True.")
flags.DEFINE_string("export_path", None, "--mode=export: the file to write "
                    "(default: <workdir>/export.msgpack).")
flags.DEFINE_bool("allow_undigested_checkpoints", False, "Also read checkpoint steps without a "
                  "digest, unverified (only for checkpoints written before digests existed).")
flags.DEFINE_bool("restart_from_scratch", False, "--mode=train: train from step 0 in a workdir "
                  "whose every checkpoint was found damaged and moved to checkpoints/damaged/, "
                  "replacing that run's logs (refused otherwise).")


def _usage() -> str:
  """The text of `--help`: usage, the modes, examples and where the config fields are."""
  configs = score_jax.configs_dir()
  where = os.path.relpath(configs) if configs.is_relative_to(os.getcwd()) else str(configs)
  shipped = textwrap.fill(" ".join(sorted(p.stem for p in configs.glob("*.py")
                                           if p.stem != "__init__")), 100,
                          initial_indent="  ", subsequent_indent="  ")
  modes = "\n".join(textwrap.fill(text, 100, initial_indent=f"  {name:<14} ",
                                   subsequent_indent=" " * 17)
                     for name, text in _MODE_HELP.items())
  return f"""\
usage: score-jax [--config=FILE.py[:ARG]] [--config.GROUP.FIELD=VALUE ...] [--mode=MODE]
                 [--workdir=DIR] [flags]
       (the same command: python main.py, python -m score_jax)

Score-based generative modeling (NCSN, NCSNv2, CAS, adversarial score matching) in JAX.

modes (--mode, default train):
{modes}

examples:
  score-jax                                             # train + sample the embedded default
  score-jax --config=configs/mnist_cpu.py --workdir=runs/mnist
  score-jax --config=configs/two_d.py:swiss_roll --config.training.num_train_steps=500
  score-jax --mode=sample --workdir=runs/default --config.sampling.method=cas

config: --config names a config file (default: configs/default.py, the schema: every field with
its default and a one-line comment). Any field is set with --config.GROUP.FIELD=VALUE, groups
data, model, noise, optim, training, sampling, adversarial, eval. The shipped configs,
--config=configs/NAME.py (in {where}):
{shipped}
Reading modes without --config reuse the checkpoint's config with the --config.* flags on top.
Bad input prints one line `error: ...` and exits with status 2 before anything is written.
"""


help_flags.define(_usage, lambda: FLAGS.get_flags_for_module(sys.modules[__name__]))


# Modes that read an existing workdir; without --config they start from the checkpoint's config.
_READER_MODES = ("sample", "eval", "sampler_sweep", "likelihood", "export")


def validate(config, mode: str, num_devices: int | None = None) -> None:
  """The schema's checks for a run of `mode` (one-line UsageError naming the field and the fix).

  Args:
    config: the run's config.
    mode: a CLI mode (`sweep` validates each run as `train`).
    num_devices: the `--num_devices` flag; None: all local devices.
  """
  config_schema.validate(config, modes=("train",) if mode == "sweep" else (mode,),
                         num_devices=num_devices)
  if mode in ("train", "sweep"):
    config_schema.check_data_source(config)
  if mode in ("eval", "sampler_sweep"):
    # local import: JAX and Flax load only past validation (fast --help and usage errors)
    from score_jax.eval import evaluators
    evaluators.feature_kind(config.eval.features, dataset=config.data.dataset,
                            image_size=config.data.image_size,
                            num_channels=config.data.num_channels)


def _check_workdir(workdir: str, mode: str) -> None:
  """Creates `workdir` and proves it writable, so a bad path fails before any training.

  Permission bits are not enough (root passes `os.access` everywhere, even on /proc), so
  this makes the directory and a probe file for real. Training first checks that no other
  writer holds the workdir, and reading modes need an existing workdir: a refused run creates
  nothing.
  """
  try:
    paths.check_url_support(workdir, checkpoints=True)
  except paths.CloudStorageError as e:
    raise UsageError(f"--workdir={e}") from None
  path = paths.as_path(workdir)
  if mode in ("train", "sweep"):
    # Every process of a multi-host run shares the workdir and would see its own job's lock:
    # process 0, the one that takes the lock, checks it and tells the others.
    # local import: JAX and Flax load only past validation (fast --help and usage errors)
    from score_jax import parallel
    parallel.from_main(lambda: workdir_lock.raise_if_held(os.fspath(path)))
  elif not path.is_dir():
    raise UsageError(f"--workdir={workdir}: {path} does not exist, so it holds no checkpoint; "
                     "train first or pass the run's --workdir")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe_{socket.gethostname()}_{os.getpid()}"
    probe.write_bytes(b"ok")
    probe.unlink()
  except OSError as e:
    raise UsageError(f"--workdir={workdir}: {path} is not a writable directory "
                     f"({getattr(e, 'strerror', None) or e}); pick a directory you can write "
                     "to") from None


def _check_run_dir(workdir: str) -> None:
  """UsageError unless `workdir` holds checkpoints to read (sample, eval and sweep modes)."""
  fix = f"train first (python main.py --workdir={workdir}) or pick the run's directory"
  if not paths.isdir(workdir):
    raise UsageError(f"--workdir={workdir} does not exist, so it holds no checkpoints/; {fix}")
  if not paths.isdir(paths.join(workdir, "checkpoints")):
    raise UsageError(f"no checkpoint in {paths.join(workdir, 'checkpoints')}: --workdir={workdir} "
                     f"holds no checkpoints/; {fix}")


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
      if p not in node:
        raise UsageError(f"override {dotted!r} names no config field")
      node = node[p]
    if leaf not in node:
      # local import: JAX and Flax load only past validation (fast --help and usage errors)
      from score_jax import stored_config
      raise UsageError(f"override {dotted!r} names no config field"
                       f"{stored_config.moved_field_hint(dotted)}")
    try:
      node[leaf] = tuple(value) if isinstance(node[leaf], tuple) else value
    except TypeError as e:
      raise UsageError(f"override {dotted}={value!r}: {e}") from None
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


# What the files a sampling run writes under <workdir>/samples hold, by the end of their name.
_OUTPUT_KINDS = (
    ("_denoised_grid.png", "sample grid after the final denoising step"),
    ("_grid.png", "sample grid"),
    ("_intermediates.png", "samples along the sampler's trajectory"),
    ("comparison_step", "ground truth next to each sampler's samples"),
    ("trajectory_step", "per-level sampler statistics against sigma"),
    ("inpainting_step", "inpainted test images"),
    (".npz", "samples (x), and the sigma ladder"),
    ("metrics_step", "the table above, as JSON"),
)


def _sample_count_line(results: dict) -> str:
  """Which samples the table measures: how many, on how many devices."""
  import jax
  counts = sorted({m["num_samples"] for m in results.values()})
  n = " or ".join(str(c) for c in counts)
  return (f"{n} samples per sampler, drawn over {jax.device_count()} device(s) with per-sample "
          "keys (the values depend on the sample count, not on the devices)")


def _outputs(workdir: str, results: dict, *, trained: bool) -> str:
  """The lines naming what the run wrote: this step's sample files, the logs and TensorBoard."""
  step = next(iter(results.values()))["step"]
  samples = paths.as_path(paths.join(workdir, "samples"))
  lines = [f"wrote to {workdir}:"]
  names = sorted(p.name for p in samples.iterdir() if f"step{step}" in p.name) \
      if samples.is_dir() else []
  for name in names:
    what = next((text for end, text in _OUTPUT_KINDS if end in name), "")
    lines.append(f"  samples/{name:<38} {what}")
  logs = [(name, text) for name, text in (
      ("metrics.jsonl", "training metrics, one JSON row per logging step"),
      ("sample_metrics.jsonl", "the table's rows, one per sampler and run")) if
      paths.exists(paths.join(workdir, name)) and (trained or name != "metrics.jsonl")]
  for name, text in logs:
    lines.append(f"  {name:<46} {text}")
  if paths.isdir(paths.join(workdir, "tb")):
    lines.append(f"  {'tb/':<46} TensorBoard (scalars, sample images): tensorboard --logdir "
                 f"{workdir.rstrip('/')}/tb")
  return "\n".join(lines)


def _reader_config(config, workdir: str, mode: str):
  """`(config, state)` of a reading mode: the checkpoint's state, with `--config=FILE` checked
  against the checkpoint, or else the checkpoint's config with this command's overrides."""
  # local import: JAX and Flax load only past validation (fast --help and usage errors)
  from score_jax import experiment, stored_config
  loaded_config, state = experiment.load_checkpoint(
      workdir, allow_undigested=FLAGS.allow_undigested_checkpoints)
  if FLAGS["config"].present:
    stored_config.check_compatible(json.loads(loaded_config.to_json()), config, workdir)
  else:
    config = _with_cli_overrides(loaded_config, config)
    validate(config, mode, FLAGS.num_devices)
  return config, state


def run(config, workdir: str, mode: str, *, sweep_runs: list | None = None) -> None:
  """Runs one mode on a validated config (the importable body of the CLI).

  The train and sample modes turn the config (for reading modes, the checkpoint's with this
  command's overrides) once into an `experiment.Experiment` and pass that on.
  `sweep_runs`: the validated runs of `--mode=sweep` (`_sweep_runs`), so the config file's
  `get_sweep()` is not executed again.
  """
  # local import: JAX and Flax load only past validation (fast --help and usage errors)
  from score_jax import experiment, parallel, sample, train
  if mode == "train":
    exp = experiment.build(config)
    state = train.train_and_evaluate(exp, workdir, num_devices=FLAGS.num_devices,
                                     allow_undigested=FLAGS.allow_undigested_checkpoints,
                                     restart_from_scratch=FLAGS.restart_from_scratch)
    results = sample.sample_and_write(exp, state, workdir)
    if parallel.is_main_process():
      print(_sample_count_line(results))
      print(_summary_table(results))
      print(_outputs(workdir, results, trained=True))
  elif mode == "sample":
    config, state = _reader_config(config, workdir, mode)
    exp = experiment.build(config)
    results = sample.sample_and_write(exp, state, workdir, methods=(exp.sampling.method,))
    if parallel.is_main_process():
      print(_sample_count_line(results))
      print(_summary_table(results))
      print(_outputs(workdir, results, trained=False))
  elif mode in ("eval", "sampler_sweep"):
    # local import: JAX and Flax load only past validation (fast --help and usage errors)
    from score_jax import evaluate
    if not FLAGS["config"].present:
      config = _with_cli_overrides(experiment.load_checkpoint(
          workdir, allow_undigested=FLAGS.allow_undigested_checkpoints)[0], config)
      validate(config, mode, FLAGS.num_devices)
    evaluate.run(experiment.build(config), workdir, mode=mode,
                 allow_undigested=FLAGS.allow_undigested_checkpoints)
  elif mode in ("likelihood", "export"):
    export_path = FLAGS.export_path or os.path.join(workdir, "export.msgpack")
    if mode == "export" and not os.access(os.path.dirname(os.path.abspath(export_path)), os.W_OK):
      raise UsageError(f"--export_path={export_path}: its folder does not exist or is not "
                       "writable; pass a path in an existing, writable folder")
    config, state = _reader_config(config, workdir, mode)
    exp = experiment.build(config)
    if mode == "likelihood":
      # local import: JAX and Flax load only past validation (fast --help and usage errors)
      from score_jax import likelihood_eval
      row = likelihood_eval.run(exp, state, workdir)
      if parallel.is_main_process():
        print(likelihood_eval.format_row(row))
        print(f"rows in {os.path.join(os.path.abspath(workdir), 'likelihood.jsonl')} and .csv")
    elif parallel.is_main_process():
      # local import: JAX and Flax load only past validation (fast --help and usage errors)
      from score_jax import export
      export.write(export_path, exp.config_json, state)
      print(f"exported step {int(state.step)} (EMA parameters and config) to "
            f"{os.path.abspath(export_path)}")
  elif mode == "sweep":
    runs = sweep_runs if sweep_runs is not None else _sweep_runs(config, workdir)
    for i, (overrides, sub_config, sub) in enumerate(runs):
      if parallel.is_main_process():
        print(f"[sweep {i + 1}/{len(runs)}] {overrides} -> {sub}")
      run(sub_config, sub, "train")


def _sweep_runs(config, workdir: str) -> list[tuple[dict, object, str]]:
  """`(overrides, config, workdir)` of each run of the config file's `get_sweep()`, validated."""
  runs = []
  for i, overrides in enumerate(_load_sweep(config_flags.get_config_filename(FLAGS["config"]))):
    sub = paths.join(workdir, f"sweep_{i:03d}_" + "_".join(
        f"{k.split('.')[-1]}={v}" for k, v in overrides.items()).replace("/", "-"))
    sub_config = _apply_overrides(config, overrides)
    validate(sub_config, "sweep", FLAGS.num_devices)
    runs.append((overrides, sub_config, sub))
  return runs


def _shipped_configs(argv: list[str]) -> list[str]:
  """`--config=configs/NAME.py[:arg]` names the shipped config NAME.py when no such file is
  under the current directory, so an installed package takes the commands of a checkout."""
  out = []
  for arg in argv:
    if arg.startswith("--config=configs/"):
      path, sep, rest = arg[len("--config="):].partition(":")
      shipped = score_jax.configs_dir() / path[len("configs/"):]
      if not os.path.exists(path) and shipped.is_file():
        arg = f"--config={shipped}{sep}{rest}"
    out.append(arg)
  return out


def _initialize_distributed(config) -> None:
  """Joins the multi-host job the flags (or `training.distributed`) ask for, before any work."""
  given = {name: FLAGS[name].value for name in ("coordinator_address", "num_processes",
                                                 "process_id")}
  if any(v is not None for v in given.values()):
    missing = [f"--{name}" for name, v in given.items() if v is None]
    if missing:
      raise UsageError(f"multi-host: {', '.join(missing)} missing; pass --coordinator_address, "
                       "--num_processes and --process_id together (or none, with --distributed)")
    if given["num_processes"] < 1 or not 0 <= given["process_id"] < given["num_processes"]:
      raise UsageError(f"--process_id={given['process_id']} must be in 0..num_processes-1 with "
                       f"--num_processes={given['num_processes']} >= 1")
  elif not (FLAGS.distributed or config.training.distributed):
    if FLAGS.local_device_ids:
      raise UsageError("--local_device_ids is for multi-host runs: add --distributed or "
                       "--coordinator_address/--num_processes/--process_id")
    return
  try:
    device_ids = [int(d) for d in FLAGS.local_device_ids] if FLAGS.local_device_ids else None
  except ValueError:
    raise UsageError(f"--local_device_ids={','.join(FLAGS.local_device_ids)} must be "
                     "comma-separated integers") from None
  # local import: JAX and Flax load only past validation (fast --help and usage errors)
  from score_jax import parallel
  parallel.initialize_distributed(**given, local_device_ids=device_ids)


# Errors of the storage under the workdir: what they mean for the user, and the exit status
# (1: the machine's fault, rerun once fixed; 2: the chosen path cannot be written).
_STORAGE_ERRORS = {
    errno.ENOSPC: ("No space left on device", 1, "the disk of {path} is full; free space there "
                   "or move --workdir to a bigger disk and rerun the same command (training "
                   "resumes from the newest complete checkpoint)"),
    errno.EDQUOT: ("Disk quota exceeded", 1, "the disk quota of {path} is exhausted; free space "
                   "or move --workdir elsewhere and rerun the same command (training resumes "
                   "from the newest complete checkpoint)"),
    errno.EROFS: ("Read-only file system", 2, "{path} is on a read-only file system; pick a "
                  "writable --workdir (or copy the run there) and rerun"),
    errno.EACCES: ("Permission denied", 2, "permission denied on {path}; fix its "
                   "permissions or pick a --workdir you can write to, and rerun"),
    errno.EPERM: ("Operation not permitted", 2, "operation not permitted on {path}; fix its "
                  "permissions or pick a --workdir you can write to, and rerun"),
}


class _StorageErrorLogFilter(std_logging.Filter):
  """Drops log records of the storage errors above: Orbax logs each failing writer thread's
  traceback, then re-raises the error in the main thread, where `main` reports it in one line."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += str(record.exc_info[1])
    return not any(phrase in text for phrase, _, _ in _STORAGE_ERRORS.values())


def _storage_error(e: BaseException, workdir: str) -> tuple[str, int] | None:
  """`(one line, exit status)` for a full disk, a read-only or a forbidden path, else None.

  The error may come wrapped: Orbax re-raises its writer threads' failures, and TensorStore
  reports file errors as ValueErrors whose text carries the OS message and the quoted path.
  """
  todo, seen = [e], set()
  while todo:
    err = todo.pop()
    if err is None or id(err) in seen:
      continue
    seen.add(id(err))
    todo += [err.__cause__, err.__context__, *getattr(err, "exceptions", ())]
    text = str(err)
    for code, (phrase, status, fix) in _STORAGE_ERRORS.items():
      if getattr(err, "errno", None) == code or phrase in text:
        quoted = re.search(r'"(/[^"]+)"', text)
        path = (getattr(err, "filename", None) or (quoted.group(1) if quoted else None)
                or os.path.abspath(workdir))
        return fix.format(path=path), status
  return None


def _report_storage_error(e: BaseException, workdir: str) -> int:
  """Prints the one line of a storage error and returns its exit status; re-raises others."""
  storage = _storage_error(e, workdir)
  if storage is None:
    raise e
  print(f"error: {storage[0]}", file=sys.stderr)
  return storage[1]


def main(argv: list[str] | None = None) -> int:
  """The command line (`python main.py`, `score-jax`, `python -m score_jax`); returns the exit
  status. `argv` defaults to `sys.argv`."""
  argv = _shipped_configs(sys.argv if argv is None else argv)
  if any(key.startswith("model.") for key in _cli_override_keys(argv)):
    # local import: JAX and Flax load only past validation (fast --help and usage errors)
    from score_jax import stored_config
    moved = stored_config.moved_flag_error(argv, config_schema.FIELDS)
    if moved:
      print(f"error: {moved}", file=sys.stderr)
      return 2
  if _CONFIG_FLAG_ERROR is not None:
    unknown = [k for k in _cli_override_keys(argv) if k not in config_schema.FIELDS]
    what = (f"--config.{unknown[0]} is not a config field (the fields are in configs/default.py)"
            if unknown else f"--config: {' '.join(str(_CONFIG_FLAG_ERROR).split())}")
    print(f"error: {what}", file=sys.stderr)
    return 2
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
  logging.get_absl_handler().addFilter(_StorageErrorLogFilter())
  try:
    config = FLAGS.config
    config.get("name")
  except Exception as e:  # config_flags defers file errors to the first access.
    print(f"error: --config: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  workdir = FLAGS.workdir or _default_workdir()
  mode = FLAGS.mode
  try:
    _initialize_distributed(config)
    sweep_runs = None
    if mode == "sweep":
      sweep_runs = _sweep_runs(config, workdir)
    elif mode == "train" or FLAGS["config"].present:
      validate(config, mode, FLAGS.num_devices)
    if mode in _READER_MODES:
      _check_run_dir(workdir)
    _check_workdir(workdir, mode)
  except (UsageError, workdir_lock.WorkdirLockedError, workdir_lock.LockFileError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except OSError as e:
    return _report_storage_error(e, workdir)
  # The library (Flax, Orbax, TFDS, the models) is imported once the command is known to be
  # valid, so a usage error costs only the imports its own check needs.
  # local import: JAX and Flax load only past validation (fast --help and usage errors)
  from score_jax import checkpoint, export, sampling, train
  try:
    run(config, workdir, mode, sweep_runs=sweep_runs)
  except (UsageError, checkpoint.CheckpointError, workdir_lock.WorkdirLockedError,
          workdir_lock.LockFileError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except train.Preempted as e:
    print(e, file=sys.stderr)
    return 0
  except (train.TrainingError, sampling.NonFiniteSamplesError, export.ExportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Exception as e:
    return _report_storage_error(e, workdir)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
