"""Tests for `score_jax.evaluate`: resuming by entry key, CSV/PNG outputs, MNIST-classifier FID.

The resume and output tests evaluate a toy workdir trained once per module through `main.py` on
configs/test.py (about 8 s); the classifier tests use a freshly initialized classifier on
synthetic digits, and a briefly trained one on the real MNIST files when ../shared/data has them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S, run_main, synthetic_digits
from PIL import Image

from configs import test as test_config
from score_jax import evaluate, experiment, image_data, sampling, stored_config
from score_jax.eval import batches, evaluators, feature_nets, mnist_classifier, records

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL_EVAL = {"num_samples": 64, "batch_size": 64}


# --------------------------------------------------------------------------------------------
# The entry key and stored rows.


def _entry(**changes) -> dict:
  entry = {"step": 20, "method": "als", "step_lr": 0.1, "steps_per_sigma": 5, "n_sigma": 1,
           "snr": 0.16, "denoise": True, "init": "gaussian", "num_samples": 64,
           "features": "toy", "seed": 0}
  return {**entry, **changes}


def test_entry_key_ignores_measurements_and_survives_json():
  entry = _entry()
  stored = json.loads(json.dumps({**entry, "time": 1.0, "mmd_rbf": 0.5, "seconds": 2.0}))
  assert records.entry_key(stored) == records.entry_key(entry)
  assert records.entry_key(_entry(step_lr=1)) == records.entry_key(_entry(step_lr=1.0))


@pytest.mark.parametrize("change", [
    {"step": 10}, {"method": "cas"}, {"step_lr": 0.2}, {"steps_per_sigma": 6}, {"n_sigma": 2},
    {"snr": 0.1}, {"denoise": False}, {"init": "uniform"}, {"num_samples": 128},
    {"features": "inception"}, {"seed": 1}, {"features_digest": "ab12"},
    {"reference_digest": "cd34"}, {"num_steps": 25}, {"rel_tol": 0.1}, {"s_churn": 10.0},
    {"ladder": "karras"}, {"eta": (0.5, 0.4)}])
def test_entry_key_tells_apart_every_setting(change):
  assert records.entry_key(_entry(**change)) != records.entry_key(_entry())


def test_entry_key_reads_every_argument_of_every_sampler():
  """A knob missing from the key would let two settings of a sweep share one row."""
  config = stored_config.config_from_dict({})
  knobs = {k for m in sampling.SAMPLERS for k in experiment.sampler_kwargs(config, m)}
  assert knobs <= set(records.SETTING_KEYS)
  eta = _entry(method="cas", eta=(0.5, 0.4))
  assert records.entry_key(json.loads(json.dumps(eta))) == records.entry_key(eta)


def test_entry_key_counts_an_absent_knob_as_none():
  entry = _entry(steps_per_sigma=None)
  del entry["features"]
  absent = {k: v for k, v in entry.items() if k != "steps_per_sigma"}
  assert records.entry_key(absent) == records.entry_key(entry)
  assert records.entry_key(absent) != records.entry_key(_entry())


def test_stored_rows_keep_the_last_row_and_skip_broken_lines(tmp_path):
  path = tmp_path / "eval_metrics.jsonl"
  assert records.stored_rows(str(path)) == {}
  lines = [json.dumps({**_entry(), "mmd_rbf": 1.0}), json.dumps({"step": 5, "loss": 1.0}),
           json.dumps({**_entry(), "mmd_rbf": "nan"}), '{"step": 30, "method": "al']
  path.write_text("\n".join(lines))
  rows = records.stored_rows(str(path))
  assert list(rows) == [records.entry_key(_entry())]
  assert math.isnan(rows[records.entry_key(_entry())]["mmd_rbf"])


# --------------------------------------------------------------------------------------------
# Both modes on a trained toy workdir.


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
  """A test-config workdir with checkpoints at steps 10 and 20 (trained once per module)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  proc = run_main("--config=configs/test.py", f"--workdir={workdir}",
                  "--config.sampling.methods=(\"als\",)", "--config.sampling.num_samples=8",
                  "--config.sampling.batch_size=8", timeout=HANG_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr
  return workdir


@pytest.fixture
def workdir(trained, tmp_path) -> str:
  """A private copy of the trained workdir (the tests write metrics into it)."""
  copy = tmp_path / "run"
  shutil.copytree(trained, copy)
  return str(copy)


def _config(**eval_overrides):
  config = test_config.get_config()
  config.eval.update({**SMALL_EVAL, **eval_overrides})
  return config


def _count_evaluations(monkeypatch, *, fail_at: int | None = None) -> list[int]:
  """Counts `_evaluate_sampler` calls; call number `fail_at` (1-based) raises KeyboardInterrupt.

  The interruption happens once: later calls (after the list is cleared) all evaluate.
  """
  calls = []
  pending = [fail_at]
  real = evaluate._evaluate_sampler

  def counting(*args, **kwargs):
    calls.append(1)
    if len(calls) == pending[0]:
      pending[0] = None
      raise KeyboardInterrupt("simulated interruption")
    return real(*args, **kwargs)

  monkeypatch.setattr(evaluate, "_evaluate_sampler", counting)
  return calls


def _csv_rows(path: str) -> list[dict]:
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _assert_csv_matches(csv_row: dict, json_row: dict) -> None:
  for key, value in json_row.items():
    if key == "time":
      assert key not in csv_row
      continue
    cell = csv_row[key]
    if value is None:
      assert cell == "", key
    elif isinstance(value, bool) or isinstance(value, str) and value not in ("nan", "inf"):
      assert cell == str(value), key
    elif isinstance(value, list):
      assert json.loads(cell) == value, key
    else:
      assert float(cell) == pytest.approx(float(value), rel=1e-12, nan_ok=True), key


def test_eval_writes_a_csv_matching_the_jsonl_and_a_png(workdir, capsys):
  rows = evaluate.evaluate_checkpoints(experiment.build(_config()), workdir)
  assert [r["step"] for r in rows] == [10, 20]
  out = capsys.readouterr().out
  for name in ("eval_metrics.jsonl", "eval_metrics.csv", "eval_metrics.png"):
    assert os.path.join(os.path.abspath(workdir), name) in out
  with open(os.path.join(workdir, "eval_metrics.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with Image.open(os.path.join(workdir, "eval_metrics.png")) as im:
    assert im.size[0] > im.size[1] > 100
  stored = [json.loads(line) for line in open(os.path.join(workdir, "eval_metrics.jsonl"))]
  table = _csv_rows(os.path.join(workdir, "eval_metrics.csv"))
  assert len(table) == len(stored) == 2
  header = list(table[0])
  assert header[:len(records.SETTING_COLUMNS)] == list(records.SETTING_COLUMNS)
  assert header[len(records.SETTING_COLUMNS)] == "mmd_rbf"
  for csv_row, json_row in zip(table, stored):
    assert json_row["features"] == "toy" and json_row["num_samples"] == 64
    _assert_csv_matches(csv_row, json_row)


def test_interrupted_eval_reruns_only_the_missing_checkpoints(workdir, monkeypatch, capsys):
  config = _config()
  calls = _count_evaluations(monkeypatch, fail_at=2)
  with pytest.raises(KeyboardInterrupt):
    evaluate.evaluate_checkpoints(experiment.build(config), workdir)
  jsonl = pathlib.Path(workdir) / "eval_metrics.jsonl"
  assert [json.loads(line)["step"] for line in jsonl.read_text().splitlines()] == [10]
  capsys.readouterr()

  calls.clear()
  rows = evaluate.evaluate_checkpoints(experiment.build(config), workdir)
  assert len(calls) == 1  # step 20 only
  assert "1 of 2 checkpoints reused" in capsys.readouterr().out
  assert [r["step"] for r in rows] == [10, 20]
  assert [json.loads(line)["step"] for line in jsonl.read_text().splitlines()] == [10, 20]

  calls.clear()
  again = evaluate.evaluate_checkpoints(experiment.build(config), workdir)
  assert calls == [] and "2 of 2 checkpoints reused" in capsys.readouterr().out
  assert [r["mmd_rbf"] for r in again] == [r["mmd_rbf"] for r in rows]
  assert len(jsonl.read_text().splitlines()) == 2
  assert len(_csv_rows(os.path.join(workdir, "eval_metrics.csv"))) == 2

  # Other settings are other entries: more samples, or another sampler, evaluate again.
  evaluate.evaluate_checkpoints(
      experiment.build(_config(num_samples=32, batch_size=32, begin_step=15)), workdir)
  assert calls == [1]
  config.sampling.als.step_lr = 0.05
  evaluate.evaluate_checkpoints(experiment.build(config), workdir)
  assert calls == [1, 1, 1]


def test_evaluation_is_reproducible_from_the_seed(workdir):
  first = evaluate.evaluate_checkpoints(experiment.build(_config(begin_step=15)), workdir)
  os.remove(os.path.join(workdir, "eval_metrics.jsonl"))
  second = evaluate.evaluate_checkpoints(experiment.build(_config(begin_step=15)), workdir)
  assert second[0]["mmd_rbf"] == first[0]["mmd_rbf"]


def test_sweep_rerun_reuses_settings_and_plots_them(workdir, monkeypatch, capsys):
  config = _config(sweep_methods=("als", "cas"), sweep_step_lrs=(0.5, 1.0),
                   sweep_steps_per_sigma=(5,), sweep_denoise=(True,), sweep_vmap=False)
  calls = _count_evaluations(monkeypatch)
  rows = evaluate.sampler_sweep(experiment.build(config), workdir)
  # ALS at 0.5 and 1.0; CAS at 1.0 (0.5 is outside its feasibility interval: skipped unsampled).
  assert len(rows) == 4 and len(calls) == 3
  assert [("skipped" in r) for r in rows] == [False, False, True, False]
  capsys.readouterr()
  calls.clear()
  again = evaluate.sampler_sweep(experiment.build(config), workdir)
  assert calls == []
  out = capsys.readouterr().out
  assert "4 of 4 settings reused" in out and "sampler_sweep.png" in out
  assert [r.get("mmd_rbf") for r in again] == [r.get("mmd_rbf") for r in rows]
  table = _csv_rows(os.path.join(workdir, "sampler_sweep.csv"))
  assert [(r["method"], float(r["step_lr"])) for r in table] == [
      ("als", 0.5), ("als", 1.0), ("cas", 0.5), ("cas", 1.0)]
  assert table[2]["skipped"] and table[2]["mmd_rbf"] == ""
  assert os.path.getsize(os.path.join(workdir, "sampler_sweep.png")) > 1000


def test_vmapped_sweep_equals_one_setting_at_a_time(workdir, tmp_path):
  grid = dict(sweep_methods=("als", "cas", "pc"), sweep_step_lrs=(0.5, 0.7, 1.3),
              sweep_steps_per_sigma=(3,), sweep_denoise=(True,))
  copies = {}
  for vmap in (True, False):
    copies[vmap] = str(tmp_path / f"vmap{vmap}")
    shutil.copytree(workdir, copies[vmap], ignore=shutil.ignore_patterns("sampler_sweep*"))
  rows = {v: evaluate.sampler_sweep(experiment.build(_config(**grid, sweep_vmap=v)), copies[v])
          for v in (True, False)}
  # ALS: three step sizes in one program; CAS: 0.7 and 1.3 in one (0.5 infeasible); PC alone.
  assert [r.get("vmapped_settings") for r in rows[True]] == [3, 3, 3, None, 2, 2, None]
  for a, b in zip(rows[True], rows[False]):
    assert ("skipped" in a) == ("skipped" in b)
    if "skipped" not in a:
      np.testing.assert_allclose(a["mmd_rbf"], b["mmd_rbf"], rtol=1e-3, atol=1e-5)


def test_plot_sweep_draws_samplers_without_step_lr_as_levels(tmp_path, monkeypatch):
  drawn = {}
  monkeypatch.setattr(records.plots, "save_lines",
                      lambda curves, path, **kw: drawn.update(curves=curves, **kw))
  rows = [_entry(step_lr=0.2, mmd_rbf=0.3), _entry(step_lr=0.1, mmd_rbf="nan"),
          _entry(method="pc", step_lr=None, mmd_rbf=0.5),
          _entry(method="cas", steps_per_sigma=None, step_lr=0.5, skipped="infeasible")]
  records.plot_sweep(rows, "mmd_rbf", str(tmp_path / "sweep.png"))
  name = "als steps_per_sigma=5 denoise=True"
  assert list(drawn["curves"]) == [name]
  assert drawn["curves"][name][0] == [0.2, 0.1]
  assert drawn["curves"][name][1][0] == 0.3 and math.isnan(drawn["curves"][name][1][1])
  assert drawn["levels"] == {"pc steps_per_sigma=5 denoise=True": 0.5}
  assert drawn["logx"] is True


# --------------------------------------------------------------------------------------------
# MNIST-classifier features.


def _mnist_config(tmp_path: pathlib.Path, images_uint8: np.ndarray, weights: str, *,
                  centered: bool, num_samples: int):
  np.savez(tmp_path / "digits.npz", x=images_uint8)
  config = test_config.get_config()
  config.data.dataset, config.data.path = "npz", str(tmp_path / "digits.npz")
  config.data.image_size, config.data.num_channels = 28, 1
  config.data.centered = centered
  config.eval.features = "mnist_classifier"
  config.eval.mnist_classifier_weights = weights
  config.eval.num_samples, config.eval.batch_size = num_samples, 64
  return config


def _make_evaluator(config, workdir: str, rng):
  exp = experiment.build(config)
  return evaluators.make_evaluator(exp.eval, exp.data, workdir, rng, seed=exp.seed)


def _feature_kind(config) -> str:
  d = config.data
  return evaluators.feature_kind(config.eval.features, dataset=d.dataset,
                                 image_size=d.image_size, num_channels=d.num_channels)


def _to_data_range(images_uint8: np.ndarray, *, centered: bool) -> np.ndarray:
  x = (images_uint8.astype(np.float32) / 255.0)[..., None]
  return 2.0 * x - 1.0 if centered else x



def _fresh_classifier(path: pathlib.Path, seed: int = 0) -> str:
  params = mnist_classifier.MnistClassifier().init(
      jax.random.PRNGKey(seed), np.zeros((1, *mnist_classifier.IMAGE_SHAPE), np.float32))["params"]
  mnist_classifier.save_params(path, jax.device_get(params), "untrained")
  return str(path)


def test_mnist_classifier_features_need_28x28x1_images():
  config = test_config.get_config()
  config.eval.features = "mnist_classifier"
  with pytest.raises(ValueError, match="28x28x1.*toy points"):
    _feature_kind(config)
  config.data.dataset = "cifar10"
  with pytest.raises(ValueError, match="28x28x1.*32x32x3"):
    _feature_kind(config)
  config.data.dataset, config.data.image_size, config.data.num_channels = "mnist", 28, 1
  assert _feature_kind(config) == "mnist_classifier"
  config.eval.features = "auto"
  assert _feature_kind(config) == "inception"


def test_missing_classifier_weights_name_the_training_command(tmp_path, monkeypatch):
  config = test_config.get_config()
  config.data.dataset, config.data.image_size, config.data.num_channels = "mnist", 28, 1
  config.eval.features = "mnist_classifier"
  monkeypatch.setenv("SCORE_JAX_CACHE", str(tmp_path / "cache"))
  default = str(tmp_path / "cache" / mnist_classifier.CACHE_NAME)
  command = "python -m score_jax.eval.mnist_classifier --manual_dir="
  with pytest.raises(ValueError, match=command) as e:
    _make_evaluator(config, str(tmp_path / "run"), jax.random.key(0))
  assert default in str(e.value)
  config.eval.mnist_classifier_weights = str(tmp_path / "absent.npz")
  config.data.manual_dir = "/data/mnist"
  with pytest.raises(ValueError, match="absent.npz.*--manual_dir=/data/mnist"):
    evaluators.classifier_weights_path(config.eval.mnist_classifier_weights,
                                       manual_dir=config.data.manual_dir)
  np.savez(tmp_path / "other.npz", w=np.zeros(3))
  config.eval.mnist_classifier_weights = str(tmp_path / "other.npz")
  with pytest.raises(ValueError, match="MnistClassifier parameters"):
    _make_evaluator(config, str(tmp_path / "run"), jax.random.key(0))


@pytest.mark.parametrize("centered", [False, True])
def test_classifier_evaluator_end_to_end_with_an_untrained_classifier(tmp_path, centered):
  digits = synthetic_digits(200)
  weights = _fresh_classifier(tmp_path / "classifier.npz")
  config = _mnist_config(tmp_path, digits, weights, centered=centered, num_samples=160)
  workdir = str(tmp_path / "run")
  evaluator = _make_evaluator(config, workdir, jax.random.key(0))
  assert evaluator.main_metric == "fid_mnist"
  cache = pathlib.Path(workdir) / "eval_cache" / "ref_stats_mnist_classifier_npz_test_160.npz"
  assert cache.is_file()
  # The reference is the first 160 images: featurizing them again gives the same statistics.
  real = _to_data_range(digits[:160], centered=centered)
  same = evaluator.score(evaluator.featurize(real))
  assert set(same) >= {"fid_mnist", "kid_mnist", "finite_fraction"}
  # 160 images, fewer than a KID subset: every subset is the whole set, so no spread is reported.
  assert "fid" not in same and "kid" not in same and "kid_mnist_std" not in same

  # Samples through the drawing loop: uniform noise, with some non-finite examples.
  def noise_sampler(start, n):
    x = jax.random.uniform(jax.random.key(start), (n, 28, 28, 1),
                           minval=-1.0 if centered else 0.0)
    return x.at[:4].set(jnp.nan)

  drawn = batches.draw_features(noise_sampler, evaluator, num_samples=100, batch_size=64)
  assert drawn["pool"].shape == (100, mnist_classifier.NUM_FEATURES)
  noisy = evaluator.score(drawn)
  assert math.isfinite(noisy["fid_mnist"]) and noisy["fid_mnist"] > 0
  assert noisy["finite_fraction"] == pytest.approx(0.92)
  assert abs(same["fid_mnist"]) < 1e-6 * noisy["fid_mnist"] + 1e-6
  assert noisy["kid_mnist"] > abs(same["kid_mnist"])


def test_classifier_reference_cache_is_keyed_by_the_weights(tmp_path, monkeypatch):
  digits = synthetic_digits(80)
  config = _mnist_config(tmp_path, digits, _fresh_classifier(tmp_path / "a.npz", seed=0),
                         centered=False, num_samples=64)
  workdir = str(tmp_path / "run")
  calls = []
  real = experiment.DataSpec.iterator
  monkeypatch.setattr(experiment.DataSpec, "iterator",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  _make_evaluator(config, workdir, jax.random.key(0))
  _make_evaluator(config, workdir, jax.random.key(0))
  assert len(calls) == 1  # the second evaluator read the cache
  config.eval.mnist_classifier_weights = _fresh_classifier(tmp_path / "b.npz", seed=1)
  _make_evaluator(config, workdir, jax.random.key(0))
  assert len(calls) == 2  # other weights: other features, recomputed
  a = mnist_classifier.load_params(tmp_path / "a.npz")[0]
  assert feature_nets.params_digest(a) == feature_nets.params_digest(jax.tree.map(np.copy, a))
  assert feature_nets.params_digest(a) != feature_nets.params_digest(
      mnist_classifier.load_params(tmp_path / "b.npz")[0])
  np.savez(tmp_path / "inception_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
  config.eval.reference_stats = str(tmp_path / "inception_stats.npz")
  with pytest.raises(ValueError, match="2048-d statistics"):
    _make_evaluator(config, workdir, jax.random.key(0))


def test_classifier_fid_on_real_mnist_digits(tmp_path, mnist_dir):
  """A classifier trained for one short epoch already separates real digits from noise."""
  train_images, train_labels = image_data.load_mnist_raw(mnist_dir, "train")
  params = mnist_classifier.train_classifier(train_images[:2048], train_labels[:2048], epochs=1)
  weights = tmp_path / "classifier.npz"
  mnist_classifier.save_params(weights, params, "first 2048 train digits")
  test_images, _ = image_data.load_mnist_raw(mnist_dir, "test")
  config = _mnist_config(tmp_path, test_images[:1000], str(weights), centered=True,
                         num_samples=500)
  evaluator = _make_evaluator(config, str(tmp_path / "run"), jax.random.key(0))
  score = lambda images: evaluator.score(
      evaluator.featurize(_to_data_range(images, centered=True)))["fid_mnist"]
  same = score(test_images[:500])
  other_real = score(test_images[500:1000])
  noise = score(np.random.default_rng(0).integers(0, 256, (500, 28, 28), dtype=np.uint8))
  print(f"fid_mnist: same digits {same:.3g}, other real digits {other_real:.3g}, "
        f"noise {noise:.3g}")
  assert abs(same) < 1e-6 * noise
  assert 0 < other_real < 0.1 * noise
