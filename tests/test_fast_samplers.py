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


def _churned_variance(sigmas, mu_std, sigma_max, gamma, s_tmin, s_tmax, heun):
  """The output variance of EDM's churned Euler/Heun on N(mu, s^2) data with the exact score.

  With the exact denoiser every step is affine in x - mu: d = k(sigma) (x - mu) with
  k(sigma) = sigma / (s^2 + sigma^2), so the variance follows v <- A^2 (v + c^2), c the churn std.
  """
  k = lambda sigma: sigma / (mu_std ** 2 + sigma ** 2)
  sigmas = np.append(np.asarray(sigmas, np.float64), 0.0)
  v = mu_std ** 2 + sigma_max ** 2
  for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
    g = gamma if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (1.0 + g)
    a = 1.0 + (sigma_next - sigma_hat) * k(sigma_hat)
    if heun and sigma_next > 0:
      a = 1.0 + (sigma_next - sigma_hat) * 0.5 * (k(sigma_hat) + k(sigma_next) * a)
    v = a ** 2 * (v + sigma_hat ** 2 - sigma ** 2)
  return v


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("batch", [4, 64, 1000, 20000])
def test_churn_with_a_finite_s_tmin_is_finite_and_has_the_closed_form_variance(name, batch):
  # EDM's ImageNet setting (s_tmin = 0.05) leaves the last levels unchurned: gamma = 0 there,
  # where sigma_hat^2 - sigma^2 once evaluated to a tiny negative number and NaN.
  mu, s0, sigma_max = 0.3, 0.5, 20.0
  g = toy.Gaussian(np.array([mu]), s0)
  sigmas = noise.karras_sigmas(sigma_max, 0.01, 10)
  x0 = mu + np.sqrt(s0 ** 2 + sigma_max ** 2) * jax.random.normal(jax.random.key(0), (batch, 1))
  run = jax.jit(lambda x, r: getattr(samplers, name)(g.score, x, sigmas, r, s_churn=40.0,
                                                     s_tmin=0.05, s_tmax=50.0))
  x = np.asarray(run(x0, jax.random.key(1)), np.float64)
  assert np.all(np.isfinite(x))
  if batch >= 1000:
    v = _churned_variance(sigmas, s0, sigma_max, min(40.0 / 10, np.sqrt(2) - 1), 0.05, 50.0,
                          heun=name == "heun")
    se = v * np.sqrt(2.0 / (batch - 1))
    assert abs(x.var() - v) < 5 * se, (x.var(), v, se)


def _marginal_samples(mix, n, sigma_max, seed):
  """Exact samples of the data convolved with N(0, sigma_max^2 I)."""
  data_rng, noise_rng = jax.random.split(jax.random.key(seed))
  return mix.sample(data_rng, n) + sigma_max * jax.random.normal(noise_rng, (n, mix.dim))


def _mode_stats(x, mix):
  x = np.asarray(x, np.float64)
  means = np.asarray(mix.means)
  nearest = np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)
  weights = np.bincount(nearest, minlength=len(means)) / len(x)
  variances = np.array([x[nearest == k].var(0).mean() for k in range(len(means))])
  return weights, variances


@pytest.mark.parametrize("name,num_steps", [("heun", 25), ("dpm_solver_pp_2m", 25)])
def test_ode_samplers_recover_the_mixture_from_its_exact_marginal(name, num_steps):
  # Started from exact samples at sigma_max, only the solver's error remains.
  x0 = _marginal_samples(MIX, 2000, 20.0, seed=1)
  sigmas = noise.karras_sigmas(20.0, 0.01, num_steps)
  x, info = jax.jit(lambda x: getattr(samplers, name)(MIX.score, x, sigmas,
                                                      return_info=True))(x0)
  weights, variances = _mode_stats(x, MIX)
  assert info["nfe"] <= 50
  np.testing.assert_allclose(weights, [0.2, 0.8], atol=0.02)
  np.testing.assert_allclose(variances, 1.0, rtol=0.1)


def _adaptive(x0, rng, **kw):
  return jax.jit(lambda x, r: samplers.adaptive(MIX.score, x, r, sigma_max=20.0, sigma_min=0.01,
                                                abs_tol=0.0078, rel_tol=0.05, return_info=True,
                                                **kw))(x0, rng)


