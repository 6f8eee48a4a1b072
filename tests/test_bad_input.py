"""Bad input: every bad config value or flag is one line on stderr, exit 2, and writes nothing.

Most cases call `cli.validate`, the function the command line runs before any work; a few run
`main.py` to show the whole path (flag parsing, exit status, untouched workdirs).
"""

import hashlib
import json
import pathlib
import subprocess

import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S, start_main

from configs import test as test_config
from score_jax import checkpoint, cli, experiment, stored_config
from score_jax.config_schema import UsageError

# (overrides of configs/test.py, mode, text the one-line error must contain)
BAD_CONFIGS = {
    # issue 16's list
    "keep_checkpoints 0": ({"training.keep_checkpoints": 0}, "train", "training.keep_checkpoints"),
    "negative lr": ({"optim.lr": -1.0}, "train", "optim.lr"),
    "no ema decays": ({"training.ema_decays": ()}, "train", "training.ema_decays"),
    "toy_dim 0": ({"data.toy_dim": 0}, "train", "data.toy_dim"),
    "float64": ({"model.dtype": "float64"}, "train", "model.dtype"),
    "unet image size": ({"data.dataset": "mnist", "data.num_channels": 1, "model.name": "unet",
                         "data.image_size": 28}, "train", "data.image_size=28"),
    "infeasible cas step": ({"sampling.cas.step_lr": 0.1}, "train", "sampling.cas.step_lr"),
    "bogus init": ({"sampling.init": "bogus"}, "train", "sampling.init"),
    "steps_per_sigma 0": ({"sampling.als.steps_per_sigma": 0}, "train",
                          "sampling.als.steps_per_sigma"),
    "n_sigma 0": ({"sampling.cas.n_sigma": 0}, "train", "sampling.cas.n_sigma"),
    # the sampler of every mode the run reaches
    "infeasible cas in sample": ({"sampling.method": "cas", "sampling.cas.step_lr": 3.0},
                                 "sample", "sampling.cas.step_lr"),
    "infeasible cas in eval": ({"sampling.method": "cas", "sampling.cas.step_lr": 0.01},
                               "eval", "sampling.cas.step_lr"),
    "cas after training": ({"sampling.methods": ("als", "cas"), "sampling.cas.step_lr": 2.0},
                           "train", "sampling.cas.step_lr"),
    # data
    "unknown dataset": ({"data.dataset": "imagenet"}, "train", "imagenet"),
    "folder without path": ({"data.dataset": "folder", "data.num_channels": 3,
                             "model.name": "ncsnv2"}, "train", "data.path"),
    "missing npz": ({"data.dataset": "npz", "data.path": "/nonexistent/x.npz",
                     "model.name": "ncsnv2"}, "train", "data.path"),
    "image net on toy": ({"model.name": "ncsnv2"}, "train", "model.name"),
    "mlp on images": ({"data.dataset": "mnist", "data.num_channels": 1, "data.image_size": 28},
                      "train", "model.name='mlp'"),
    "image too small": ({"data.dataset": "mnist", "data.num_channels": 1, "data.image_size": 2,
                         "model.name": "ncsnv2"}, "train", "data.image_size"),
    "two dequantizations": ({"data.uniform_dequantization": True,
                             "data.gaussian_dequantization": True, "data.dataset": "mnist",
                             "data.num_channels": 1, "data.image_size": 28,
                             "model.name": "ncsnv2"}, "train", "dequantization"),
    "negative workers": ({"data.num_workers": -1}, "train", "data.num_workers"),
    # noise
    "sigma_max < sigma_min": ({"noise.sigma_max": 0.5}, "train", "noise.sigma_max"),
    "sigma_min 0": ({"noise.sigma_min": 0.0}, "train", "noise.sigma_min"),
    "one scale": ({"noise.num_scales": 1}, "train", "noise.num_scales"),
    "unknown schedule": ({"noise.schedule": "cosine"}, "train", "noise.schedule"),
    "unknown level sampling": ({"noise.level_sampling": "sobol"}, "train", "noise.level_sampling"),
    "nan weight power": ({"noise.weight_power": float("nan")}, "train", "noise.weight_power"),
    # optim
    "unknown optimizer": ({"optim.optimizer": "sgd"}, "train", "optim.optimizer"),
    "beta2 1": ({"optim.beta2": 1.0}, "train", "optim.beta2"),
    "eps 0": ({"optim.eps": 0.0}, "train", "optim.eps"),
    "negative warmup": ({"optim.warmup_steps": -5}, "train", "optim.warmup_steps"),
    "grad clip 0": ({"optim.grad_clip": 0.0}, "train", "optim.grad_clip"),
    "weight decay with adam": ({"optim.weight_decay": 0.1}, "train", "optim.weight_decay"),
    "infinite lr": ({"optim.lr": float("inf")}, "train", "optim.lr"),
    # training
    "batch not divisible": ({"training.batch_size": 12}, "train", "multiple of the 8 devices"),
    "batch 0": ({"training.batch_size": 0}, "train", "training.batch_size"),
    "no steps": ({"training.num_train_steps": 0}, "train", "training.num_train_steps"),
    "log every 0": ({"training.log_every_steps": 0}, "train", "training.log_every_steps"),
    "ckpt every 0": ({"training.ckpt_every_steps": 0}, "train", "training.ckpt_every_steps"),
    "dispatch 0": ({"training.steps_per_dispatch": 0}, "train", "training.steps_per_dispatch"),
    "ema decay 1": ({"training.ema_decays": (0.999, 1.0)}, "train", "training.ema_decays"),
    "unknown loss": ({"training.loss": "nce"}, "train", "training.loss"),
    "ssm projections 0": ({"training.ssm_num_projections": 0}, "train",
                          "training.ssm_num_projections"),
    # sampling
    "unknown method": ({"sampling.method": "ddpm"}, "sample", "sampling.method"),
    "unknown method after training": ({"sampling.methods": ("als", "ald")}, "train",
                                      "sampling.methods"),
    "no methods": ({"sampling.methods": ()}, "train", "sampling.methods"),
    "als step_lr 0": ({"sampling.als.step_lr": 0.0}, "train", "sampling.als.step_lr"),
    "negative snr": ({"sampling.method": "pc", "sampling.pc.snr": -0.1}, "sample",
                     "sampling.pc.snr"),
    "num_samples 0": ({"sampling.num_samples": 0}, "train", "sampling.num_samples"),
    "save every too large": ({"sampling.save_every_levels": 9}, "train",
                             "sampling.save_every_levels"),
    # adversarial
    "adversarial ssm": ({"adversarial.enabled": True, "adversarial.d_arch": "mlp",
                         "training.loss": "ssm"}, "train", "training.loss"),
    "adversarial toy biggan": ({"adversarial.enabled": True}, "train", "adversarial.d_arch"),
    "d_steps 0": ({"adversarial.d_steps": 0}, "train", "adversarial.d_steps"),
    "unknown gan loss": ({"adversarial.gan_loss": "lsgan2"}, "train", "adversarial.gan_loss"),
    # eval
    "unknown features": ({"eval.features": "clip"}, "eval", "eval.features"),
    "features do not fit": ({"eval.features": "inception"}, "eval", "eval.features"),
    "unknown sweep sampler": ({"eval.sweep_methods": ("als", "ald")}, "sampler_sweep",
                              "eval.sweep_methods"),
    "eval batch 0": ({"eval.batch_size": 0}, "eval", "eval.batch_size"),
    # issue 29: values in range whose combination or size reached a traceback
    "adaptive rel_tol 0": ({"sampling.method": "adaptive", "sampling.adaptive.rel_tol": 0.0},
                           "sample", "sampling.adaptive.rel_tol"),
    "sweep rel_tol 0": ({"eval.sweep_rel_tols": (0.0, 0.1)}, "sampler_sweep",
                        "eval.sweep_rel_tols"),
    "heun s_tmin > s_tmax": ({"sampling.method": "heun", "sampling.heun.s_tmin": 5.0,
                              "sampling.heun.s_tmax": 1.0}, "sample",
                             "sampling.heun: s_tmin=5.0 must be <= s_tmax=1.0"),
    "euler s_tmin > s_tmax after training": ({"sampling.methods": ("als", "euler"),
                                              "sampling.euler.s_tmin": 2.0,
                                              "sampling.euler.s_tmax": 1.0}, "train",
                                             "sampling.euler: s_tmin=2.0"),
    "seed 2**70": ({"seed": 2 ** 70}, "train", "seed=1180591620717411303424 does not fit"),
    "toy_dim 1e9": ({"data.dataset": "gaussian", "data.toy_dim": 10 ** 9}, "train",
                    "training.batch_size=64: a training batch of shape (1000000000,)"),
    "num_samples 1e12": ({"sampling.num_samples": 10 ** 12}, "sample", "sampling.num_samples="),
    "eval batch 1e12": ({"eval.batch_size": 10 ** 12}, "eval", "eval.batch_size="),
}


