"""Multi-host training with real processes (`score_jax.launch`, `jax.distributed` over 127.0.0.1).

Each job is compared with one process of the same total device count: the same trained
parameters, metrics rows written once, resumption across layouts, a refused writer lock, a
process killed with SIGKILL, and SIGTERM (preemption). Kills trigger on events (a checkpoint
directory appearing), and timeouts only bound hangs. Run with `pytest -m multihost`.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, main_env, run_main
from score_jax import launch

pytestmark = pytest.mark.multihost

TIMEOUT = 900  # bounds a hang; never a speed expectation
# configs/test.py with one cheap sampler after training.
BASE = ("--config=configs/test.py", "--config.sampling.methods=('cas',)",
        "--config.sampling.num_samples=16", "--config.sampling.batch_size=16")


def _launch(num_processes: int, devices: int, *args: str, env: dict | None = None
            ) -> subprocess.Popen:
  env = dict(main_env(), PYTHONPATH=str(REPO), **(env or {}))
  return subprocess.Popen(
      [sys.executable, "-m", "score_jax.launch", f"--num_processes={num_processes}",
       f"--devices_per_process={devices}", "--", *BASE, *args],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_launch(num_processes: int, devices: int, *args: str, env: dict | None = None
                ) -> subprocess.CompletedProcess:
  proc = _launch(num_processes, devices, *args, env=env)
  try:
    out, err = proc.communicate(timeout=TIMEOUT)
  finally:
    proc.kill()
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run_one(*args: str) -> subprocess.CompletedProcess:
  return run_main(*BASE, *args, devices=8, timeout=TIMEOUT)


def _params(workdir) -> list[np.ndarray]:
  from score_jax import experiment
  _, state = experiment.load_checkpoint(str(workdir))
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(
      (state.params, state.ema_params)))] + [np.asarray(jax.device_get(state.step))]


def _assert_same_params(a, b, rtol=1e-4):
  pa, pb = _params(a), _params(b)
  assert pa[-1] == pb[-1], f"steps {pa[-1]} vs {pb[-1]}"
  for x, y in zip(pa, pb):
    assert np.abs(x - y).max() <= rtol * max(np.abs(y).max(), 1e-12), (x, y)


def _rows(workdir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
          .splitlines()]


def _train_rows(workdir) -> list[tuple[int, float]]:
  return [(r["step"], r["loss"]) for r in _rows(workdir) if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One process with 8 devices, trained the full 20 steps of configs/test.py."""
  workdir = tmp_path_factory.mktemp("ref") / "run"
  r = _run_one(f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr
  return workdir


def _wait_for(path: pathlib.Path, procs) -> None:
  """Waits until `path` exists (the event a kill test triggers on), or fails when the job ends."""
  while not path.exists():
    if all(p.poll() is not None for p in procs):
      raise AssertionError(f"the job ended before {path} appeared")
    time.sleep(0.05)


@pytest.mark.parametrize("num_processes, devices", [(2, 4), (4, 2)])
def test_training_equals_one_process_and_rows_are_written_once(reference, tmp_path,
                                                               num_processes, devices):
  r = _run_launch(num_processes, devices, f"--workdir={tmp_path}")
  assert r.returncode == 0, r.stderr
  _assert_same_params(tmp_path, reference)
  rows = _train_rows(tmp_path)
  assert [s for s, _ in rows] == [10, 20]  # once each, from process 0 alone
  np.testing.assert_allclose([l for _, l in rows], [l for _, l in _train_rows(reference)],
                             rtol=1e-4)
  assert sum(1 for r in _rows(tmp_path) if "eval_loss_ema" in r) == 2
  assert r.stdout.count("wrote to ") == 1 and "[p0] wrote to " in r.stdout


def test_resume_across_layouts(reference, tmp_path):
  """2 x 4 -> 1 x 8 for the first half, 1 x 8 -> 2 x 4 for the second: the same final state."""
  a, b = tmp_path / "a", tmp_path / "b"
  half = "--config.training.num_train_steps=10"
  assert (r := _run_launch(2, 4, f"--workdir={a}", half)).returncode == 0, r.stderr
  assert (r := _run_one(f"--workdir={a}")).returncode == 0, r.stderr
  assert "resumed from checkpoint 10" in r.stdout
  assert (r := _run_one(f"--workdir={b}", half)).returncode == 0, r.stderr
  assert (r := _run_launch(2, 4, f"--workdir={b}")).returncode == 0, r.stderr
  assert "[p0] resumed from checkpoint 10" in r.stdout
  for workdir in (a, b):
    _assert_same_params(workdir, reference)
    assert [s for s, _ in _train_rows(workdir)] == [10, 20]


def test_a_held_lock_refuses_every_process_with_status_2(tmp_path):
  from score_jax import workdir_lock
  lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  try:
    r = _run_launch(2, 4, f"--workdir={tmp_path}")
  finally:
    lock.release()
  assert r.returncode == 2, r.stderr
  errors = [line for line in r.stderr.splitlines() if " error: " in line]
  assert sorted(e.split()[0] for e in errors) == ["[p0]", "[p1]"], r.stderr
  assert len({e.split(" ", 1)[1] for e in errors}) == 1 and "is in use by train" in errors[0]
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "checkpoints").exists()


