"""Readers during training, a second trainer: the trainer's result stays bit-identical."""

import json
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
from score_jax import experiment, train, workdir_lock

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
  want = jax.device_get(train.train_and_evaluate(experiment.build(config), str(undisturbed)))

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
    got = jax.device_get(train.train_and_evaluate(experiment.build(config), str(disturbed)))
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


# A notebook polling the newest checkpoint `target` times; every poll must return a step. It
# prints "first" after its first load (so the test starts the evaluation then), then a summary.
_ROTATION_POLLER = textwrap.dedent("""
    import json, sys, traceback
    workdir, target = sys.argv[1], int(sys.argv[2])
    import score_jax
    from score_jax import checkpoint
    steps, errors = [], []
    while len(steps) + len(errors) < target:
      try:
        steps.append(int(score_jax.load_checkpoint(workdir)[1].step))
        if len(steps) == 1:
          print("first", flush=True)
      except checkpoint.CheckpointError as e:
        if steps or errors or "no checkpoint" not in str(e):  # before the first save: wait
          errors.append(repr(e))
      except Exception as e:
        errors.append(traceback.format_exc())
    if not steps:
      print("first", flush=True)
    print(json.dumps({"steps": steps, "errors": errors}), flush=True)
    """)


def _start(args: list[str], log: pathlib.Path, devices: int = 1) -> subprocess.Popen:
  """`python *args` in the repository root; stderr to `log` (a pipe nobody reads could fill)."""
  with open(log, "w") as err:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=err, text=True)


@pytest.mark.e2e
def test_readers_survive_the_writers_rotation(tmp_path):
  workdir = tmp_path / "run"
  trainer = _start(["main.py", "--config=configs/test.py", f"--workdir={workdir}",
                    "--config.training.num_train_steps=100000000",
                    "--config.training.ckpt_every_steps=1", "--config.training.log_every_steps=1",
                    "--config.training.eval_every_steps=1000",
                    "--config.training.keep_checkpoints=3",
                    "--config.training.async_checkpoint=True"], tmp_path / "trainer.err")
  polls = 200
  poller = _start(["-c", _ROTATION_POLLER, str(workdir), str(polls)], tmp_path / "poller.err")
  evaluation = None
  try:
    assert poller.stdout.readline().strip() == "first"
    # An evaluation of every checkpoint, most of which the trainer rotates away meanwhile.
    evaluation = _start(["main.py", "--mode=eval", f"--workdir={workdir}",
                         "--config.eval.num_samples=64", "--config.eval.batch_size=64"],
                        tmp_path / "eval.err")
    out, _ = poller.communicate(timeout=1200)
    eval_out, _ = evaluation.communicate(timeout=1200)
    # The trainer was writing throughout.
    assert trainer.poll() is None, (tmp_path / "trainer.err").read_text()[-2000:]
  finally:
    for proc in (trainer, poller, evaluation):
      if proc is not None and proc.poll() is None:
        proc.kill()
        proc.communicate()
  summary = json.loads(out.splitlines()[-1])
  assert summary["errors"] == [], summary["errors"][:3]
  assert len(summary["steps"]) == polls
  # The polls saw more steps than the writer keeps: its rotation ran while they read.
  assert len(set(summary["steps"])) > 3, sorted(set(summary["steps"]))
  err = (tmp_path / "poller.err").read_text()
  assert "warning:" not in err, err[-2000:]
  eval_err = (tmp_path / "eval.err").read_text()
  eval_lines = [l for l in eval_err.splitlines() if l.startswith(("error", "warning", "Traceback"))]
  if evaluation.returncode == 0:
    assert eval_lines == [] and "best checkpoint" in eval_out, eval_err[-2000:]
  else:  # the trainer rotated every step away before its turn: one line saying so
    assert evaluation.returncode == 2 and len(eval_lines) == 1, eval_err[-2000:]
    assert "removed by the training run's rotation" in eval_lines[0]
