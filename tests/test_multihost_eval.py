"""The reading modes on several real processes equal one process with the same devices.

Each multi-process run is `python -m score_jax.launch --num_processes=N --devices_per_process=K
-- <main.py flags>` (N processes of one `jax.distributed` job over 127.0.0.1, K simulated CPU
devices each); its outputs are compared with `main.py` in one process with N x K devices: the
samples of `--mode=sample` (and of the sampling that ends `--mode=train`), the rows of
`--mode=eval` and `--mode=sampler_sweep`, the likelihood of `--mode=likelihood`, the exported
file, and MNIST-classifier features and FID. Every output is written once, by process 0.

A toy workdir (configs/test.py, trained once per module in one process) serves the toy runs; an
untrained NCSNv2 (4 filters) on synthetic 28x28 digits, written as a step-0 checkpoint, serves
the image runs: what is compared does not depend on training.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, main_env, run_main, synthetic_digits
from PIL import Image

pytestmark = pytest.mark.multihost

TIMEOUT = 900  # bounds a hang; never a speed expectation
TOY = ["--config.sampling.methods=(\"als\",)", "--config.sampling.num_samples=8",
       "--config.sampling.batch_size=8"]


def launch(num_processes: int, devices_per_process: int, *args: str
           ) -> subprocess.CompletedProcess:
  """Runs `main.py *args` as one job of `num_processes` local processes; returns its outcome."""
  env = dict(main_env(devices_per_process), PYTHONPATH=str(REPO))
  proc = subprocess.Popen(
      [sys.executable, "-m", "score_jax.launch", f"--num_processes={num_processes}",
       f"--devices_per_process={devices_per_process}", "--", *args],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    out, err = proc.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    raise
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_layout(layout: tuple[int, int], *args: str) -> subprocess.CompletedProcess:
  """`main.py *args` on `layout` = (processes, devices per process); (1, K) runs it directly."""
  n, k = layout
  proc = run_main(*args, devices=k, timeout=TIMEOUT) if n == 1 else launch(n, k, *args)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _copy(src: pathlib.Path, dst: pathlib.Path) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def _jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def _printed_by(out: str, text: str) -> set[str]:
  """The launcher prefixes ([p0], [p1], ...) of the stdout lines that contain `text` (Gloo's
  own lines, which its threads interleave, are not matched)."""
  return {line.split()[0] for line in out.splitlines() if line.startswith("[p") and text in line}


def _assert_rows_equal(a: list[dict], b: list[dict], rel: float) -> None:
  """Same rows but for the run time; numbers within `rel`."""
  assert len(a) == len(b)
  for ra, rb in zip(a, b):
    assert set(ra) == set(rb)
    for key, va in ra.items():
      if key in ("time", "seconds"):
        continue
      if isinstance(va, str) or va is None or isinstance(va, bool):
        assert va == rb[key], key
      else:  # numbers and (nested) lists of numbers, NaN where a mode drew no sample
        np.testing.assert_allclose(np.asarray(va, float), np.asarray(rb[key], float), rtol=rel,
                                   atol=rel, equal_nan=True, err_msg=key)


# --------------------------------------------------------------------------------------------
# Decisions made on process 0.


def test_from_main_gives_every_process_the_value_or_the_error_of_process_0():
  proc = launch(3, 1, str(REPO / "tests" / "fixtures" / "multihost" / "from_main.py"))
  assert proc.returncode == 0, proc.stderr[-4000:]
  for i in range(3):
    assert f"[p{i}] process {i} got {{'from': 0, 'rows': [1, 2, 3]}}" in proc.stdout
    assert f"[p{i}] process {i} raised ValueError: no checkpoint here" in proc.stdout
    assert f"[p{i}] process {i} raised RuntimeError: _Unpicklable: x/y" in proc.stdout


def test_convert_refuses_several_processes_in_one_line(tmp_path):
  proc = launch(2, 1, "-m", "score_jax.convert", "--source=ncsnv2",
                f"--checkpoint={tmp_path / 'absent.pth'}", "--config=configs/test.py",
                f"--workdir={tmp_path / 'out'}")
  assert proc.returncode == 2, proc.stderr
  # The first process to refuse ends the job; the others may be stopped before they print.
  assert "] error: --num_processes=2: conversion reads one file" in proc.stderr
  assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Toy runs.


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> pathlib.Path:
  """configs/test.py trained in one process of 8 devices: checkpoints at steps 10 and 20."""
  workdir = tmp_path_factory.mktemp("toy") / "run"
  run_layout((1, 8), "--config=configs/test.py", f"--workdir={workdir}", *TOY)
  return workdir


@pytest.mark.parametrize("layout", [(2, 4), (4, 2)])
def test_sample_mode_equals_one_process(toy_run, tmp_path, layout):
  flags = ["--mode=sample", "--config.sampling.num_samples=20", "--config.sampling.batch_size=12"]
  one = _copy(toy_run, tmp_path / "one")
  many = _copy(toy_run, tmp_path / "many")
  run_layout((1, 8), f"--workdir={one}", *flags)
  proc = run_layout(layout, f"--workdir={many}", *flags)
  assert _printed_by(proc.stdout, "mmd_rbf") == {"[p0]"}  # the summary table, once
  with np.load(f"{one}/samples/als_step20.npz") as a, np.load(f"{many}/samples/als_step20.npz") as b:
    assert a["x"].shape == (20, 2)
    np.testing.assert_allclose(b["x"], a["x"], rtol=1e-5, atol=1e-5)
  rows = _jsonl(pathlib.Path(many) / "sample_metrics.jsonl")
  assert len(rows) == 2  # the training run's row and this run's, each written once
  _assert_rows_equal(rows[1:], _jsonl(pathlib.Path(one) / "sample_metrics.jsonl")[1:], rel=1e-4)


def test_training_ends_with_the_samples_of_one_process(tmp_path):
  """The sampling after `--mode=train` runs on every process; the samples equal 1 x 8's."""
  flags = ["--config=configs/test.py", "--config.training.num_train_steps=10", *TOY]
  run_layout((1, 8), f"--workdir={tmp_path / 'one'}", *flags)
  run_layout((2, 4), f"--workdir={tmp_path / 'many'}", *flags)
  with np.load(tmp_path / "one/samples/als_step10.npz") as a, \
      np.load(tmp_path / "many/samples/als_step10.npz") as b:
    # Training on 2 x 4 equals 1 x 8 to float rounding (relative 1e-4 on the parameters).
    np.testing.assert_allclose(b["x"], a["x"], rtol=1e-3, atol=1e-3)
  assert len(_jsonl(tmp_path / "many/sample_metrics.jsonl")) == 1