def _config(overrides: dict):
  return cli._apply_overrides(test_config.get_config(), overrides)


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_is_a_one_line_usage_error(name):
  overrides, mode, expected = BAD_CONFIGS[name]
  with pytest.raises(UsageError) as info:
    cli.validate(_config(overrides), mode)
  message = str(info.value)
  assert "\n" not in message and expected in message, message


def test_every_config_field_has_a_schema_entry():
  from score_jax import config_schema
  assert set(config_schema.leaves(test_config.get_config())) == set(config_schema.FIELDS)


def test_good_config_passes_every_mode():
  for mode in ("train", "sample", "eval", "sampler_sweep", "sweep"):
    cli.validate(test_config.get_config(), mode)


def test_override_of_no_field_or_wrong_type_is_a_usage_error():
  with pytest.raises(UsageError, match="names no config field"):
    _config({"sampling.als.stepsize": 0.1})
  with pytest.raises(UsageError, match="names no config field"):
    _config({"sampling.ald.step_lr": 0.1})
  with pytest.raises(UsageError, match="training.batch_size"):
    _config({"training.batch_size": "abc"})


def test_override_of_an_old_flat_model_field_names_its_new_place():
  with pytest.raises(UsageError, match=r"'model.hidden' names no config field; it is now "
                     r"model.mlp.hidden$"):
    _config({"model.hidden": 16})
  with pytest.raises(UsageError, match=r"it is now model.ncsn.ngf \(model.unet.ch for the UNet"):
    _config({"model.ngf": 16})


