"""Likelihood through the probability-flow ODE against closed forms, and the ODE solver."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import likelihood as lik
from score_jax import ode, plots, toy
from score_jax.score import broadcast_sigma

SIGMA_MIN = 0.01


def test_dopri5_exponential_forward_backward_per_example():
  lam = jnp.array([-1.0, -3.0, 0.5, 2.0])
  y0 = {"a": jnp.ones((4, 3)), "b": jnp.zeros((4,))}
  field = lambda t, y: {"a": lam[:, None] * y["a"], "b": jnp.cos(t)}
  solve = jax.jit(lambda y, t0, t1: ode.dopri5(field, y, t0, t1, rtol=1e-7, atol=1e-7))
  y1, stats = solve(y0, 0.0, 2.0)
  np.testing.assert_allclose(y1["a"], jnp.exp(2 * lam)[:, None] * jnp.ones((4, 3)), rtol=1e-5)
  np.testing.assert_allclose(y1["b"], jnp.full((4,), math.sin(2.0)), atol=1e-6)
  assert bool(jnp.all(stats.success))
  # Per-example step control: the fast-changing examples take more steps.
  assert int(stats.num_accepted[1]) > int(stats.num_accepted[2])
  y_back, _ = solve(y1, 2.0, 0.0)
  np.testing.assert_allclose(y_back["a"], y0["a"], rtol=2e-5)
  np.testing.assert_allclose(y_back["b"], y0["b"], atol=1e-6)


def test_dopri5_is_fifth_order():
  field = lambda t, y: -y * jnp.cos(t)[:, None]
  y0 = jnp.ones((1, 1))
  exact = math.exp(-math.sin(3.0))
  errs = []
  for tol in (1e-4, 1e-6):  # tolerances are traced: one compilation
    y, stats = ode.dopri5(field, y0, 0.0, 3.0, rtol=tol, atol=tol)
    errs.append((abs(float(y[0, 0]) - exact), int(stats.num_accepted[0])))
  (e1, n1), (e2, n2) = errs
  assert e2 < e1 and e2 < 1e-5
  # 100x tighter tolerance costs about 100^(1/5) = 2.5x the steps for a 5th-order method.
  assert 1.6 < n2 / n1 < 4.0


def test_dopri5_budget_and_bad_input():
  _, stats = ode.dopri5(lambda t, y: -50 * y, jnp.ones((2, 1)), 0.0, 10.0, rtol=1e-9,
                        atol=1e-9, max_steps=3)
  assert not bool(jnp.any(stats.success))
  with pytest.raises(ValueError, match="leading axis"):
    ode.dopri5(lambda t, y: y, (jnp.ones((2, 1)), jnp.ones((3,))), 0.0, 1.0)


def _rotated_gaussian(d, seed=0):
  """N(mu, C) with a random full covariance C = Q diag(lam) Q^T: exact score and closed form."""
  r = np.random.default_rng(seed)
  q, _ = np.linalg.qr(r.normal(size=(d, d)))
  lam = np.linspace(0.3, 2.0, d) ** 2
  mu = r.normal(size=d)
  qj, lamj, muj = (jnp.asarray(v, jnp.float32) for v in (q, lam, mu))

  def score(x, sigma):
    coef = 1.0 / (lamj[None] + jnp.asarray(sigma)[:, None] ** 2)
    return -((x - muj) @ qj * coef) @ qj.T

  def closed_form(x, sigma_min, sigma_max):
    """The latent and the estimator's log p (prior N(0, sigma_max^2 I)) in float64."""
    ratio = np.sqrt((lam + sigma_max ** 2) / (lam + sigma_min ** 2))
    z = mu + ((np.asarray(x, np.float64) - mu) @ q * ratio) @ q.T
    logdet = np.sum(np.log(ratio))
    prior = -0.5 * np.sum(z ** 2, 1) / sigma_max ** 2 - 0.5 * d * np.log(2 * np.pi * sigma_max ** 2)
    return z, prior + logdet

  return mu, score, closed_form


