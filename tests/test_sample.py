"""Tests for `score_jax.sample`: the sample mode over all devices, inpainting with every sampler.

A freshly initialized toy MLP (configs/test.py, 4 levels) stands in for a trained network: the
properties tested (which samples are drawn, what is written) do not depend on training.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import test as test_config
from score_jax import experiment, models, parallel, plots, sample


@pytest.fixture(scope="module")
def toy():
  config = test_config.get_config()
  config.sampling.num_samples = 70  # more than the traced samples, not a multiple of 8
  config.sampling.batch_size = 24
  state = parallel.replicate(experiment.init_state(config, models.build(config)),
                             parallel.make_mesh())
  return config, state


def test_sample_mode_draws_the_sequence_of_make_sampler(toy, tmp_path):
  config, state = toy
  results = sample.sample_and_write(experiment.build(config), state, str(tmp_path),
                                    methods=("als",))
  assert results["als"]["num_samples"] == 70
  with np.load(tmp_path / "samples" / "als_step0.npz") as f:
    written = f["x"]
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0x5A3), 1)
  expected = experiment.make_sampler(config, state, method="als")(rng, 70)
  np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-5)
  assert (tmp_path / "samples" / "trajectory_step0.png").is_file()


def test_inpainting_runs_the_named_sampler(toy, tmp_path, monkeypatch):
  config, state = toy
  monkeypatch.setattr(plots, "save_inpainting_grid", lambda *a, **k: None)
  x_known = np.full((4, 2), 3.0, np.float32)
  mask = np.array([[1.0, 0.0]] * 4, np.float32)
  exp = experiment.build(config)
  done = {m: sample.inpaint_and_write(exp, state, str(tmp_path), x_known, mask, method=m)
          for m in ("als", "cas", "pc")}
  for m, x in done.items():
    np.testing.assert_array_equal(x[:, 0], 3.0)
    assert np.isfinite(x).all(), m
  # PC is not silently another sampler.
  assert not np.allclose(done["pc"][:, 1], done["als"][:, 1])
  assert not np.allclose(done["pc"][:, 1], done["cas"][:, 1])


def test_sample_mode_runs_the_adaptive_solver_with_per_sample_nfe(toy, tmp_path):
  # The first samples are drawn one per program (trajectory path); the adaptive solver's
  # per-sample evaluation counts come back through vmap, not out of its trace.
  config, state = toy
  config = config.copy_and_resolve_references()
  config.sampling.num_samples = 12
  config.sampling.adaptive.max_iters = 50
  results = sample.sample_and_write(experiment.build(config), state, str(tmp_path),
                                    methods=("adaptive",))
  assert results["adaptive"]["num_samples"] == 12
  assert results["adaptive"]["nfe"] > 0
