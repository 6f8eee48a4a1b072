"""The command line end to end: train/resume/sample on the test config, sweeps, kill -9 resume.

Bad input is tested in test_bad_input.py."""

import json
import pathlib
import signal
import subprocess
import time

import numpy as np
from conftest import HANG_TIMEOUT_S, start_main

REPO = pathlib.Path(__file__).resolve().parents[1]


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


def _wait_for_checkpoints(proc: subprocess.Popen, workdir: pathlib.Path, more: int) -> None:
  """Returns once `workdir/checkpoints` holds `more` entries more than now (or `proc` ended)."""
  folder = workdir / "checkpoints"
  count = lambda: len(list(folder.iterdir())) if folder.is_dir() else 0
  target = count() + more
  while proc.poll() is None and count() < target:
    time.sleep(0.02)


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  """SIGKILL at arbitrary moments (mid-save included), rerun: same final params, bit for bit."""
  args = ["--config=configs/test.py", "--config.training.num_train_steps=400",
          "--config.training.ckpt_every_steps=20", "--config.training.log_every_steps=20",
          "--config.training.async_checkpoint=True", "--config.sampling.num_samples=8",
          "--config.sampling.batch_size=8"]
  full = tmp_path / "full"
  code, _, err = _finish(_main(*args, f"--workdir={full}"))
  assert code == 0, err
  interrupted = tmp_path / "interrupted"
  # Killed on events, not after delays: once the first checkpoint save has begun, then once two
  # more have (async saves: the kill can land mid-save).
  for more in (1, 2):
    proc = _main(*args, f"--workdir={interrupted}")
    _wait_for_checkpoints(proc, interrupted, more)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
  code, _, err = _finish(_main(*args, f"--workdir={interrupted}"))
  assert code == 0, err
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