def test_adaptive_recovers_the_2d_mixture_with_a_fifth_of_als_nfe():
  # In 2-D the error norm averages over two coordinates only, so an accept/reject test that
  # selected the Gaussian draws would show here; the Brownian tree keeps the path fixed.
  x0 = _marginal_samples(MIX, 10_000, 20.0, seed=1)
  truth = np.asarray(MIX.sample(jax.random.key(3), 1000))
  x, info = _adaptive(x0, jax.random.key(0))
  weights, variances = _mode_stats(x, MIX)
  np.testing.assert_allclose(weights, [0.2, 0.8], atol=0.02)
  np.testing.assert_allclose(variances, 1.0, rtol=0.1)
  assert bool(jnp.all(info["done"])) and info["nfe"].shape == (10_000,)
  nfe = float(jnp.mean(info["nfe"]))
  assert nfe <= 200
  # ALS with five times the adaptive solver's NFE (Technique 4 step size) does no better.
  sigmas = noise.geometric_sigmas(20.0, 0.01, int(np.ceil(nfe)))
  step_lr = noise.step_lr_from_variance_recursion(0.01, float(sigmas[0] / sigmas[1]), 5)
  als, als_info = jax.jit(lambda x, r: samplers.annealed_langevin(
      MIX.score, x, sigmas, r, step_lr=step_lr, steps_per_sigma=5, denoise=True,
      return_info=True))(x0[:1000], jax.random.key(0))
  assert als_info["nfe"] >= 5 * nfe
  assert toy.energy_distance(x[:1000], truth) <= toy.energy_distance(als, truth)


def test_adaptive_redraw_is_the_papers_biased_selection_in_2d():
  # The paper's fresh draw per attempt, kept as an option: acceptance favours small draws.
  x0 = _marginal_samples(MIX, 4000, 20.0, seed=1)
  x, _ = _adaptive(x0, jax.random.key(0), noise="redraw")
  weights, variances = _mode_stats(x, MIX)
  assert weights[0] > 0.22 and np.all(variances > 1.15), (weights, variances)
  with pytest.raises(ValueError, match="noise"):
    samplers.adaptive(MIX.score, x0, jax.random.key(0), sigma_max=20.0, sigma_min=0.01,
                      noise="fresh")


def test_brownian_tree_is_one_path_whatever_the_queries():
  keys = jax.random.split(jax.random.key(0), 20_000)
  like = jnp.zeros((20_000, 1))
  at = lambda t: np.asarray(samplers._brownian_tree(keys, jnp.full((20_000,), t), like),
                            np.float64)
  w1, w2, w3 = at(0.3), at(0.3004), at(0.9)
  np.testing.assert_array_equal(at(0.0), 0.0)
  np.testing.assert_array_equal(at(0.3004), w2)  # the same path at a repeated query
  # Increments over disjoint intervals: variance the interval's length, uncorrelated.
  d1, d2 = (w2 - w1)[:, 0], (w3 - w2)[:, 0]
  np.testing.assert_allclose([d1.var() / 0.0004, d2.var() / 0.5996], 1.0, atol=0.05)
  assert abs(np.corrcoef(d1, d2)[0, 1]) < 0.03