def test_incompatible_checkpoint_names_the_field():
  stored = json.loads(test_config.get_config().to_json())
  config = _config({"model.mlp.hidden": 16})
  with pytest.raises(checkpoint.CheckpointError, match="incompatible run.*model"):
    stored_config.check_compatible(stored, config, "runs/x")


def _tree_digest(root: pathlib.Path) -> str:
  digest = hashlib.sha256()
  for path in sorted(root.rglob("*")):
    digest.update(str(path.relative_to(root)).encode())
    if path.is_file():
      digest.update(path.read_bytes())
  return digest.hexdigest()


def test_command_line_rejects_bad_input_in_one_line_and_writes_nothing(tmp_path):
  existing = tmp_path / "existing"
  (existing / "checkpoints" / "10").mkdir(parents=True)
  (existing / "checkpoints" / "10" / "state").write_bytes(b"\x00" * 64)
  (existing / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
  before = _tree_digest(existing)
  cases = {
      "unknown config file": (["--config=configs/nope.py"], "nope.py"),
      "wrong type": (["--config=configs/test.py", "--config.training.batch_size=abc"],
                     "batch_size"),
      "old flat model field": (["--config=configs/test.py", "--config.model.num_layers=4"],
                               ("--config.model.num_layers is not a config field; it is now "
                                "--config.model.mlp.num_layers")),
      "unknown field without a config file": (["--config.training.nope=4"],
                                              "--config.training.nope is not a config field"),
      "old flat model field without a config file": (["--config.model.ngf=4"],
                                                     "it is now --config.model.ncsn.ngf"),
      "schema on existing workdir": (["--config=configs/test.py", f"--workdir={existing}",
                                      "--config.training.keep_checkpoints=0"],
                                     "training.keep_checkpoints"),
      "sample without a run": (["--mode=sample"], "holds no checkpoints"),
      "unwritable workdir": (["--config=configs/test.py", "--workdir=/proc/score_jax_run"],
                             "not a writable directory"),
      "seed out of range on existing workdir": (["--config=configs/test.py",
                                                 f"--workdir={existing}",
                                                 "--config.seed=1180591620717411303424"],
                                                "does not fit a 64-bit integer"),
      "absurd toy_dim": (["--config=configs/test.py", "--config.data.dataset=gaussian",
                          "--config.data.toy_dim=1000000000"], "GiB of memory"),
      "heun churn window": (["--config=configs/test.py", "--config.sampling.methods=('als','heun')",
                             "--config.sampling.heun.s_tmin=5.0",
                             "--config.sampling.heun.s_tmax=1.0"],
                            "s_tmin=5.0 must be <= s_tmax=1.0"),
      "adaptive rel_tol 0": (["--config=configs/test.py", "--config.sampling.methods=('adaptive',)",
                              "--config.sampling.adaptive.rel_tol=0.0"],
                             "sampling.adaptive.rel_tol=0.0 must be > 0.0"),
  }
  procs = {}
  for name, (args, _) in cases.items():
    if not any(a.startswith("--workdir") for a in args):
      args = args + [f"--workdir={tmp_path / name.replace(' ', '_')}"]
    procs[name] = start_main(*args, devices=8)
  for name, proc in procs.items():
    try:
      _, err = proc.communicate(timeout=HANG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      raise
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{name}: {err[-2000:]}"
    assert cases[name][1] in lines[0], f"{name}: {lines[0]}"
    assert not (tmp_path / name.replace(" ", "_")).exists(), f"{name} wrote its workdir"
  assert _tree_digest(existing) == before


def test_eval_num_samples_beyond_the_reference_split_is_refused_before_work(tmp_path):
  from PIL import Image
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(5):
    Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
  config = _config({"data.dataset": "folder", "data.path": str(folder), "data.num_channels": 3,
                    "data.image_size": 32, "model.name": "ncsnv2", "eval.features": "inception",
                    "eval.num_samples": 10, "sampling.method": "als"})
  with pytest.raises(UsageError, match=r"eval.num_samples=10 exceeds the 5 images of folder/"):
    cli.validate(config, "eval")
  config.eval.reference_num_images = 4
  cli.validate(config, "eval")


def test_non_finite_ema_workdir_is_refused_by_likelihood_and_export(tmp_path, monkeypatch):
  """One line, exit 2, the workdir unchanged."""
  import jax
  import jax.numpy as jnp

  from score_jax import models
  config = test_config.get_config()
  state = experiment.init_state(config, models.build(config))
  nan = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), state.params)
  state = state.replace(step=jnp.int32(5), ema_params=(nan,))
  workdir = tmp_path / "run"
  # Written as a version that saved without its non-finite check would have (digest included).
  monkeypatch.setattr(checkpoint, "nonfinite_leaves", lambda tree: [])
  manager = checkpoint.create_writer(str(workdir), async_save=False)
  checkpoint.save(manager, 5, state, data_state={"kind": "toy", "step": 5},
                  config_json=config.to_json())
  checkpoint.wait(manager)
  manager.close()
  monkeypatch.undo()
  before = _tree_digest(workdir)
  # A non-finite state on disk is a damaged checkpoint (its digest notwithstanding): readers
  # refuse it, naming why, before any work.
  cases = {"likelihood": ([], "it holds non-finite values"),
           "export": ([f"--export_path={tmp_path / 'model.msgpack'}"],
                      "it holds non-finite values")}
  for mode, (extra, expect) in cases.items():
    proc = start_main(f"--mode={mode}", f"--workdir={workdir}", *extra, devices=8)
    try:
      _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      proc.kill()
      raise
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, f"{mode}: exit {proc.returncode}\n{err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], err[-2000:]
  assert not (tmp_path / "model.msgpack").exists()
  assert _tree_digest(workdir) == before


