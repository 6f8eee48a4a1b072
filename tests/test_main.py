"""The command line end to end: train/resume/sample on the test config, sweeps, kill -9 resume.

Bad input is tested in test_bad_input.py."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S, main_env, start_main

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


_main = start_main


def _finish(proc: subprocess.Popen, timeout: float = HANG_TIMEOUT_S) -> tuple[int, str, str]:
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def _final_params(workdir: pathlib.Path) -> list[np.ndarray]:
  from score_jax import experiment
  import jax
  _, state = experiment.load_checkpoint(str(workdir))
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def test_train_writes_outputs_then_resumes_and_samples(tmp_path):
  workdir = tmp_path / "run"
  code, out, err = _finish(_main("--config=configs/test.py", f"--workdir={workdir}"))
  assert code == 0, err
  assert "mode_weights" in out
  # The output names what was written, and what the table measured.
  assert "64 samples per sampler, drawn over 8 device(s)" in out, out
  for written in ("samples/als_step20.npz", "samples/cas_step20.npz",
                  "samples/comparison_step20.png", "samples/trajectory_step20.png",
                  "samples/metrics_step20.json", "  metrics.jsonl", "sample_metrics.jsonl",
                  f"tensorboard --logdir {workdir}/tb"):
    assert written in out, (written, out)
  samples = sorted((workdir / "samples").glob("*.npz"))
  assert [p.name for p in samples] == ["als_step20.npz", "cas_step20.npz"]
  assert (workdir / "samples" / "comparison_step20.png").is_file()
  assert (workdir / "samples" / "trajectory_step20.png").is_file()
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [10, 20]
  assert len(records[0]["loss_per_level"]) == 4
  assert any(p.name.startswith("events") for p in (workdir / "tb" / "metrics").iterdir())
  sample_records = [json.loads(l) for l in (workdir / "sample_metrics.jsonl").read_text().splitlines()]
  from tensorboard.backend.event_processing import event_accumulator
  images = event_accumulator.EventAccumulator(str(workdir / "tb" / "sample_metrics"))
  images.Reload()
  assert {"samples/comparison", "samples/trajectory"} <= set(images.Tags()["images"])
  assert {r["method"] for r in sample_records} == {"als", "cas"}
  # Same command again: resumes at the end, trains nothing more, samples again.
  code, _, err = _finish(_main("--config=configs/test.py", f"--workdir={workdir}",
                               "--config.training.num_train_steps=30"))
  assert code == 0, err
  assert (workdir / "samples" / "als_step30.npz").is_file()
  code, _, err = _finish(_main("--mode=sample", f"--workdir={workdir}"))
  assert code == 0, err
  # Another model on this workdir: one line, exit 2, the run's files untouched.
  before = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
  code, _, err = _finish(_main("--config=configs/test.py", f"--workdir={workdir}",
                               "--config.model.mlp.hidden=16"))
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert code == 2 and len(lines) == 1 and "incompatible" in lines[0], err[-2000:]
  assert {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()} == before


def _wait_for(proc: subprocess.Popen, log: pathlib.Path, what: str, found,
              timeout: float = 600):
  """Polls `found()` until it returns a value and returns it; fails if the run ends first or
  `timeout` seconds pass (a bound against hangs)."""
  deadline = time.monotonic() + timeout
  while (value := found()) is None:
    assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text()[-2000:]}"
    assert time.monotonic() < deadline, f"no {what} within {timeout} s"
    time.sleep(0.002)
  return value


def _in_flight_save(checkpoints: pathlib.Path, min_step: int) -> int | None:
  """The step of a save being written (Orbax's `<step>.orbax-checkpoint-tmp-*`), if any."""
  try:
    names = [p.name for p in checkpoints.iterdir()]
  except FileNotFoundError:
    return None
  steps = [int(n.split(".")[0]) for n in names if ".orbax-checkpoint-tmp" in n]
  return next((s for s in steps if s >= min_step), None)


def _logged_step(metrics: pathlib.Path, min_step: int, every: int) -> int | None:
  """A logged step >= min_step that is no multiple of `every`, if metrics.jsonl has one."""
  try:
    lines = metrics.read_text().splitlines()
  except FileNotFoundError:
    return None
  for line in lines:
    try:
      step = json.loads(line).get("step")
    except ValueError:  # a row being written
      continue
    if isinstance(step, int) and step >= min_step and step % every:
      return step
  return None


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  """SIGKILL while a save is in flight, then again between saves; rerun: the same final
  parameters, bit for bit. The kills trigger on the run's own files, not on a clock."""
  args = ["--config=configs/test.py", "--config.training.num_train_steps=400",
          "--config.training.ckpt_every_steps=20", "--config.training.log_every_steps=10",
          "--config.training.async_checkpoint=True", "--config.sampling.num_samples=8",
          "--config.sampling.batch_size=8"]
  full = tmp_path / "full"
  code, _, err = _finish(_main(*args, f"--workdir={full}"))
  assert code == 0, err
  interrupted = tmp_path / "interrupted"
  log = tmp_path / "interrupted.log"
  env = dict(main_env(8), PYTHONUNBUFFERED="1")

  def start() -> subprocess.Popen:
    with open(log, "a") as out:
      return subprocess.Popen([sys.executable, str(REPO / "main.py"), *args,
                               f"--workdir={interrupted}"], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT)

  # First kill: while the save of step 60 or later is being written.
  proc = start()
  killed_at = _wait_for(proc, log, "an in-flight save",
                        lambda: _in_flight_save(interrupted / "checkpoints", 60))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert killed_at < 250, f"the first kill came only at step {killed_at}"
  # Second kill: the rerun has resumed and logged a step between two saves.
  proc = start()
  _wait_for(proc, log, "the resume", lambda: "resumed from checkpoint" in log.read_text() or None)
  _wait_for(proc, log, "a step logged between saves",
            lambda: _logged_step(interrupted / "metrics.jsonl", 250, 20))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  code, out, err = _finish(_main(*args, f"--workdir={interrupted}"))
  assert code == 0, err
  assert "resumed from checkpoint" in out, out
  for a, b in zip(_final_params(full), _final_params(interrupted)):
    np.testing.assert_array_equal(a, b)


def test_sweep_runs_each_override(tmp_path):
  code, out, err = _finish(_main("--config=configs/test.py", "--mode=sweep",
                                 f"--workdir={tmp_path}", "--config.training.num_train_steps=10"))
  assert code == 0, err
  subs = sorted(p.name for p in tmp_path.iterdir())
  assert len(subs) == 2 and all(s.startswith("sweep_") for s in subs)
  assert "sigma_max=10.0" in subs[0]
  for s in subs:
    assert (tmp_path / s / "checkpoints").is_dir()
