"""--mode=likelihood's host loop: rows with their protocol, resumable batches, the toy truth."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from score_jax import experiment, likelihood, likelihood_eval, models, toy, train
from score_jax.score import make_score_fn


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The test config trained for a few steps, and its workdir."""
  workdir = str(tmp_path_factory.mktemp("lik") / "run")
  config = test_config.get_config()
  config.training.num_train_steps = 30
  config.training.eval_every_steps = 30
  config.training.ckpt_every_steps = 30
  config.training.log_every_steps = 30
  config.noise.sigma_min = 0.5
  config.likelihood.num_examples = 24
  config.likelihood.batch_size = 16
  train.train_and_evaluate(experiment.build(config), workdir)
  return workdir


def _settings(config):
  config.likelihood.num_examples = 24
  config.likelihood.batch_size = 16
  return config


def test_rows_carry_the_protocol_and_match_a_direct_solve(trained, monkeypatch):
  monkeypatch.setattr(likelihood_eval, "GRID_POINTS", 4)
  config, state = experiment.load_checkpoint(trained)
  row = likelihood_eval.run(experiment.build(_settings(config)), state, trained, progress=False)
  assert row["metric"] == "nll_nats" and row["trace"] == "exact" and row["repeats"] == 1
  assert row["num_examples"] == 24 and row["sigma_min"] == pytest.approx(0.5)
  assert row["sigma_max"] == pytest.approx(20.0) and "N(0, sigma_min^2 I)" in row["measures"]
  assert row["num_failed"] == 0 and row["nfe_max"] >= row["nfe_mean"] > 0
  assert np.isfinite([row["mean"], row["se"], row["true_mean"], row["minus_true_mean"]]).all()
  # A few steps of training already put the model within a few nats of the exact score's NLL
  # under the same protocol, which itself lies near the truth (prior N(0, 20^2 I)).
  assert abs(row["minus_exact_mean"]) < 5.0
  assert abs(row["exact_mean"] - row["true_mean"]) < 0.1
  assert row["minus_exact_mean"] == pytest.approx(row["mean"] - row["exact_mean"], abs=1e-5)

  # The sharded, padded batches give the values one direct solve of all examples gives.
  exp = experiment.build(config)
  x = likelihood_eval.eval_examples(exp.likelihood, exp.data, seed=exp.seed)
  score_fn = make_score_fn(models.build(config), state.ema_params[0])
  logp, _ = likelihood.log_prob(score_fn, jnp.asarray(x), sigma_min=0.5, sigma_max=20.0)
  assert row["mean"] == pytest.approx(float(-np.mean(logp)), rel=1e-4, abs=1e-4)
  truth = -toy.get_toy("ncsn_mixture").log_prob(jnp.asarray(x), 0.5)
  assert row["true_mean"] == pytest.approx(float(np.mean(truth)), rel=1e-5)

  rows = [json.loads(line) for line in open(os.path.join(trained, "likelihood.jsonl"))]
  assert len(rows) == 1 and rows[0]["mean"] == row["mean"]
  header = open(os.path.join(trained, "likelihood.csv")).readline().strip().split(",")
  assert header == list(likelihood_eval.CSV_COLUMNS)
  assert os.path.isfile(os.path.join(trained, "likelihood_step30.png"))


def test_resume_reuses_finished_batches(trained, monkeypatch):
  monkeypatch.setattr(likelihood_eval, "GRID_POINTS", 4)
  config, state = experiment.load_checkpoint(trained)
  config = _settings(config)
  first = likelihood_eval.run(experiment.build(config), state, trained, progress=False)
  folder = os.path.join(trained, "likelihood",
                        likelihood_eval._protocol_id(
                            likelihood_eval.protocol(experiment.build(config), 30)))
  # A stored batch stands in for a rerun: mark its values, delete the other batch, rerun.
  done = os.path.join(folder, "batch_00000000.npz")
  stored = dict(np.load(done))
  stored["logp"] = stored["logp"] - 1.0
  np.savez(done, **stored)
  os.remove(os.path.join(folder, "batch_00000016.npz"))
  second = likelihood_eval.run(experiment.build(config), state, trained, progress=False)
  assert second["mean"] == pytest.approx(first["mean"] + 16 / 24, rel=1e-6)
  assert os.path.isfile(os.path.join(folder, "batch_00000016.npz"))
  rows = [json.loads(line) for line in open(os.path.join(trained, "likelihood.jsonl"))]
  assert len(rows) == 1  # the same protocol replaces its row

  # Another protocol (fewer examples) is a new row with batches of its own.
  config.likelihood.num_examples = 8
  likelihood_eval.run(experiment.build(config), state, trained, progress=False)
  rows = [json.loads(line) for line in open(os.path.join(trained, "likelihood.jsonl"))]
  assert sorted(r["num_examples"] for r in rows) == [8, 24]


@pytest.mark.parametrize("field,value,match", [
    ("trace", "hutch", "likelihood.trace='hutch' is unknown"),
    ("num_examples", 0, "likelihood.num_examples=0 must be >= 1"),
    ("rtol", 0.0, "likelihood.rtol=0.0 must be > 0"),
])
def test_bad_settings_fail_before_any_work(trained, tmp_path, field, value, match):
  config, state = experiment.load_checkpoint(trained)
  config.likelihood[field] = value
  with pytest.raises(ValueError, match=match):
    likelihood_eval.run(experiment.build(config), state, str(tmp_path / "out"), progress=False)
  assert not (tmp_path / "out").exists()



def test_non_finite_parameters_stop_before_any_work(trained, tmp_path):
  import jax
  config, state = experiment.load_checkpoint(trained)
  nan = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), state.ema_params[0])
  state = state.replace(ema_params=(nan,) + tuple(state.ema_params[1:]))
  with pytest.raises(likelihood_eval.NothingFiniteError, match="are not finite") as info:
    likelihood_eval.run(experiment.build(_settings(config)), state, str(tmp_path / "out"),
                        progress=False)
  assert "\n" not in str(info.value)
  assert not (tmp_path / "out").exists()


def test_a_run_whose_every_solve_failed_is_refused(trained, tmp_path):
  import jax
  config, state = experiment.load_checkpoint(trained)
  # Finite parameters whose scores overflow: every solve ends non-finite.
  huge = jax.tree.map(lambda a: a * 1e30, state.ema_params[0])
  state = state.replace(ema_params=(huge,) + tuple(state.ema_params[1:]))
  config = _settings(config)
  config.likelihood.num_examples = 8
  config.likelihood.batch_size = 8
  with pytest.raises(likelihood_eval.NothingFiniteError, match="every one of the 8") as info:
    likelihood_eval.run(experiment.build(config), state, str(tmp_path / "out"), progress=False)
  assert "\n" not in str(info.value)
  assert not (tmp_path / "out" / "likelihood.jsonl").exists()


def test_partial_failures_warn_in_one_line(capsys):
  failed = np.zeros((6, 2), bool)
  likelihood_eval._check_solves(failed, 5, "lik/x")
  assert capsys.readouterr().err == ""
  failed[2, 1] = True
  likelihood_eval._check_solves(failed, 5, "lik/x")
  err = capsys.readouterr().err
  assert err.startswith("warning: 1 of the 12 likelihood solves at step 5") and err.count("\n") == 1