def test_sampler_hints_name_only_fields_the_schema_has():
  import re

  from score_jax import config_schema
  for method in config_schema.FIELDS["sampling.method"].choices:
    hint = config_schema.sampler_fix_hint(method)
    named = re.findall(r"sampling\.[a-z_0-9.]*[a-z_0-9*]", hint)
    assert named and all(n in config_schema.FIELDS or n.endswith(".*") for n in named), hint


def test_storage_errors_are_one_line_naming_the_path():
  # TensorStore reports a full disk as a ValueError whose text holds the OS message and the
  # quoted path; Orbax re-raises it from its writer thread.
  try:
    try:
      raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "/runs/a/checkpoints/40.orbax-'
                       'checkpoint-tmp/state/_sharding": Failed to write 5917 bytes to file 13: '
                       'No space left on device [OS error 28]')
    except ValueError as inner:
      raise RuntimeError("async save failed") from inner
  except RuntimeError as e:
    line, status = cli._storage_error(e, "runs/a")
  assert status == 1 and "the disk of /runs/a/checkpoints/40.orbax-checkpoint-tmp" in line
  assert "rerun the same command" in line
  line, status = cli._storage_error(OSError(30, "Read-only file system", "/ro/run/train.lock"),
                                    "/ro/run")
  assert status == 2 and line.startswith("/ro/run/train.lock is on a read-only file system")
  line, status = cli._storage_error(PermissionError(13, "Permission denied"), "/srv/run")
  assert status == 2 and "permission denied on /srv/run;" in line
  assert cli._storage_error(ValueError("bad shape"), "/srv/run") is None
  # Orbax's log record of the failing writer thread is dropped; other records pass.
  import logging
  drop = cli._StorageErrorLogFilter()
  record = logging.LogRecord("absl", logging.ERROR, "future.py", 387, "thread raised: %s",
                             ("Failed writing: No space left on device",), None)
  assert not drop.filter(record)
  record = logging.LogRecord("absl", logging.ERROR, "x.py", 1, "something else", (), None)
  assert drop.filter(record)


