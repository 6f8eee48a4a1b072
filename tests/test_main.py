"""The command line end to end: train/resume/sample on the test config, sweeps, bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
from conftest import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env(devices: int = 8) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("SCORE_JAX_DEBUG", None)
  return env


def _main(*args, devices: int = 8, **kwargs) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
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
  assert "results in" in out and "mode_weights" in out
  samples = sorted((workdir / "samples").glob("*.npz"))
  assert [p.name for p in samples] == ["als_step20.npz", "cas_step20.npz"]
  assert (workdir / "samples" / "comparison_step20.png").is_file()
  assert (workdir / "samples" / "trajectory_step20.png").is_file()
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [10, 20]
  assert len(records[0]["loss_per_level"]) == 4
  assert any(p.name.startswith("events") for p in (workdir / "tb" / "metrics").iterdir())
  sample_records = [json.loads(l) for l in (workdir / "sample_metrics.jsonl").read_text().splitlines()]
  assert {r["method"] for r in sample_records} == {"als", "cas"}
  # Same command again: resumes at the end, trains nothing more, samples again.
  code, _, err = _finish(_main("--config=configs/test.py", f"--workdir={workdir}",
                               "--config.training.num_train_steps=30"))
  assert code == 0, err
  assert (workdir / "samples" / "als_step30.npz").is_file()
  code, _, err = _finish(_main("--mode=sample", f"--workdir={workdir}"))
  assert code == 0, err


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
  for delay in (6.0, 8.5):
    proc = _main(*args, f"--workdir={interrupted}")
    time.sleep(delay)
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


def _incompatible_workdir(tmp_path) -> pathlib.Path:
  workdir = tmp_path / "other_model"
  code, _, err = _finish(_main("--config=configs/test.py", f"--workdir={workdir}",
                               "--config.training.num_train_steps=10"))
  assert code == 0, err
  return workdir


BAD_INPUTS = {
    "unknown config file": (["--config=configs/nope.py"], "nope.py"),
    "unknown key": (["--config=configs/test.py", "--config.training.num_trian_steps=5"],
                    "num_trian_steps"),
    "wrong type": (["--config=configs/test.py", "--config.training.batch_size=abc"], "batch_size"),
    "batch not divisible": (["--config=configs/test.py", "--config.training.batch_size=12"],
                            "multiple of the 8 devices"),
    "sigma_max < sigma_min": (["--config=configs/test.py", "--config.noise.sigma_max=0.5"],
                              "sigma_max"),
    "unknown dataset": (["--config=configs/test.py", "--config.data.dataset=imagenet"],
                        "imagenet"),
    "unwritable workdir": (["--config=configs/test.py", "--workdir=/proc/score_jax_run"],
                           "not a writable directory"),
}


def test_bad_input_is_one_line_exit_2(tmp_path):
  other = _incompatible_workdir(tmp_path)
  cases = dict(BAD_INPUTS)
  cases["incompatible checkpoint"] = (["--config=configs/test.py", f"--workdir={other}",
                                       "--config.model.hidden=16"], "incompatible")
  before = sorted(str(p) for p in other.rglob("*"))
  procs = {}
  for name, (args, _) in cases.items():
    if not any(a.startswith("--workdir") for a in args):
      args = args + [f"--workdir={tmp_path / name.replace(' ', '_')}"]
    procs[name] = _main(*args)
  for name, proc in procs.items():
    code, out, err = _finish(proc)
    expected = cases[name][1]
    assert code == 2, f"{name}: exit {code}\n{err[-2000:]}"
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{name}: {err[-2000:]}"
    assert expected in lines[0], f"{name}: {lines[0]}"
    assert "Traceback" not in err
    if name != "incompatible checkpoint":
      assert not (tmp_path / name.replace(" ", "_")).exists(), f"{name} wrote its workdir"
  assert sorted(str(p) for p in other.rglob("*")) == before


def test_default_job_matches_the_mixture_with_every_sampler(tmp_path):
  """`python main.py` with the default config: every sampler it runs matches the truth.

  10000 samples: the standard errors are 0.004 for the weights, 0.02 for the small mode's mean
  and 3% for its variance, so the tolerances (0.03, 0.15, 10%) are several of them wide.
  """
  code, out, err = _finish(_main(f"--workdir={tmp_path}", "--config.training.progress_bar=False",
                                 "--config.sampling.num_samples=10000",
                                 "--config.sampling.batch_size=10000"), timeout=1200)
  assert code == 0, err
  records = {r["method"]: r for r in
             map(json.loads, (tmp_path / "sample_metrics.jsonl").read_text().splitlines())}
  assert set(records) == {"als", "cas", "heun"}
  for method, r in records.items():
    assert r["finite_fraction"] == 1.0, method
    assert r["nfe"] > 0 and f"{method:<17}" in out, method
    np.testing.assert_allclose(r["mode_weights"], [0.2, 0.8], atol=0.03, err_msg=method)
    np.testing.assert_allclose(r["mode_means"], [[-5, -5], [5, 5]], atol=0.15, err_msg=method)
    np.testing.assert_allclose(r["mode_vars"], np.ones((2, 2)), rtol=0.1, err_msg=method)
