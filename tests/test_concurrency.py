"""Readers during training, a second trainer: the trainer's result stays bit-identical."""

import os
import pathlib
import subprocess
import sys
import threading

import jax
import numpy as np
from conftest import xla_flags

from configs import test as test_config
from score_jax import checkpoint, experiment, train, workdir_lock

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(*args) -> subprocess.Popen:
  env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
  env.pop("SCORE_JAX_DEBUG", None)
  return subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _tree(root: pathlib.Path) -> list:
  return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_readers_and_a_second_trainer_leave_training_bit_identical(tmp_path):
  config = test_config.get_config()
  config.training.num_train_steps = 60
  config.training.eval_every_steps = None
  config.training.async_checkpoint = True
  undisturbed, disturbed = tmp_path / "undisturbed", tmp_path / "disturbed"
  want = jax.device_get(train.train_and_evaluate(config, str(undisturbed)))

  # A second trainer on a locked workdir: refused in one line, exit 2, nothing touched.
  lock = workdir_lock.WorkdirLock(str(undisturbed), holder="test").acquire()
  before = _tree(undisturbed)
  second = _main("--config=configs/test.py", f"--workdir={undisturbed}")

  # A notebook polling load_checkpoint, and one `--mode=sample` run, while training writes.
  loads, errors, stop = [], [], threading.Event()
  sampler: list[subprocess.Popen] = []

  def poll():
    while not stop.is_set():
      try:
        _, state = experiment.load_checkpoint(str(disturbed))
        loads.append(int(jax.device_get(state.step)))
      except checkpoint.CheckpointError as e:
        if "no checkpoint" not in str(e):
          errors.append(e)
      if loads and not sampler:
        # A save in flight that no reader may remove (the trainer never writes this step).
        (disturbed / "checkpoints" / "100000.orbax-checkpoint-tmp-1" / "state").mkdir(parents=True)
        sampler.append(_main("--mode=sample", f"--workdir={disturbed}",
                             "--config.sampling.num_samples=8", "--config.sampling.batch_size=8"))

  poller = threading.Thread(target=poll)
  poller.start()
  try:
    got = jax.device_get(train.train_and_evaluate(config, str(disturbed)))
  finally:
    stop.set()
    poller.join()
  assert not errors and loads, (errors, loads)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)

  out, err = sampler[0].communicate(timeout=300)
  assert sampler[0].returncode == 0, err
  assert (disturbed / "checkpoints" / "100000.orbax-checkpoint-tmp-1" / "state").is_dir()

  out, err = second.communicate(timeout=300)
  assert _tree(undisturbed) == before
  lock.release()
  lines = [l for l in err.splitlines() if l.strip()]
  assert second.returncode == 2 and len(lines) == 1, err[-2000:]
  assert "is in use by test (pid" in lines[0]