def test_gaussian_exact_trace_matches_closed_form():
  d, s, mu, sigma_max = 3, 0.7, np.array([1.0, -2.0, 0.5]), 50.0
  gauss = toy.Gaussian(mu, s)
  x = mu + 1.5 * np.random.default_rng(1).normal(size=(5, d)).astype(np.float32)
  logp, info = lik.log_prob(gauss.score, jnp.asarray(x), sigma_min=SIGMA_MIN,
                            sigma_max=sigma_max, trace="exact")
  v_min, v_max = s ** 2 + SIGMA_MIN ** 2, s ** 2 + sigma_max ** 2
  z = mu + (x - mu) * math.sqrt(v_max / v_min)
  # Change of variables: log p(x) = log N(z; 0, sigma_max^2 I) + (D/2) log(v_max / v_min).
  expected = (-0.5 * np.sum(z ** 2, 1) / sigma_max ** 2
              - 0.5 * d * np.log(2 * np.pi * sigma_max ** 2) + 0.5 * d * np.log(v_max / v_min))
  np.testing.assert_allclose(np.asarray(logp) / d, expected / d, atol=1e-3)
  np.testing.assert_allclose(info["z"], z, rtol=1e-4)
  np.testing.assert_array_equal(info["logp_se"], 0.0)
  assert bool(jnp.all(info["success"])) and int(info["nfe"].min()) > 0
  np.testing.assert_allclose(info["prior_logp"] + info["delta_logp"], logp, rtol=1e-6)


def test_hutchinson_within_standard_error():
  # Gaussian probes (Rademacher ones share the code path; bits_per_dim below runs them).
  trace = "gaussian"
  d, n, probes, sigma_max = 4, 8, 16, 30.0
  mu, score, closed_form = _rotated_gaussian(d)
  x = jnp.asarray(mu + np.random.default_rng(2).normal(size=(n, d)), jnp.float32)
  logp, info = lik.log_prob(score, x, jax.random.key(3), sigma_min=SIGMA_MIN,
                            sigma_max=sigma_max, trace=trace, num_probes=probes)
  _, expected = closed_form(x, SIGMA_MIN, sigma_max)
  se = np.asarray(info["logp_se"])
  assert np.all(se > 0) and info["logp_probes"].shape == (n, probes)
  zscores = (np.asarray(logp) - expected) / se
  # Each estimate within 4 standard errors; over 8 examples the z-scores have spread about 1
  # (an honest standard error: neither far too small nor far too large).
  assert np.all(np.abs(zscores) < 4.0), zscores
  assert 0.1 < np.sqrt(np.mean(zscores ** 2)) < 2.5, zscores


def test_mixture_exact_score_matches_convolved_density():
  mix = toy.ncsn_mixture()
  x = mix.sample(jax.random.key(4), 4)
  truth = np.asarray(mix.log_prob(x, SIGMA_MIN))
  # sigma_max large: the Gaussian prior's error is negligible.
  logp, info = lik.log_prob(mix.score, x, sigma_min=SIGMA_MIN, sigma_max=1e4)
  np.testing.assert_allclose(np.asarray(logp) / 2, truth / 2, atol=1e-3)
  # With the exact marginal as prior only the solver's error remains.
  logp, _ = lik.log_prob(mix.score, x, sigma_min=SIGMA_MIN, sigma_max=20.0,
                         prior_logp=lambda z: mix.log_prob(z, 20.0))
  np.testing.assert_allclose(np.asarray(logp) / 2, truth / 2, atol=1e-4)
  # Per-example step control: each example's value is the one it gets when solved alone
  # (vmap over single examples).
  batch, _ = lik.log_prob(mix.score, x, sigma_min=SIGMA_MIN, sigma_max=100.0)
  single = jax.vmap(lambda xi: lik.log_prob(mix.score, xi[None], sigma_min=SIGMA_MIN,
                                            sigma_max=100.0)[0][0])(x)
  np.testing.assert_allclose(single, batch, rtol=1e-5, atol=1e-5)


def test_decode_inverts_encode():
  mix = toy.ncsn_mixture()
  x = mix.sample(jax.random.key(5), 8)
  z = lik.encode(mix.score, x, sigma_min=SIGMA_MIN, sigma_max=50.0)
  assert float(jnp.std(z)) > 20.0  # the latent lives at the scale of sigma_max
  x_back = lik.decode(mix.score, z, sigma_min=SIGMA_MIN, sigma_max=50.0)
  np.testing.assert_allclose(x_back, x, atol=1e-4)