@pytest.fixture
def small_disk(tmp_path):
  """A 400 KiB tmpfs: room for a few checkpoints of configs/test.py, then a full disk."""
  mount = tmp_path / "disk"
  mount.mkdir()
  made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
                        capture_output=True, text=True, check=False)
  if made.returncode:
    pytest.skip(f"cannot mount a small tmpfs here (needs root: {made.stderr.strip()}); the "
                "mapping itself is tested by test_storage_errors_are_one_line_naming_the_path")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _remount(mount: pathlib.Path, options: str) -> None:
  subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


@pytest.mark.e2e
def test_full_disk_and_read_only_workdir_are_one_line_and_lose_nothing(small_disk):
  from conftest import run_main
  workdir = small_disk / "run"
  command = ("--config=configs/test.py", f"--workdir={workdir}",
             "--config.training.num_train_steps=60", "--config.training.eval_every_steps=60")

  def one_line(result, status):
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode == status and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ")
    return lines[0]

  line = one_line(run_main(*command, devices=1, timeout=900), 1)
  assert f"the disk of {workdir}" in line and "is full" in line
  complete = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert complete, "the disk filled before the first checkpoint"
  # Read-only: refused in one line before anything is tried, the workdir unchanged.
  before = _tree_digest(workdir)
  _remount(small_disk, "ro")
  line = one_line(run_main(*command, devices=1, timeout=900), 2)
  assert f"{workdir}/train.lock is on a read-only file system" in line
  assert _tree_digest(workdir) == before
  # Space again: the same command resumes from the newest complete checkpoint and finishes.
  _remount(small_disk, "rw,size=32m")
  result = run_main(*command, devices=1, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from checkpoint {complete[-1]} " in result.stdout
  _, state = experiment.load_checkpoint(str(workdir))
  assert int(state.step) == 60