def _start_processes(n: int, devices: int, *args: str) -> list[subprocess.Popen]:
  """The processes of one job started directly (so a test can kill one of them)."""
  port = launch.free_port()
  procs = []
  for i in range(n):
    env = dict(launch.child_env(i, devices, "cpu"), PYTHONPATH=str(REPO))
    procs.append(subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), *BASE, *args,
         f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  return procs


@pytest.mark.parametrize("victim", [1, 0])
def test_sigkill_of_one_process_ends_the_other_and_the_rerun_finishes_equal(
    reference, tmp_path, victim):
  args = (f"--workdir={tmp_path}", "--config.training.ckpt_every_steps=2",
          "--config.training.log_every_steps=2")
  procs = _start_processes(2, 4, *args)
  try:
    _wait_for(tmp_path / "checkpoints" / "2", procs)
    assert procs[victim].poll() is None, "the job ended before the kill"
    procs[victim].kill()
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=TIMEOUT)  # bounded: the heartbeat timeout
    assert survivor.returncode != 0, err
  finally:
    for p in procs:
      p.kill()
      p.communicate()
  r = _run_launch(2, 4, *args)
  assert r.returncode == 0, r.stderr
  assert "[p0] resumed from checkpoint" in r.stdout
  _assert_same_params(tmp_path, reference)
  assert [s for s, _ in _train_rows(tmp_path)] == list(range(2, 21, 2))  # none written twice


def test_sigterm_to_all_saves_an_agreed_step_exits_0_and_resumes_exactly(reference, tmp_path):
  args = (f"--workdir={tmp_path}", "--config.training.ckpt_every_steps=2")
  proc = _launch(2, 4, *args)
  try:
    _wait_for(tmp_path / "checkpoints" / "2", [proc])
    assert proc.poll() is None, "the job ended before SIGTERM"
    proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both processes
    out, err = proc.communicate(timeout=TIMEOUT)
  finally:
    proc.kill()
  assert proc.returncode == 0, err
  stopped = [line for line in err.splitlines() if "on SIGTERM (preemption)" in line]
  assert sorted(line.split()[0] for line in stopped) == ["[p0]", "[p1]"], err
  step = {int(line.split("stopped at step ")[1].split()[0]) for line in stopped}
  assert len(step) == 1, stopped  # the same step on both processes
  saved = step.pop()
  assert (tmp_path / "checkpoints" / str(saved)).is_dir()
  assert saved < 20 and "wrote to " not in out
  r = _run_launch(2, 4, *args)
  assert r.returncode == 0, r.stderr
  assert f"[p0] resumed from checkpoint {saved}" in r.stdout
  _assert_same_params(tmp_path, reference)


def test_sigterm_to_one_process_run_saves_and_resumes_exactly(reference, tmp_path):
  from conftest import start_main
  args = (f"--workdir={tmp_path}", "--config.training.ckpt_every_steps=2")
  proc = start_main(*BASE, *args)
  try:
    _wait_for(tmp_path / "checkpoints" / "2", [proc])
    assert proc.poll() is None, "the run ended before SIGTERM"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
  finally:
    proc.kill()
  assert proc.returncode == 0, err
  saved = int(err.split("stopped at step ")[1].split()[0])
  assert saved < 20 and (tmp_path / "checkpoints" / str(saved)).is_dir()
  r = _run_one(*args)
  assert r.returncode == 0, r.stderr
  assert f"resumed from checkpoint {saved}" in r.stdout
  _assert_same_params(tmp_path, reference)