def test_eval_and_sampler_sweep_rows_equal_one_process_and_are_written_once(toy_run, tmp_path):
  eval_flags = ["--mode=eval", "--config.eval.num_samples=24", "--config.eval.batch_size=16"]
  sweep_flags = ["--mode=sampler_sweep", "--config.eval.num_samples=16",
                 "--config.eval.batch_size=16", "--config.eval.sweep_methods=(\"als\",\"cas\")",
                 "--config.eval.sweep_step_lrs=(0.05,0.1,50.0)",
                 "--config.eval.sweep_steps_per_sigma=(2,)",
                 "--config.eval.sweep_denoise=(True,)"]
  one = _copy(toy_run, tmp_path / "one")
  many = _copy(toy_run, tmp_path / "many")
  for flags, table in ((eval_flags, "best checkpoint by"), (sweep_flags, "rows reused")):
    run_layout((1, 8), f"--workdir={one}", *flags)
    proc = run_layout((2, 4), f"--workdir={many}", *flags)
    assert _printed_by(proc.stdout, table) == {"[p0]"}
  for name in ("eval_metrics", "sampler_sweep"):
    rows = _jsonl(pathlib.Path(many) / f"{name}.jsonl")
    _assert_rows_equal(rows, _jsonl(pathlib.Path(one) / f"{name}.jsonl"), rel=1e-4)
  assert [r["step"] for r in _jsonl(pathlib.Path(many) / "eval_metrics.jsonl")] == [10, 20]
  sweep_rows = _jsonl(pathlib.Path(many) / "sampler_sweep.jsonl")
  assert len(sweep_rows) == 6 and any("skipped" in r for r in sweep_rows)  # infeasible CAS
  assert not (pathlib.Path(many) / "eval_cache" / "batches").exists() or not any(
      (pathlib.Path(many) / "eval_cache" / "batches").iterdir())

  # A rerun on another layout reuses every stored row: nothing is evaluated or written again.
  proc = run_layout((4, 2), f"--workdir={many}", *eval_flags)
  assert "2 of 2 checkpoints reused" in proc.stdout
  assert len(_jsonl(pathlib.Path(many) / "eval_metrics.jsonl")) == 2


