"""Non-finite values: an overflowing update is never saved; all-NaN samples are an error."""

import os

import jax
import numpy as np
import pytest

from configs import test as test_config
from score_jax import experiment, sample, sampling, train


def _config(**training):
  config = test_config.get_config()
  config.training.eval_every_steps = None
  for k, v in {"num_train_steps": 2, "ckpt_every_steps": 1, "log_every_steps": 1,
               **training}.items():
    config.training[k] = v
  return config


def test_overflowing_update_is_never_saved_and_the_last_good_step_is_named(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(experiment.build(_config()), workdir, num_devices=1)
  # Step 3's loss and gradient are finite; its update with lr=1e39 overflows the parameters.
  config = _config(num_train_steps=3)
  config.optim.lr = 1e39
  with pytest.raises(train.TrainingError, match="last good checkpoint: 2 ") as e:
    train.train_and_evaluate(experiment.build(config), workdir, num_devices=1)
  assert "state at step 3 is non-finite" in str(e.value) and "\n" not in str(e.value)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  assert not (tmp_path / "train.lock").read_text()  # released
  _, state = experiment.load_checkpoint(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state)))


def test_all_nonfinite_samples_are_an_error_and_nothing_is_written(tmp_path):
  workdir = str(tmp_path)
  config = _config(num_train_steps=1)
  state = train.train_and_evaluate(experiment.build(config), workdir, num_devices=1)
  config.sampling.als.step_lr = 1e30
  with pytest.raises(sampling.NonFiniteSamplesError, match="all 64 samples of als") as e:
    sample.sample_and_write(experiment.build(config), state, workdir, methods=("als",))
  assert "\n" not in str(e.value) and "Lower sampling.als.step_lr or check" in str(e.value)
  assert not list(tmp_path.glob("samples/*"))


def test_metrics_use_the_finite_samples_only():
  from score_jax.eval import evaluators
  seen = []
  evaluator = evaluators.Evaluator(main_metric="m", featurize=lambda x: {"x": x},
                                   score=lambda f: seen.append(f["x"]) or {"m": f["x"].mean()})
  x = np.arange(8, dtype=np.float32).reshape(4, 2)
  x[1, 0] = np.nan
  row = evaluators.score_finite(evaluator, {"x": x})
  assert row == {"m": np.delete(x, 1, axis=0).mean(), "finite_fraction": 0.75}
  none = evaluators.score_finite(evaluator, {"x": np.full_like(x, np.inf)})
  assert none == {"finite_fraction": 0.0}
  assert len(seen) == 1  # no metric computed on all-non-finite samples
