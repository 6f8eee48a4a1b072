"""Toy distributions: exact perturbed scores and log densities; metrics on known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import toy


@pytest.mark.parametrize("name", sorted(toy.DATASETS))
def test_every_toy_samples(name):
  t = toy.get_toy(name, dim=3)
  x = np.asarray(t.sample(jax.random.key(0), 500))
  assert x.shape == (500, t.dim) and np.isfinite(x).all()


@pytest.mark.parametrize("dist", [toy.ncsn_mixture(), toy.mixture_1d(), toy.eight_gaussians(),
                                  toy.Gaussian(np.ones(3), 0.5), toy.PointMass(np.zeros(2))])
def test_score_is_gradient_of_log_prob(dist):
  x = 3.0 * jax.random.normal(jax.random.key(1), (5, dist.dim))
  sigma = jnp.full((5,), 0.7)
  auto = jax.vmap(jax.grad(lambda xi, si: dist.log_prob(xi[None], si[None])[0]))(x, sigma)
  np.testing.assert_allclose(dist.score(x, sigma), auto, rtol=1e-4, atol=1e-5)


def test_perturbed_gaussian_closed_forms():
  g = toy.Gaussian(np.array([1.0, 2.0]), 0.5)
  x = jnp.array([[0.0, 0.0]])
  # Data N(mu, s^2) perturbed by sigma: score (mu - x) / (s^2 + sigma^2) (STYLE.md known answer).
  np.testing.assert_allclose(g.score(x, jnp.array([1.0])), [[1.0 / 1.25, 2.0 / 1.25]], rtol=1e-6)
  expected_logp = -0.5 * 5.0 / 1.25 - np.log(2 * np.pi * 1.25)
  np.testing.assert_allclose(g.log_prob(x, jnp.array([1.0])), [expected_logp], rtol=1e-5)


def test_mixture_sampling_weights_and_metrics():
  mix = toy.ncsn_mixture()
  x = np.asarray(mix.sample(jax.random.key(2), 20000))
  np.testing.assert_allclose(toy.mode_weights(x, mix.means), [0.2, 0.8], atol=0.01)
  y = np.asarray(mix.sample(jax.random.key(3), 1000))
  shifted = y + 3.0
  assert abs(toy.mmd_rbf(x[:1000], y)) < 0.01 < toy.mmd_rbf(shifted, y)
  assert toy.energy_distance(x[:1000], y) < 0.15 < 1.0 < toy.energy_distance(shifted, y)
  err = toy.gaussian_moment_errors(np.random.RandomState(0).randn(20000, 2), [0, 0], 1.0)
  assert err["mean_error"] < 0.03 and err["std_error"] < 0.02


def test_unknown_toy():
  with pytest.raises(ValueError, match="ncsn_mixture"):
    toy.get_toy("moons")


def test_toy_processes_read_their_rows_of_the_one_process_global_batch():
  from score_jax import data
  one = data.create_iterator(dataset="ncsn_mixture", batch_size=8, seed=4)
  shards = [data.create_iterator(dataset="ncsn_mixture", batch_size=2, seed=4, shard_index=p,
                                 shard_count=4) for p in range(4)]
  for _ in range(3):
    np.testing.assert_array_equal(np.concatenate([next(s)["x"] for s in shards]), next(one)["x"])
  resumed = data.create_iterator(dataset="ncsn_mixture", batch_size=8, seed=4)
  resumed.set_state(shards[1].get_state())
  np.testing.assert_array_equal(next(resumed)["x"], next(one)["x"])