def test_adaptive_per_example_keys_nfe_and_inputs():
  score, calls = _counting(MIX.score)
  keys = jax.random.split(jax.random.key(5), 16)
  x0 = _marginal_samples(MIX, 16, 20.0, seed=2)
  run = jax.jit(lambda x, r: samplers.adaptive(score, x, r, sigma_max=20.0, sigma_min=0.01,
                                               rel_tol=0.1, return_info=True))
  x, info = run(x0, keys)
  jax.block_until_ready(x)
  # Every loop iteration evaluates the batch twice; the final denoising once.
  assert int(jnp.max(info["nfe"])) == len(calls)
  assert int(jnp.min(info["nfe"])) < int(jnp.max(info["nfe"]))
  np.testing.assert_array_equal(info["nfe"], 2 * (info["accepted"] + info["rejected"]) + 1)
  small, small_info = run(x0[:3], keys[:3])
  np.testing.assert_allclose(small, x[:3], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(small_info["nfe"], info["nfe"][:3])
  with pytest.raises(ValueError, match="rel_tol"):
    samplers.adaptive(MIX.score, x0, keys, sigma_max=20.0, sigma_min=0.01, rel_tol=-1.0)
  with pytest.raises(ValueError, match="sigma_max"):
    samplers.adaptive(MIX.score, x0, keys, sigma_max=0.001, sigma_min=0.01)


def test_cas_at_eta_one_minus_gamma_is_euler_on_the_probability_flow_ode():
  sigmas = noise.karras_sigmas(20.0, 0.05, 12)  # ratios vary per level
  gamma = np.asarray(sigmas[1:] / sigmas[:-1])
  eta = np.append(1.0 - gamma, 0.5)  # the last level's eta is unused with denoise
  x0 = _marginal_samples(MIX, 64, 20.0, seed=4)
  cas = jax.jit(lambda x: samplers.consistent_annealed(MIX.score, x, sigmas, jax.random.key(0),
                                                       eta=eta, denoise=True))(x0)
  euler = jax.jit(lambda x: samplers.euler(MIX.score, x, sigmas))(x0)
  np.testing.assert_allclose(cas, euler, rtol=1e-5, atol=1e-5)


def test_cas_at_eta_one_minus_gamma_squared_is_the_ancestral_step():
  sigmas = noise.karras_sigmas(20.0, 0.5, 6)
  x = _marginal_samples(MIX, 64, 20.0, seed=5)
  run = jax.jit(lambda x, ladder, eta, r: samplers.consistent_annealed(MIX.score, x, ladder, r,
                                                                      eta=eta))
  for i in range(5):
    s, s_next = sigmas[i], sigmas[i + 1]
    rng = jax.random.key(i)
    # A two-level ladder whose last level has eta = 0 (x left as it is): one CAS step.
    cas = run(x, sigmas[i:i + 2], jnp.array([1.0 - (s_next / s) ** 2, 0.0]), rng)
    z = samplers._normal(rng, samplers._step_inputs(rng, 2)[0], x)
    x = (x + (s ** 2 - s_next ** 2) * MIX.score(x, jnp.full((64,), s))
         + s_next * jnp.sqrt(1.0 - (s_next / s) ** 2) * z)
    np.testing.assert_allclose(cas, x, rtol=1e-5, atol=1e-5)


def test_cas_eta_feasibility_is_inclusive_of_the_euler_end():
  sigmas = noise.geometric_sigmas(20.0, 1.0, 5)
  gamma = float(sigmas[1] / sigmas[0])
  x0 = jnp.zeros((2, 2))
  samplers.consistent_annealed(MIX.score, x0, sigmas, jax.random.key(0), eta=1.0 - gamma)
  step_lr = float(sigmas[-1]) ** 2 * (1.0 - gamma)
  samplers.consistent_annealed(MIX.score, x0, sigmas, jax.random.key(0), step_lr=step_lr)
  with pytest.raises(ValueError, match="infeasible at level 0"):
    samplers.consistent_annealed(MIX.score, x0, sigmas, jax.random.key(0), eta=0.9 - gamma)
  with pytest.raises(ValueError, match="one value per level"):
    samplers.consistent_annealed(MIX.score, x0, sigmas, jax.random.key(0), eta=np.ones(3))
  with pytest.raises(ValueError, match="exactly one of step_lr and eta"):
    samplers.consistent_annealed(MIX.score, x0, sigmas, jax.random.key(0), step_lr=0.5, eta=0.5)


def test_deterministic_sampler_carries_the_prior_mismatch_into_the_mode_weights():
  # From N(0, sigma_max^2 I) instead of the true marginal, the ODE maps the mismatch straight
  # into the weights: sigma_max = 20 leaves too much mass in the small mode, sigma_max = 200
  # (where the prior is close to the marginal) does not. ALS from sigma_max = 20 corrects it
  # (tests/test_samplers.py).
  def small_mode_weight(sigma_max):
    x0 = sigma_max * jax.random.normal(jax.random.key(2), (2000, 2))
    sigmas = noise.karras_sigmas(sigma_max, 0.01, 25)
    x = jax.jit(lambda x: samplers.heun(MIX.score, x, sigmas))(x0)
    return toy.mode_weights(x, MIX.means)[0]

  assert small_mode_weight(20.0) > 0.24
  assert abs(small_mode_weight(200.0) - 0.2) < 0.02
