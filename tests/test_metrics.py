"""Tests for `score_jax.eval.metrics` (closed forms) and the eval modes (CLI, real FID)."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess

import jax
import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S, run_main
from PIL import Image

from configs import test as test_config
from score_jax import experiment
from score_jax.eval import (evaluators, feature_nets, fetch_inception, inception, metrics,
                            reference_stats, sweep)

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_PNG = REPO.parent / "shared" / "data" / "cifar10" / "cifar10_batch_0.png"


# --------------------------------------------------------------------------------------------
# Closed forms.


def test_feature_stats_are_float64_mean_and_unbiased_covariance():
  x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
  mu, sigma = metrics.feature_stats(x)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0))
  centered = x.astype(np.float64) - mu
  np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-12)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_of_diagonal_gaussians_by_hand(method):
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
  a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  # ||mu1 - mu2||^2 = 1 + 0 + 6.25; tr(S1 + S2 - 2 sqrt(S1 S2)) = (1 + 9 - 6) + (4 + 1 - 4) + 0.
  expected = 7.25 + 4.0 + 1.0 + 0.0
  got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
  assert got == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_of_identical_stats_is_zero(method):
  rng = np.random.default_rng(1)
  mu, sigma = metrics.feature_stats(rng.standard_normal((200, 32)))
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-8


def test_frechet_distance_methods_agree_full_and_low_rank():
  rng = np.random.default_rng(2)
  for n in (500, 20):  # full rank, then rank 19 < d = 64 (singular product)
    s1 = metrics.feature_stats(rng.standard_normal((n, 64)))
    s2 = metrics.feature_stats(rng.standard_normal((n, 64)) * 1.5 + 0.3)
    a = metrics.frechet_distance(*s1, *s2, method="sqrtm")
    b = metrics.frechet_distance(*s1, *s2, method="eigh")
    assert a == pytest.approx(b, rel=1e-6)


def test_frechet_distance_rejects_mismatched_stats():
  with pytest.raises(ValueError, match="mismatched"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def _mmd2_by_loops(x, y):
  k = lambda a, b: (a @ b / len(a) + 1.0) ** 3
  m = len(x)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return xx + yy - 2 * xy


def test_kid_of_whole_sets_equals_the_unbiased_polynomial_mmd():
  rng = np.random.default_rng(3)
  x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.5
  # subset_size clips to 12: each subset is a permutation of the whole set, and MMD^2 ignores order.
  mean, std = metrics.kernel_inception_distance(x, y, rng=jax.random.key(0), num_subsets=3,
                                                subset_size=1000)
  assert mean == pytest.approx(_mmd2_by_loops(x, y), rel=1e-10)
  assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_zero_for_one_distribution_and_positive_for_shifted():
  rng = np.random.default_rng(4)
  x, y = rng.standard_normal((2000, 16)), rng.standard_normal((2000, 16))
  key = jax.random.key(1)
  same, same_std = metrics.kernel_inception_distance(x, y, rng=key, num_subsets=20,
                                                     subset_size=500)
  shifted, _ = metrics.kernel_inception_distance(x, y + 0.5, rng=key, num_subsets=20,
                                                 subset_size=500)
  assert abs(same) < 3 * same_std + 1e-3
  assert shifted > 0.1 and shifted > 50 * abs(same)


def test_inception_score_of_uniform_predictions_is_one():
  mean, std = metrics.inception_score(np.zeros((100, inception.NUM_LOGITS)), splits=10)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("scale", [100.0, 1e4])
def test_inception_score_of_confident_diverse_predictions_is_the_class_count(scale):
  classes = 5
  logits = np.zeros((50, inception.NUM_LOGITS))
  logits[np.arange(50), np.arange(50) % classes] = scale  # each split of 10 holds every class twice
  mean, std = metrics.inception_score(logits, splits=5)
  assert mean == pytest.approx(classes, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Evaluation helpers.


def test_sweep_grid_drops_knobs_a_sampler_ignores():
  grid = sweep.sweep_grid(("als", "cas", "pc"), (0.1, 0.2), (5, 10), (True,))
  assert len([s for s in grid if s["method"] == "als"]) == 4
  assert [s["step_lr"] for s in grid if s["method"] == "cas"] == [0.1, 0.2]
  assert all(s["steps_per_sigma"] is None for s in grid if s["method"] == "cas")
  assert [s["corrector_steps"] for s in grid if s["method"] == "pc"] == [5, 10]
  assert all(s["corrector_steps"] is None for s in grid if s["method"] != "pc")
  with pytest.raises(ValueError, match="unknown samplers"):
    sweep.sweep_grid(("ald",), (0.1,), (5,), (True,))


def _feature_kind(config) -> str:
  d = config.data
  return evaluators.feature_kind(config.eval.features, dataset=d.dataset,
                                 image_size=d.image_size, num_channels=d.num_channels)


def test_feature_kind_and_missing_weights_fail_with_clear_messages(tmp_path):
  config = test_config.get_config()
  assert _feature_kind(config) == "toy"
  config.eval.features = "inception"
  with pytest.raises(ValueError, match="does not fit"):
    _feature_kind(config)
  config.data.dataset = "cifar10"
  config.eval.features = "auto"
  assert _feature_kind(config) == "inception"
  config.eval.features = "mnist_classifier"
  with pytest.raises(ValueError, match="needs 28x28x1 images"):
    _feature_kind(config)
  config.eval.inception_weights = str(tmp_path / "absent.npz")
  with pytest.raises(ValueError, match="python -m score_jax.eval.fetch_inception"):
    evaluators.inception_weights_path(config.eval.inception_weights)


def test_inception_input_maps_ranges_quantizes_and_repeats_gray():
  x = np.array([-1.0, 0.0, 1.0, 3.0, np.nan], np.float32).reshape(5, 1, 1, 1)
  images, finite = feature_nets.to_inception_input(x, centered=True)
  assert images.shape == (5, 1, 1, 3)
  np.testing.assert_allclose(images[:, 0, 0, 0], [0.0, 128 / 255, 1.0, 1.0, 0.0])
  assert finite.tolist() == [True, True, True, True, False]
  images, _ = feature_nets.to_inception_input(np.full((1, 2, 2, 3), 0.3, np.float32),
                                              centered=False)
  np.testing.assert_allclose(images, np.round(0.3 * 255) / 255)


def test_reference_statistics_read_clean_eval_images_once_then_the_cache(tmp_path):
  images = np.random.default_rng(5).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
  np.savez(tmp_path / "images.npz", x=images)
  config = test_config.get_config()
  config.data.dataset, config.data.path = "npz", str(tmp_path / "images.npz")
  config.data.image_size, config.data.num_channels = 8, 3
  config.data.centered = config.data.uniform_dequantization = True
  config.eval.num_samples, config.eval.batch_size = 40, 16
  calls = []

  def featurize(x):
    calls.append(len(x))
    images01, _ = feature_nets.to_inception_input(x, centered=True)
    return {"pool": images01.reshape(len(x), -1)[:, :6]}

  workdir = str(tmp_path / "run")
  exp = experiment.build(config)
  ref = reference_stats.reference_statistics(exp.eval, exp.data, workdir, featurize,
                                             "weights_a.npz", seed=exp.seed)
  assert calls == [16, 16, 16]  # 40 images in full batches of 16, surplus dropped
  # Unshuffled and not dequantized: exactly the first 40 images, back in [0, 1].
  expected = images[:40].reshape(40, -1)[:, :6] / 255.0
  np.testing.assert_allclose(ref["features"], expected, atol=1e-6)
  np.testing.assert_allclose(ref["mu"], expected.mean(0), atol=1e-6)
  assert (tmp_path / "run" / "eval_cache" / "ref_stats_npz_test_40.npz").is_file()
  cached = reference_stats.reference_statistics(exp.eval, exp.data, workdir, featurize,
                                             "weights_a.npz", seed=exp.seed)
  assert len(calls) == 3
  np.testing.assert_array_equal(cached["sigma"], ref["sigma"])
  reference_stats.reference_statistics(exp.eval, exp.data, workdir, featurize, "weights_b.npz",
                                       seed=exp.seed)
  assert len(calls) == 6  # other weights: recomputed


def test_image_metrics_of_features_against_reference():
  rng = np.random.default_rng(6)
  ref_features = rng.standard_normal((80, 8))
  mu, sigma = metrics.feature_stats(ref_features)
  reference = {"mu": mu, "sigma": sigma, "features": ref_features}
  feats = {"pool": ref_features[:40] + 3.0, "finite": np.array([True] * 30 + [False] * 10),
           "logits": np.zeros((40, inception.NUM_LOGITS))}
  out = evaluators.image_metrics(feats, reference, jax.random.key(0))
  assert out["finite_fraction"] == 0.75
  assert out["fid"] > 8 * 9 * 0.9 and out["kid"] > 0  # mean shift of 3 in 8 dims
  assert out["inception_score"] == pytest.approx(1.0)
  no_kid = evaluators.image_metrics({"pool": feats["pool"], "finite": feats["finite"]},
                                    {"mu": mu, "sigma": sigma, "features": None}, jax.random.key(0))
  assert "kid" not in no_kid and "inception_score" not in no_kid


# --------------------------------------------------------------------------------------------
# The CLI on the toy test config.


def _main(*args: str) -> subprocess.CompletedProcess:
  return run_main("--config=configs/test.py", *args, timeout=HANG_TIMEOUT_S)


def _rows(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite(v) -> bool:
  return isinstance(v, float) and math.isfinite(v)


@pytest.mark.e2e
def test_eval_and_sampler_sweep_modes_on_the_toy_config(tmp_path):
  workdir = tmp_path / "run"
  small = ["--config.eval.num_samples=64", "--config.eval.batch_size=64"]
  proc = _main(f"--workdir={workdir}", "--config.sampling.methods=(\"als\",)")
  assert proc.returncode == 0, proc.stderr

  proc = _main(f"--workdir={workdir}", "--mode=eval", *small)
  assert proc.returncode == 0, proc.stderr
  assert "best checkpoint by mmd_rbf" in proc.stdout
  assert "eval_metrics.csv" in proc.stdout and "eval_metrics.png" in proc.stdout
  rows = _rows(workdir / "eval_metrics.jsonl")
  assert [r["step"] for r in rows] == [10, 20]
  for r in rows:
    assert r["method"] == "als" and r["num_samples"] == 64 and r["features"] == "toy"
    assert _finite(r["mmd_rbf"]) and _finite(r["energy_distance"])
    assert r["finite_fraction"] == 1.0

  # Step 20 with the same settings is already in the JSON lines: reused, not evaluated again.
  proc = _main(f"--workdir={workdir}", "--mode=eval", *small, "--config.eval.begin_step=15")
  assert proc.returncode == 0, proc.stderr
  assert "1 of 1 checkpoints reused" in proc.stdout
  assert _rows(workdir / "eval_metrics.jsonl") == rows  # (reproducibility: test_evaluate.py)

  proc = _main(f"--workdir={workdir}", "--mode=sampler_sweep", *small,
               "--config.eval.sweep_step_lrs=(0.5,1.0)", "--config.eval.sweep_steps_per_sigma=(5,)")
  assert proc.returncode == 0, proc.stderr
  assert "sampler_sweep.csv" in proc.stdout and "sampler_sweep.png" in proc.stdout
  rows = _rows(workdir / "sampler_sweep.jsonl")
  # ALS: 2 step_lrs x 2 denoise; CAS: the same minus steps_per_sigma. With 4 levels 20 -> 1,
  # gamma = 20^(-1/3) and CAS needs step_lr in (1 - gamma, 1 + gamma) = (0.63, 1.37).
  assert len(rows) == 8 and all(r["step"] == 20 for r in rows)
  skipped = [r for r in rows if "skipped" in r]
  assert [(r["method"], r["step_lr"]) for r in skipped] == [("cas", 0.5), ("cas", 0.5)]
  assert all("infeasible" in r["skipped"] for r in skipped)
  for r in rows:
    if "skipped" not in r:
      assert _finite(r["mmd_rbf"]) and _finite(r["energy_distance"]), r
  assert {(r["method"], r["step_lr"], r["denoise"]) for r in rows if "skipped" not in r} == {
      ("als", 0.5, False), ("als", 0.5, True), ("als", 1.0, False), ("als", 1.0, True),
      ("cas", 1.0, False), ("cas", 1.0, True)}


def test_eval_without_checkpoints_is_a_one_line_error(tmp_path):
  proc = _main(f"--workdir={tmp_path / 'empty'}", "--mode=eval")
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error:") and "train first" in proc.stderr


# --------------------------------------------------------------------------------------------
# FID on real images.


def test_fid_of_real_halves_is_far_below_real_versus_noise():
  weights = fetch_inception.default_npz_path()
  if not weights.is_file():
    pytest.skip(f"FID Inception weights absent at {weights}; run `python -m "
                "score_jax.eval.fetch_inception`")
  if not CIFAR_PNG.is_file():
    pytest.skip(f"real CIFAR-10 images absent at {CIFAR_PNG}")
  n = 64
  images = np.asarray(Image.open(CIFAR_PNG).convert("RGB")).reshape(1000, 32, 32, 3)
  real = images[:2 * n].astype(np.float32) / 255.0
  noise_images = np.random.default_rng(0).uniform(size=(n, 32, 32, 3)).astype(np.float32)
  net = feature_nets.make_inception_fn(inception.load_params(weights))
  feats = [feature_nets.image_features(net, x, centered=False)["pool"]
           for x in (real[:n], real[n:], noise_images)]
  stats = [metrics.feature_stats(f) for f in feats]
  # "eigh" is the same trace as pytorch-fid's sqrtm (checked above), ~10x faster at d = 2048.
  real_real = metrics.frechet_distance(*stats[0], *stats[1], method="eigh")
  real_noise = metrics.frechet_distance(*stats[0], *stats[2], method="eigh")
  assert math.isfinite(real_real) and real_real > 0
  assert real_real < 0.5 * real_noise
  kid_real, _ = metrics.kernel_inception_distance(feats[0], feats[1], rng=jax.random.key(0),
                                                  num_subsets=10)
  kid_noise, _ = metrics.kernel_inception_distance(feats[0], feats[2], rng=jax.random.key(0),
                                                   num_subsets=10)
  assert kid_noise > 100 * abs(kid_real)