def test_bits_per_dim_known_gaussian_and_conventions():
  s, m = 0.3, 0.5
  n, d = 8, 4
  images = np.random.default_rng(8).integers(0, 256, size=(n, 2, 2, 1)).astype(np.uint8)
  rng = jax.random.key(9)
  score = lambda y, sigma: (m - y) / (s ** 2 + broadcast_sigma(sigma, y) ** 2)
  # sigma_max large: the prior N(0, sigma_max^2 I) is exact to well below 1e-3 bits here.
  kw = dict(sigma_min=SIGMA_MIN, sigma_max=1e3, num_repeats=2, trace="rademacher")
  bpd, info = jax.jit(lambda x, k: lik.bits_per_dim(score, x, k, **kw))(jnp.asarray(images), rng)
  # Rebuild each repeat's dequantized images and the closed-form density of N(m, s^2 I).
  keys = lik.example_keys(rng, n)
  v_min = s ** 2 + SIGMA_MIN ** 2
  expected = []
  for r in range(2):
    pair = jax.vmap(jax.random.split)(jax.vmap(lambda k: jax.random.fold_in(k, r))(keys))
    y = np.asarray(lik.dequantize(jnp.asarray(images), pair[:, 0])).reshape(n, d)
    assert np.all(y >= images.reshape(n, d) / 256) and np.all(y < (images.reshape(n, d) + 1) / 256)
    logp = -0.5 * np.sum((y - m) ** 2, 1) / v_min - 0.5 * d * np.log(2 * np.pi * v_min)
    expected.append((-logp / d + np.log(256)) / np.log(2))
  np.testing.assert_allclose(info["bpd_repeats"], np.stack(expected), atol=2e-3)
  np.testing.assert_allclose(bpd, np.mean(expected, 0), atol=2e-3)
  # With per-example keys the batch shards over devices without changing any value (shard_map
  # without the varying-axis check, as `parallel.sample_parallel` runs samplers).
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("batch",))
  spec = jax.sharding.PartitionSpec("batch")
  sharded = jax.jit(jax.shard_map(lambda x, k: lik.bits_per_dim(score, x, k, **kw)[0], mesh=mesh,
                                  in_specs=(spec, spec), out_specs=spec,
                                  check_vma=False))
  np.testing.assert_allclose(sharded(jnp.asarray(images), keys), bpd, rtol=1e-6)
  # Floats on the k/255 grid dequantize exactly as uint8.
  np.testing.assert_array_equal(lik.dequantize(jnp.asarray(images, jnp.float32) / 255, rng),
                                lik.dequantize(jnp.asarray(images), rng))
  # The same density expressed for data in [-1, 1]: y' = 2y - 1 ~ N(2m - 1, (2s)^2) at noise
  # 2 sigma_min gives the same bits per dimension.
  score_c = lambda y, sigma: (2 * m - 1 - y) / (4 * s ** 2 + broadcast_sigma(sigma, y) ** 2)
  kw_c = dict(kw, sigma_min=2 * SIGMA_MIN, sigma_max=2e3)
  bpd_c, _ = lik.bits_per_dim(score_c, jnp.asarray(images), rng, centered=True, **kw_c)
  np.testing.assert_allclose(bpd_c, bpd, atol=2e-3)