def test_likelihood_equals_one_process_and_resumes_on_another_layout(toy_run, tmp_path):
  flags = ["--mode=likelihood", "--config.likelihood.num_examples=24",
           "--config.likelihood.batch_size=16"]
  one = _copy(toy_run, tmp_path / "one")
  many = pathlib.Path(_copy(toy_run, tmp_path / "many"))
  run_layout((1, 8), f"--workdir={one}", *flags)
  run_layout((2, 4), f"--workdir={many}", *flags)
  [row] = _jsonl(many / "likelihood.jsonl")
  _assert_rows_equal([row], _jsonl(pathlib.Path(one) / "likelihood.jsonl"), rel=1e-5)
  assert (many / "likelihood_step20.png").is_file()

  # One stored batch marked, the other deleted: a 4 x 2 rerun reuses the first, redoes the other.
  [folder] = (many / "likelihood").iterdir()
  marked = dict(np.load(folder / "batch_00000000.npz"))
  marked["logp"] = marked["logp"] - 1.0
  np.savez(folder / "batch_00000000.npz", **marked)
  os.remove(folder / "batch_00000016.npz")
  run_layout((4, 2), f"--workdir={many}", *flags)
  [again] = _jsonl(many / "likelihood.jsonl")
  assert again["mean"] == pytest.approx(row["mean"] + 16 / 24, rel=1e-5)
  assert (folder / "batch_00000016.npz").is_file()


def test_export_on_two_processes_writes_the_file_of_one(toy_run, tmp_path):
  one, many = tmp_path / "one.msgpack", tmp_path / "many.msgpack"
  run_layout((1, 8), "--mode=export", f"--workdir={toy_run}", f"--export_path={one}")
  run_layout((2, 4), "--mode=export", f"--workdir={toy_run}", f"--export_path={many}")
  assert one.read_bytes() == many.read_bytes()


# --------------------------------------------------------------------------------------------
# Image runs: bits/dim, MNIST-classifier features and FID, inpainting.



@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> tuple[pathlib.Path, list[str]]:
  """An untrained NCSNv2 (4 filters) on synthetic digits as a step-0 workdir, and its flags."""
  from configs import test as test_config
  from score_jax import convert, experiment, models
  from score_jax.eval import mnist_classifier
  root = tmp_path_factory.mktemp("image")
  np.savez(root / "digits.npz", x=synthetic_digits(48))
  weights = root / "classifier.npz"
  params = mnist_classifier.MnistClassifier().init(
      jax.random.key(0), np.zeros((1, *mnist_classifier.IMAGE_SHAPE), np.float32))["params"]
  mnist_classifier.save_params(weights, jax.device_get(params), "untrained")
  config = test_config.get_config()
  config.data.dataset, config.data.path = "npz", str(root / "digits.npz")
  config.data.image_size, config.data.num_channels = 28, 1
  config.model.name, config.model.ncsn.ngf = "ncsnv2", 4
  config.sampling.als.steps_per_sigma = 1
  state = experiment.init_state(config, models.build(config))
  convert.write_workdir(experiment.build(config), jax.device_get(state.params), str(root / "run"),
                        metadata={})
  flags = [f"--config.eval.mnist_classifier_weights={weights}"]
  return root / "run", flags


