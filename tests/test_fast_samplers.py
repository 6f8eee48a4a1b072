"""Fast samplers with exact scores: ODE convergence orders, NFE, keys, mixture recovery, CAS."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import noise, samplers, toy

MIX = toy.ncsn_mixture()
ODE_SAMPLERS = ("euler", "heun", "dpm_solver_pp_2m")


def _counting(score_fn):
  calls = []

  def fn(x, sigma):
    jax.debug.callback(lambda: calls.append(1))
    return score_fn(x, sigma)

  return fn, calls


def test_karras_sigmas_is_edm_eq5():
  s = np.asarray(noise.karras_sigmas(80.0, 0.002, 18))
  assert s.shape == (18,) and np.all(np.diff(s) < 0)
  np.testing.assert_allclose([s[0], s[-1]], [80.0, 0.002], rtol=1e-5)
  i = 5
  expected = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
  np.testing.assert_allclose(s[i], expected, rtol=1e-5)
  np.testing.assert_allclose(noise.karras_sigmas(10.0, 1.0, 4, rho=1.0), [10, 7, 4, 1], rtol=1e-6)
  with pytest.raises(ValueError, match="rho"):
    noise.karras_sigmas(10.0, 1.0, 4, rho=0.0)


@pytest.mark.parametrize("name,order", [("euler", 1.0), ("heun", 2.0), ("dpm_solver_pp_2m", 2.0)])
def test_ode_samplers_converge_at_their_order_on_gaussian_data(name, order):
  # For N(mu, s^2 I) data the probability-flow ODE solution is
  # x(sigma) = mu + (x0 - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma0^2)).
  mu, s, sigma_max = np.array([1.0, -0.5]), 0.5, 10.0
  g = toy.Gaussian(mu, s)
  x0 = sigma_max * jax.random.normal(jax.random.key(0), (16, 2)) + mu
  exact = mu + (x0 - mu) * s / np.sqrt(s ** 2 + sigma_max ** 2)
  fn = jax.jit(functools.partial(getattr(samplers, name), g.score))
  steps = [8, 16, 32]
  errors = [float(jnp.max(jnp.abs(fn(x0, noise.karras_sigmas(sigma_max, 0.002, n)) - exact)))
            for n in steps]
  slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
  assert abs(slope - order) < 0.3, (errors, slope)


@pytest.mark.parametrize("name,nfe", [("euler", 7), ("heun", 13), ("dpm_solver_pp_2m", 7)])
def test_ode_sampler_nfe_is_the_number_of_score_calls(name, nfe):
  score, calls = _counting(MIX.score)
  run = jax.jit(lambda x: getattr(samplers, name)(score, x, noise.karras_sigmas(20.0, 0.01, 7),
                                                  return_info=True))
  x, info = run(jnp.ones((4, 2)))
  jax.block_until_ready(x)
  assert info["nfe"] == nfe == len(calls)


def test_churned_heun_keys_are_per_example_and_churn_needs_a_key():
  sigmas = noise.karras_sigmas(20.0, 0.01, 10)
  run = jax.jit(lambda x, r: samplers.heun(MIX.score, x, sigmas, r, s_churn=10.0))
  keys = jax.random.split(jax.random.key(1), 32)
  x0 = 20.0 * jax.random.normal(jax.random.key(2), (32, 2))
  np.testing.assert_allclose(run(x0[:5], keys[:5]), run(x0, keys)[:5], rtol=1e-5, atol=1e-5)
  deterministic = jax.jit(lambda x: samplers.heun(MIX.score, x, sigmas))(x0[:5])
  assert not np.allclose(run(x0[:5], keys[:5]), deterministic)
  with pytest.raises(ValueError, match="pass an rng"):
    samplers.heun(MIX.score, x0, sigmas, s_churn=1.0)
  with pytest.raises(ValueError, match="s_tmin"):
    samplers.euler(MIX.score, x0, sigmas, s_tmin=2.0, s_tmax=1.0)
  with pytest.raises(ValueError, match="descending"):
    samplers.dpm_solver_pp_2m(MIX.score, x0, sigmas[::-1])
