"""Readers during training, a second trainer: the trainer's result stays bit-identical."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S, xla_flags

from configs import test as test_config
from score_jax import train, workdir_lock

REPO = pathlib.Path(__file__).resolve().parents[1]

# A notebook in another process: polls load_checkpoint until told to stop; after its first load it
# starts one `--mode=sample` run on the same workdir.
_POLLER = textwrap.dedent("""
    import os, subprocess, sys
    workdir, stop, in_flight = sys.argv[1:4]
    from score_jax import checkpoint, experiment
    print("ready", flush=True)
    loads, sampler = [], None
    while not os.path.exists(stop):
      try:
        loads.append(int(experiment.load_checkpoint(workdir)[1].step))
      except checkpoint.CheckpointError as e:
        if "no checkpoint" not in str(e):
          sys.exit(f"reader failed: {e}")
      if loads and sampler is None:
        os.makedirs(in_flight)
        sampler = subprocess.Popen(
            [sys.executable, "main.py", "--mode=sample", f"--workdir={workdir}",
             "--config.sampling.num_samples=8", "--config.sampling.batch_size=8"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = sampler.communicate()
    print("loads", len(loads), "sample_exit", sampler.returncode, flush=True)
    print(err[-2000:], file=sys.stderr)
    """)


def _env(devices: int) -> dict:
  env = {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu"}
  env.pop("SCORE_JAX_DEBUG", None)
  return env


def _tree(root: pathlib.Path) -> list:
  return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.e2e
def test_readers_and_a_second_trainer_leave_training_bit_identical(tmp_path):
  config = test_config.get_config()
  config.training.num_train_steps = 100
  config.training.eval_every_steps = None
  config.training.async_checkpoint = True
  undisturbed, disturbed = tmp_path / "undisturbed", tmp_path / "disturbed"
  want = jax.device_get(train.train_and_evaluate(config, str(undisturbed)))

  # A second trainer on a locked workdir: refused in one line, exit 2, nothing touched.
  lock = workdir_lock.WorkdirLock(str(undisturbed), holder="test").acquire()
  before = _tree(undisturbed)
  second = subprocess.Popen([sys.executable, "main.py", "--config=configs/test.py",
                             f"--workdir={undisturbed}"], cwd=REPO, env=_env(8),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  # A save in flight that no reader may remove (the trainer never writes this step).
  in_flight = disturbed / "checkpoints" / "100000.orbax-checkpoint-tmp-1"
  stop = tmp_path / "stop"
  poller = subprocess.Popen([sys.executable, "-c", _POLLER, str(disturbed), str(stop),
                             str(in_flight)], cwd=REPO, env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  assert poller.stdout.readline().strip() == "ready"
  try:
    got = jax.device_get(train.train_and_evaluate(config, str(disturbed)))
  finally:
    stop.touch()
  out, err = poller.communicate(timeout=HANG_TIMEOUT_S)
  assert poller.returncode == 0, err[-2000:]
  words = out.split()
  assert int(words[words.index("loads") + 1]) > 0, out
  assert words[words.index("sample_exit") + 1] == "0", err[-2000:]
  assert in_flight.is_dir()
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)

  out, err = second.communicate(timeout=HANG_TIMEOUT_S)
  assert _tree(undisturbed) == before
  lock.release()
  lines = [l for l in err.splitlines() if l.strip()]
  assert second.returncode == 2 and len(lines) == 1, err[-2000:]
  assert "is in use by test (pid" in lines[0]
