"""Tests for resumable, all-device evaluation: per-batch feature caches, identities of rows.

* An evaluation interrupted after k batches, rerun, draws only the remaining batches.
* Classifier features over 8 devices equal those over 1.
* A change of the reference statistics or of the feature weights changes the entry key, so the
  stored row is not reused.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import test as test_config
from score_jax import evaluate, experiment, parallel
from score_jax.eval import batches, evaluators, feature_nets, mnist_classifier, records


def _noise_sampler(calls: list[int]):
  def sample_batch(start, n):
    calls.append(start)
    return np.asarray(jax.random.uniform(jax.random.key(start), (n, 3)))
  return sample_batch


class _Interrupt(Exception):
  pass


def _evaluator(fail_after: int | None = None) -> evaluators.Evaluator:
  seen = []

  def featurize(x):
    if fail_after is not None and len(seen) == fail_after:
      raise _Interrupt()
    seen.append(len(x))
    return {"x": 2.0 * x}

  return evaluators.Evaluator(main_metric="m", featurize=featurize,
                              score=lambda f: {"m": float(f["x"].mean())})


def test_interrupted_evaluation_redraws_only_unfinished_batches(tmp_path):
  cache = str(tmp_path / "batches")
  kwargs = dict(num_samples=50, batch_size=8, cache_dir=cache)  # 7 batches, the last short
  calls = []
  with pytest.raises(_Interrupt):
    batches.draw_features(_noise_sampler(calls), _evaluator(fail_after=3), **kwargs)
  assert calls == [0, 8, 16, 24]  # the fourth batch was drawn, its features never finished
  calls.clear()
  resumed = batches.draw_features(_noise_sampler(calls), _evaluator(), **kwargs)
  assert calls == [24, 32, 40, 48]
  whole = batches.draw_features(_noise_sampler([]), _evaluator(), num_samples=50, batch_size=8)
  np.testing.assert_array_equal(resumed["x"], whole["x"])
  assert resumed["x"].shape == (50, 3)


def test_batch_cache_dirs_differ_by_entry_and_batch_size(tmp_path):
  entry = {"step": 1, "method": "als", "num_samples": 10, "features": "toy", "seed": 0}
  a = batches.batch_cache_dir(str(tmp_path), [entry], 8)
  assert a == batches.batch_cache_dir(str(tmp_path), [dict(entry)], 8)
  assert a != batches.batch_cache_dir(str(tmp_path), [entry], 16)
  assert a != batches.batch_cache_dir(str(tmp_path), [{**entry, "reference_digest": "x"}], 8)


@pytest.fixture(scope="module")
def classifier_params():
  return mnist_classifier.MnistClassifier().init(
      jax.random.PRNGKey(0), np.zeros((1, *mnist_classifier.IMAGE_SHAPE), np.float32))["params"]


def test_classifier_features_on_eight_devices_equal_one(classifier_params):
  images = np.asarray(jax.random.uniform(jax.random.key(0), (13, 28, 28, 1)))
  one = feature_nets.classifier_features_fn(classifier_params, parallel.make_mesh(1))(images)
  eight = feature_nets.classifier_features_fn(classifier_params, parallel.make_mesh(8))(images)
  assert eight.shape == (13, mnist_classifier.NUM_FEATURES)
  np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-5)


def test_changed_reference_or_weights_are_evaluated_again(tmp_path, classifier_params):
  config = test_config.get_config()
  config.data.dataset, config.data.image_size, config.data.num_channels = "npz", 28, 1
  config.data.path = str(tmp_path / "unused.npz")
  config.eval.features = "mnist_classifier"
  weights = [tmp_path / "w0.npz", tmp_path / "w1.npz"]
  mnist_classifier.save_params(weights[0], jax.device_get(classifier_params), "untrained")
  other = jax.tree.map(lambda v: v + 0.01, classifier_params)
  mnist_classifier.save_params(weights[1], jax.device_get(other), "untrained")
  rng = np.random.default_rng(0)
  for name in ("a", "b"):
    np.savez(tmp_path / f"{name}.npz", mu=rng.normal(size=128),
             sigma=np.eye(128) * rng.uniform(1, 2))

  def key(weights_path, reference):
    config.eval.mnist_classifier_weights = str(weights_path)
    config.eval.reference_stats = str(tmp_path / reference)
    exp = experiment.build(config)
    evaluator = evaluators.make_evaluator(exp.eval, exp.data, str(tmp_path), jax.random.key(0),
                                          seed=exp.seed)
    entry = evaluate._entry(exp, evaluator, "mnist_classifier", step=10, method="als")
    assert entry["protocol"] == f"{config.eval.num_samples} samples against statistics file " \
                                f"{reference}"
    return records.entry_key(entry)

  base = key(weights[0], "a.npz")
  assert key(weights[0], "a.npz") == base
  assert key(weights[0], "b.npz") != base  # another reference: evaluated again
  assert key(weights[1], "a.npz") != base  # other feature weights: evaluated again