def test_image_bits_per_dim_equal_one_process(image_run, tmp_path):
  run, _ = image_run
  flags = ["--mode=likelihood", "--config.likelihood.num_examples=12",
           "--config.likelihood.batch_size=12", "--config.likelihood.rtol=1e-2",
           "--config.likelihood.atol=1e-2"]
  one = _copy(run, tmp_path / "one")
  many = _copy(run, tmp_path / "many")
  run_layout((1, 8), f"--workdir={one}", *flags)
  run_layout((2, 4), f"--workdir={many}", *flags)
  [a] = _jsonl(pathlib.Path(one) / "likelihood.jsonl")
  [b] = _jsonl(pathlib.Path(many) / "likelihood.jsonl")
  assert a["metric"] == "bits_per_dim" and np.isfinite(a["mean"])
  # The toy's likelihood agrees to 1e-5. Here the number of accepted solver steps differs
  # between layouts (NFE 85.5 and 87 seen): float rounding of the image network, amplified by
  # the adaptive solver at rtol=atol=1e-2, gives differences of the order of that tolerance
  # (1.5e-4 relative seen on the mean; 1.3e-3 bits/dim on its standard error).
  assert b["mean"] == pytest.approx(a["mean"], rel=1e-3)
  assert b["se"] == pytest.approx(a["se"], abs=5e-3)
  assert b["num_failed"] == a["num_failed"] == 0 and b["num_examples"] == 12


def test_image_eval_features_and_fid_equal_one_process(image_run, tmp_path):
  """MNIST-classifier FID of samples drawn on 2 x 4: the reference statistics (computed over
  all devices), the sample features and the FID equal those of 1 x 8."""
  run, flags = image_run
  flags = [*flags, "--mode=eval", "--config.eval.features=mnist_classifier",
           "--config.eval.num_samples=12", "--config.eval.batch_size=12"]
  one = pathlib.Path(_copy(run, tmp_path / "one"))
  many = pathlib.Path(_copy(run, tmp_path / "many"))
  run_layout((1, 8), f"--workdir={one}", *flags)
  run_layout((2, 4), f"--workdir={many}", *flags)
  [a] = _jsonl(one / "eval_metrics.jsonl")
  [b] = _jsonl(many / "eval_metrics.jsonl")
  assert np.isfinite(a["fid_mnist"]) and a["fid_mnist"] > 0
  _assert_rows_equal([b], [a], rel=1e-4)
  [ref_one] = (one / "eval_cache").glob("ref_stats_*.npz")
  [ref_many] = (many / "eval_cache").glob("ref_stats_*.npz")
  with np.load(ref_one) as f, np.load(ref_many) as g:
    np.testing.assert_allclose(g["features"], f["features"], rtol=1e-5, atol=1e-5)


def test_image_sample_mode_inpaints_and_denoises_as_one_process(image_run, tmp_path):
  run, _ = image_run
  flags = ["--mode=sample", "--config.sampling.num_samples=6", "--config.sampling.batch_size=6",
           "--config.sampling.inpaint_examples=3"]
  one = pathlib.Path(_copy(run, tmp_path / "one"))
  many = pathlib.Path(_copy(run, tmp_path / "many"))
  run_layout((1, 8), f"--workdir={one}", *flags)
  run_layout((2, 4), f"--workdir={many}", *flags)
  with np.load(one / "samples/als_step0.npz") as a, np.load(many / "samples/als_step0.npz") as b:
    np.testing.assert_allclose(b["x"], a["x"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b["x_before_denoising"], a["x_before_denoising"], rtol=1e-5,
                               atol=1e-5)
  # The completions (written as a PNG grid) equal to the 8-bit level.
  grids = [np.asarray(Image.open(d / "samples/inpainting_step0.png"), np.int16) for d in (one, many)]
  assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 1