def test_bad_multihost_flags_are_one_line_errors(tmp_path):
  r = run_main("--config=configs/test.py", f"--workdir={tmp_path}", "--process_id=1")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: multi-host: --coordinator_address, --num_processes missing; pass "
      "--coordinator_address, --num_processes and --process_id together (or none, with "
      "--distributed)"]
  r = run_main("--config=configs/test.py", f"--workdir={tmp_path}", "--process_id=2",
               "--num_processes=2", "--coordinator_address=127.0.0.1:1")
  assert r.returncode == 2 and "--process_id=2 must be in 0..num_processes-1" in r.stderr
  assert not any(tmp_path.iterdir())


def test_sigterm_to_one_process_of_the_job_stops_both_at_the_same_step(tmp_path):
  """A preemption notice to one host reaches the others through JAX's preemption service."""
  procs = _start_processes(2, 4, f"--workdir={tmp_path}", "--config.training.ckpt_every_steps=2")
  try:
    _wait_for(tmp_path / "checkpoints" / "2", procs)
    assert all(p.poll() is None for p in procs), "the job ended before SIGTERM"
    procs[1].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], errs
  steps = {int(e.split("stopped at step ")[1].split()[0]) for e in errs}
  assert len(steps) == 1, errs
  assert (tmp_path / "checkpoints" / str(steps.pop())).is_dir()


def test_a_gs_workdir_with_two_processes(reference, tmp_path):
  """2 x 4 on `--workdir=gs://bucket/run` (tests/fake_gcs.py on 127.0.0.1): the loss rows of
  1 x 8, written once into the bucket, checkpoints there, a resume, the lock object released."""
  for module, package in (("gcsfs", "gcsfs"), ("google.cloud.storage", "google-cloud-storage")):
    pytest.importorskip(module, reason=f"the gcs extra's {package} is not installed")
  from fake_gcs import FakeGcs
  server = FakeGcs(["bucket"])
  try:
    env = server.environment()
    half = ("--workdir=gs://bucket/run", "--config.training.num_train_steps=10")
    assert (r := _run_launch(2, 4, *half, env=env)).returncode == 0, r.stderr
    r = _run_launch(2, 4, "--workdir=gs://bucket/run", env=env)
    assert r.returncode == 0, r.stderr
    assert "[p0] resumed from checkpoint 10 in gs://bucket/run" in r.stdout
    names = server.names("bucket")
    rows = [json.loads(line) for line in
            server.buckets["bucket"]["run/metrics.jsonl"].data.decode().splitlines()]
    assert not server.unsupported, server.unsupported
  finally:
    server.close()
  assert "run/checkpoints/20/commit_success.txt" in names
  assert "run/train.lock" not in names
  loss = [(row["step"], row["loss"]) for row in rows if "loss" in row]
  assert [s for s, _ in loss] == [10, 20]
  np.testing.assert_allclose([l for _, l in loss], [l for _, l in _train_rows(reference)],
                             rtol=1e-4)


def test_a_damaged_newest_step_is_judged_the_same_on_every_process(reference, tmp_path):
  """Every process verifies the digest; process 0 alone moves the damaged step aside and all
  resume from the same older step, ending equal to an uninterrupted run."""
  args = (f"--workdir={tmp_path}", "--config.training.ckpt_every_steps=2")
  r = _run_launch(2, 4, *args, "--config.training.num_train_steps=10")
  assert r.returncode == 0, r.stderr
  config = tmp_path / "checkpoints" / "10" / "config" / "metadata"
  config.write_bytes(config.read_bytes().replace(b'"seed"', b'"seeD"'))  # the digest disagrees
  r = _run_launch(2, 4, *args)
  assert r.returncode == 0, r.stderr
  warnings = [line for line in r.stderr.splitlines() if "warning: checkpoint 10" in line]
  assert [w.split()[0] for w in warnings] == ["[p0]"] and "moved to" in warnings[0], r.stderr
  assert (tmp_path / "checkpoints" / "damaged" / "10").is_dir()
  assert "[p0] resumed from checkpoint 8" in r.stdout
  _assert_same_params(tmp_path, reference)