def test_bits_per_dim_at_sigma_min_is_never_below_its_bound_on_exact_scores():
  # 8-bit images that are point masses of the data: the density of the data smoothed at
  # sigma_min peaks there at (2 pi sigma_min^2)^(-D/2), the bound, and the dequantized images lie
  # within 1/256 of the peaks, so the exact score reads just above the bound plus the two
  # components' weights (1/2 each: log2(2) / D = 0.25 bits for D = 4); centered, the offsets
  # from the peaks double in sigma_min units.
  assert lik.bpd_lower_bound(0.01) == pytest.approx(8 + 0.5 * math.log2(2 * math.pi * 1e-4))
  assert lik.bpd_lower_bound(0.01) == pytest.approx(2.6819, abs=1e-4)
  assert lik.bpd_lower_bound(0.02, centered=True) == pytest.approx(lik.bpd_lower_bound(0.01))
  images = np.array([[0, 255, 128, 7], [200, 3, 90, 255]], np.uint8)
  x = np.repeat(images, 3, axis=0).reshape(6, 2, 2, 1)
  rng = jax.random.key(3)
  for centered in (False, True):
    means = images / 255.0 * (2.0 if centered else 1.0) - (1.0 if centered else 0.0)
    mix = toy.GaussianMixture((0.5, 0.5), tuple(map(tuple, means)), (0.0, 0.0))
    score = lambda y, sigma: mix.score(y.reshape(len(y), 4), sigma).reshape(y.shape)
    bpd, info = lik.bits_per_dim(score, jnp.asarray(x), rng, sigma_min=SIGMA_MIN,
                                 sigma_max=100.0, num_repeats=2, centered=centered,
                                 trace="exact")
    bound = lik.bpd_lower_bound(SIGMA_MIN, centered=centered)
    assert np.all(np.asarray(info["success"]))
    assert np.all(np.asarray(info["bpd_repeats"]) >= bound), (info["bpd_repeats"], bound)
    assert np.all(np.asarray(bpd) < bound + 0.25 + 0.2), (bpd, bound)


def test_likelihood_rows_state_the_bound_beside_bits_per_dim():
  from score_jax import likelihood_eval
  row = dict(metric="bits_per_dim", mean=2.30, se=0.03, bpd_bound=lik.bpd_lower_bound(0.01),
             step=3000, num_examples=192, repeats=1, trace="rademacher", num_probes=1,
             rtol=1e-5, atol=1e-5, nfe_mean=152.0, nfe_max=188, sigma_min=0.01, sigma_max=1.0)
  text = likelihood_eval.format_row(row)
  assert "smoothed by N(0, sigma_min^2 I) gives is 2.6819" in text
  assert "not the likelihood of the data smoothed at sigma_min" in text
  assert "bpd_bound" in likelihood_eval.CSV_COLUMNS


def test_bad_input_fails_before_work():
  score = toy.ncsn_mixture().score
  x = jnp.zeros((2, 2))
  kw = dict(sigma_min=SIGMA_MIN, sigma_max=10.0)
  with pytest.raises(ValueError, match="trace='bogus' is unknown"):
    lik.log_prob(score, x, trace="bogus", **kw)
  with pytest.raises(ValueError, match="pass rng"):
    lik.log_prob(score, x, trace="rademacher", **kw)
  with pytest.raises(ValueError, match="sigma_max=0.001 must be > sigma_min"):
    lik.log_prob(score, x, sigma_min=SIGMA_MIN, sigma_max=0.001)
  with pytest.raises(ValueError, match="sigma_min=0.0 must be > 0"):
    lik.encode(score, x, sigma_min=0.0, sigma_max=10.0)
  with pytest.raises(ValueError, match="num_probes=0"):
    lik.log_prob(score, x, jax.random.key(0), trace="gaussian", num_probes=0, **kw)
  with pytest.raises(ValueError, match="batch"):
    lik.decode(score, jnp.zeros((2,)), **kw)
  with pytest.raises(ValueError, match="one key per example"):
    lik.log_prob(score, x, jax.random.split(jax.random.key(0), 3), trace="gaussian", **kw)
  with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
    lik.bits_per_dim(score, jnp.full((2, 2), 3.0), jax.random.key(0), **kw)
  with pytest.raises(ValueError, match="num_repeats=0"):
    lik.bits_per_dim(score, jnp.zeros((2, 2)), jax.random.key(0), num_repeats=0, **kw)


def test_log_density_plot(tmp_path):
  mix = toy.ncsn_mixture()
  pts = plots.density_grid((-9.0, -9.0), (9.0, 9.0), 6)
  truth = np.asarray(mix.log_prob(jnp.asarray(pts), SIGMA_MIN)).reshape(6, 6)
  path = tmp_path / "density.png"
  plots.save_log_density({"model": truth + 0.1, "truth": truth}, str(path), lo=(-9, -9),
                         hi=(9, 9), sigma_min=SIGMA_MIN)
  assert path.stat().st_size > 1000
  with pytest.raises(ValueError, match="one shape"):
    plots.save_log_density({"a": truth, "b": truth[:3]}, str(path), lo=(0, 0), hi=(1, 1))
