"""Continuous noise levels and EDM preconditioning against closed forms.

Gaussian data N(mu, s^2 I) in D dimensions: at noise sigma the exact score is
(mu - x) / (s^2 + sigma^2) and the optimal denoiser D*(x) = mu + s^2 / (s^2 + sigma^2) (x - mu),
so under EDM's preconditioning (Karras et al. 2022, Table 1) the optimal network is
F*(c_in x; c_noise) = (D*(x) - c_skip x) / c_out. Its DSM loss is the conditional variance of the
target: E[loss | sigma] = 0.5 w(sigma) D s^2 / (sigma^2 (s^2 + sigma^2)).
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import integrate, stats

from score_jax import checkpoint, losses, noise, samplers, toy
from score_jax.models import mlp, ncsn, unet
from score_jax.score import edm_coefficients, make_score_fn

D, S, MU, SIGMA_DATA = 8, 0.7, 0.3, 0.5


def _optimal_denoiser(x, sigma, mu=MU, s=S):
  shrink = s ** 2 / (s ** 2 + sigma ** 2)
  return mu + shrink * (x - mu)


class ExactEDMNet(nn.Module):
  """EDM's optimal F for Gaussian data, as a network: sees only (c_in x, c_noise)."""
  sigma_data: float = SIGMA_DATA
  preconditioning = "edm"

  @nn.compact
  def __call__(self, x_in, c_noise, train=False):
    sigma = jnp.exp(4.0 * c_noise)
    _, c_out, c_in, _ = edm_coefficients(sigma, self.sigma_data)
    col = lambda c: c.reshape(c.shape + (1,) * (x_in.ndim - 1))
    x = x_in / col(c_in)
    # (D*(x) - c_skip x) / c_out with the differences of shrink factors in closed form (no
    # cancellation at small sigma): 1 - shrink = sigma^2 / (s^2 + sigma^2), shrink - c_skip =
    # sigma^2 (s^2 - sd^2) / ((s^2 + sigma^2) (sigma^2 + sd^2)).
    s2, sd2, v = S ** 2, self.sigma_data ** 2, col(sigma) ** 2
    return (MU * v / (s2 + v) + v * (s2 - sd2) / ((s2 + v) * (v + sd2)) * x) / col(c_out)


def _exact_edm_score_fn():
  return make_score_fn(ExactEDMNet(), {})


def test_optimal_edm_network_is_the_regression_of_its_target():
  # F* is E[F_target | x~], F_target = (x - c_skip x~) / c_out: least squares on samples finds
  # the closed form's slope and intercept at every sigma.
  rng = np.random.default_rng(0)
  n = 400_000
  for sigma in (0.01, 0.2, 0.5, 3.0, 40.0):
    c_skip, c_out, _, _ = (float(c) for c in edm_coefficients(jnp.float32(sigma), SIGMA_DATA))
    x = MU + S * rng.standard_normal(n)
    x_tilde = x + sigma * rng.standard_normal(n)
    target = (x - c_skip * x_tilde) / c_out
    slope, intercept = np.polyfit(x_tilde, target, 1)
    shrink = S ** 2 / (S ** 2 + sigma ** 2)
    want_slope, want_intercept = (shrink - c_skip) / c_out, MU * (1 - shrink) / c_out
    resid = np.std(target - (slope * x_tilde + intercept))
    se = resid / (np.std(x_tilde) * np.sqrt(n))
    assert abs(slope - want_slope) < 6 * se, sigma
    assert abs(intercept - want_intercept) < 6 * resid / np.sqrt(n) * (1 + abs(MU) / np.std(
        x_tilde)), sigma


@pytest.mark.parametrize("sigma", [0.002, 0.05, 0.5, 5.0, 80.0])
def test_edm_wrapped_exact_network_gives_the_exact_score(sigma):
  g = toy.Gaussian(np.full(D, MU), S)
  x = g.sample(jax.random.key(0), 256) + sigma * jax.random.normal(jax.random.key(1), (256, D))
  got = _exact_edm_score_fn()(x, jnp.full((256,), sigma))
  want = g.score(x, jnp.full((256,), sigma))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(want))))


def _floor(sigma, weighting, d=D, s=S):
  w = losses.loss_weight(np.float64(sigma), weighting=weighting, sigma_data=SIGMA_DATA)
  return 0.5 * float(w) * d * s ** 2 / (sigma ** 2 * (s ** 2 + sigma ** 2))


@pytest.mark.parametrize("weighting", ["edm", "ncsn"])
def test_exact_edm_model_loss_is_its_floor_at_every_sigma(weighting):
  g = toy.Gaussian(np.full(D, MU), S)
  score_fn = _exact_edm_score_fn()
  n = 8192
  x = g.sample(jax.random.key(0), n)
  z = jax.random.normal(jax.random.key(1), x.shape)
  bins = noise.geometric_sigmas(80.0, 0.002, 6)
  for sigma in np.asarray(bins):
    loss, _ = losses.dsm_loss_from_noise(score_fn, x, bins, jnp.zeros(n, jnp.int32), z,
                                         sigma=jnp.full((n,), sigma), weighting=weighting,
                                         sigma_data=SIGMA_DATA)
    # Per-example loss: floor * chi^2_D / D, standard error floor sqrt(2 / (D n)).
    floor = _floor(float(sigma), weighting)
    assert abs(float(loss) - floor) < 5 * floor * np.sqrt(2 / (D * n)), sigma


def test_edm_weighting_makes_the_floor_flat_when_sigma_data_is_the_data_std():
  # (sigma^2 + sd^2) / (sd^2 sigma^2) * sigma^4 * s^2 / (sigma^2 (s^2 + sigma^2)) = 1 for sd = s.
  for sigma in (0.002, 0.1, 1.0, 80.0):
    w = losses.loss_weight(jnp.float32(sigma), weighting="edm", sigma_data=S)
    np.testing.assert_allclose(float(w) * S ** 2 / (sigma ** 2 * (S ** 2 + sigma ** 2)), 1.0,
                               rtol=1e-5)


def test_continuous_dsm_with_exact_score_gives_the_log_uniform_floor():
  # ln sigma ~ U[a, b]: E[0.5 D s^2 / (s^2 + sigma^2)] = 0.5 D [u - ln(s^2 + e^{2u}) / 2]_a^b / (b - a).
  g = toy.Gaussian(np.full(D, MU), S)
  lo, hi = 0.01, 20.0
  dist = noise.NoiseDistribution("log_uniform", sigma_min=lo, sigma_max=hi)
  n = 32768
  x = g.sample(jax.random.key(0), n)
  keys = jax.random.split(jax.random.key(1), n)
  loss, m = jax.jit(lambda x, k: losses.dsm_loss(g.score, x, noise.geometric_sigmas(hi, lo, 5),
                                                 k, distribution=dist))(x, keys)
  a, b = np.log(lo), np.log(hi)
  antiderivative = lambda u: u - 0.5 * np.log(S ** 2 + np.exp(2 * u))
  want = 0.5 * D * (antiderivative(b) - antiderivative(a)) / (b - a)
  assert float(loss) == pytest.approx(want, rel=0.02)
  assert float(jnp.sum(m["level_count"])) == n


def test_continuous_dsm_with_exact_score_gives_the_log_normal_floor():
  g = toy.Gaussian(np.full(D, MU), S)
  dist = noise.NoiseDistribution("log_normal", p_mean=-1.2, p_std=1.2)
  n = 32768
  x = g.sample(jax.random.key(0), n)
  loss, _ = losses.dsm_loss(g.score, x, noise.geometric_sigmas(80.0, 0.002, 5),
                            jax.random.key(1), distribution=dist)
  want = integrate.quad(lambda u: stats.norm.pdf(u, -1.2, 1.2) * 0.5 * D * S ** 2
                        / (S ** 2 + np.exp(2 * u)), -12, 10)[0]
  assert float(loss) == pytest.approx(want, rel=0.02)
  # EDM's weighting with sigma_data = s: the floor is 0.5 D at every sigma.
  loss, _ = losses.dsm_loss(g.score, x, noise.geometric_sigmas(80.0, 0.002, 5),
                            jax.random.key(1), distribution=dist, weighting="edm", sigma_data=S)
  assert float(loss) == pytest.approx(0.5 * D, rel=0.02)


def test_noise_distributions_draw_their_laws():
  n = 100_000
  u = np.log(np.asarray(noise.NoiseDistribution("log_uniform", sigma_min=0.01, sigma_max=50.0)
                        .sample(jax.random.key(0), (n,))))
  assert u.min() >= np.log(0.01) - 1e-5 and u.max() <= np.log(50.0) + 1e-5
  assert stats.kstest(u, stats.uniform(np.log(0.01), np.log(5000.0)).cdf).pvalue > 1e-3
  v = np.log(np.asarray(noise.NoiseDistribution("log_normal", p_mean=-1.2, p_std=1.2)
                        .sample(jax.random.key(1), (n,))))
  assert stats.kstest(v, stats.norm(-1.2, 1.2).cdf).pvalue > 1e-3
  with pytest.raises(ValueError, match="sigma_min"):
    noise.NoiseDistribution("log_uniform")
  with pytest.raises(ValueError, match="unknown"):
    noise.NoiseDistribution("uniform")


def test_sigma_bins_are_the_nearest_ladder_levels_in_log_space():
  sigmas = noise.geometric_sigmas(10.0, 0.1, 5)  # 10, 3.16, 1, 0.316, 0.1
  np.testing.assert_array_equal(noise.sigma_bins(sigmas, sigmas), np.arange(5))
  probe = jnp.asarray([100.0, 5.7, 5.5, 0.2, 0.17, 0.001])
  # Edges at the geometric means 5.62, 1.78, 0.562, 0.178.
  np.testing.assert_array_equal(noise.sigma_bins(probe, sigmas), [0, 0, 1, 3, 4, 4])


def test_continuous_loss_metrics_count_each_example_in_its_sigma_bin():
  g = toy.Gaussian(np.full(2, 0.0), 1.0)
  bins = noise.geometric_sigmas(10.0, 0.1, 5)
  dist = noise.NoiseDistribution("log_uniform", sigma_min=0.1, sigma_max=10.0)
  keys = jax.random.split(jax.random.key(0), 4000)
  loss, m = jax.jit(lambda x, k: losses.dsm_loss(g.score, x, bins, k, distribution=dist,
                                                 internals=True))(
      g.sample(jax.random.key(1), 4000), keys)
  np.testing.assert_array_equal(m["sigma_idx"], noise.sigma_bins(m["sigma"], bins))
  np.testing.assert_allclose(m["level_count"], np.bincount(np.asarray(m["sigma_idx"]),
                                                           minlength=5))
  # Log-uniform over the ladder's span: the inner bins are twice the end bins.
  np.testing.assert_allclose(np.asarray(m["level_count"]) / 4000, [1 / 8, 1 / 4, 1 / 4, 1 / 4,
                                                                   1 / 8], atol=0.025)
  assert float(jnp.sum(m["level_loss_sum"])) == pytest.approx(4000 * float(loss), rel=1e-5)
  with pytest.raises(ValueError, match="uniform"):
    losses.dsm_loss(g.score, g.sample(jax.random.key(1), 8), bins, jax.random.key(0),
                    distribution=dist, level_sampling="stratified")


@pytest.mark.usefixtures("fast_compile")
@pytest.mark.parametrize("make", [
    lambda: mlp.NoiseConditionalMLP(hidden=16, num_layers=2, preconditioning="edm",
                                    sigma_data=0.3),
    lambda: ncsn.NCSNv2(ngf=8, num_channels=1, preconditioning="edm", sigma_data=0.3,
                        encoder=((1, False, 1), (2, True, 1)), decoder=(2, 1)),
    lambda: ncsn.NCSNv2(ngf=8, num_channels=1, preconditioning="edm", sigma_data=0.3,
                        noise_embedding=True, encoder=((1, False, 1), (2, True, 1)),
                        decoder=(2, 1)),
    lambda: unet.UNet(ch=32, num_channels=1, ch_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(), conditional=True, preconditioning="edm",
                      sigma_data=0.3),
])
def test_edm_networks_are_called_with_c_in_x_and_c_noise(make):
  model = make()
  shape = (3, 2) if isinstance(model, mlp.NoiseConditionalMLP) else (3, 8, 8, 1)
  x = jax.random.normal(jax.random.key(0), shape)
  sigma = jnp.asarray([0.01, 1.0, 30.0])
  params = jax.jit(model.init)(jax.random.key(1), x, sigma)["params"]
  # Nonzero weights everywhere (the UNet's last conv starts at zero).
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape),
                        params)
  c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, 0.3)
  col = lambda c: c.reshape(c.shape + (1,) * (x.ndim - 1))
  apply = jax.jit(lambda x, c: model.apply({"params": params}, x, c))
  f = apply(col(c_in) * x, c_noise)
  # Compared as denoisers: D - x cancels digits at small sigma, D itself does not.
  denoised = x + col(sigma) ** 2 * jax.jit(make_score_fn(model, params))(x, sigma)
  np.testing.assert_allclose(denoised, col(c_skip) * x + col(c_out) * f, rtol=1e-4, atol=1e-4)
  if getattr(model, "noise_embedding", True):  # conditional F: c_noise changes the output
    f2 = apply(col(c_in) * x, c_noise + 0.5)
    assert float(jnp.max(jnp.abs(f2 - f))) > 1e-4


def test_ncsn_v1_and_ncsn_preconditioning_reject_edm_inputs():
  x = jnp.zeros((1, 8, 8, 1))
  model = ncsn.NCSN(ngf=8, num_channels=1, level_sigmas=(1.0, 0.1), preconditioning="edm",
                    encoder=((1, False, 1), (2, True, 1)), decoder=(2, 1))
  with pytest.raises(ValueError, match="NCSN \\(v1\\)"):
    model.init(jax.random.key(0), x, jnp.ones(1))
  model = ncsn.NCSNv2(ngf=8, num_channels=1, noise_embedding=True,
                      encoder=((1, False, 1), (2, True, 1)), decoder=(2, 1))
  with pytest.raises(ValueError, match="preconditioning='edm'"):
    model.init(jax.random.key(0), x, jnp.ones(1))


def _mode_stats(x, means):
  x = np.asarray(x, np.float64)
  nearest = np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)
  weights = np.bincount(nearest, minlength=len(means)) / len(x)
  return weights, np.array([x[nearest == k].var(0).mean() for k in range(len(means))])


def test_continuous_edm_model_trained_on_the_mixture_recovers_it_with_heun():
  mix = toy.ncsn_mixture()
  # The data's std is about 4 per coordinate; ln sigma ~ N(0, 1.5^2) covers 0.01 to 20.
  sigma_data, sigma_max, steps = 4.0, 20.0, 4000
  dist = noise.NoiseDistribution("log_normal", p_mean=0.0, p_std=1.5)
  model = mlp.NoiseConditionalMLP(hidden=128, num_layers=3, activation="swish",
                                  preconditioning="edm", sigma_data=sigma_data)
  params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.ones((1,)))["params"]
  opt = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
  bins = noise.geometric_sigmas(sigma_max, 0.01, 8)

  def body(carry, rng):
    p, o = carry
    data_rng, loss_rng = jax.random.split(rng)
    loss_fn = lambda p: losses.dsm_loss(make_score_fn(model, p), mix.sample(data_rng, 512),
                                        bins, loss_rng, distribution=dist, weighting="edm",
                                        sigma_data=sigma_data)[0]
    grads = jax.grad(loss_fn)(p)
    updates, o = opt.update(grads, o, p)
    return (optax.apply_updates(p, updates), o), None

  (params, _), _ = jax.jit(lambda p, r: jax.lax.scan(body, (p, opt.init(p)),
                                                     jax.random.split(r, steps)))(
      params, jax.random.key(1))
  # Started from exact samples of the data at sigma_max (the prior N(0, sigma_max^2) misses the
  # data's mean (3, 3), which a deterministic sampler carries into the weights), 25 Karras
  # levels: 49 NFE.
  n = 10000
  x0 = mix.sample(jax.random.key(2), n) + sigma_max * jax.random.normal(jax.random.key(3), (n, 2))
  x, info = jax.jit(lambda x: samplers.heun(make_score_fn(model, params), x,
                                            noise.karras_sigmas(sigma_max, 0.01, 25),
                                            return_info=True))(x0)
  assert info["nfe"] <= 50
  weights, variances = _mode_stats(x, np.asarray(mix.means))
  np.testing.assert_allclose(weights, [0.2, 0.8], atol=0.02)
  np.testing.assert_allclose(variances, 1.0, rtol=0.1)


def _test_config(**changes):
  from configs import test as test_config
  config = test_config.get_config()
  for dotted, value in changes.items():
    group, key = dotted.split(".")
    config[group][key] = value
  return config


def test_config_builds_the_continuous_edm_run():
  from score_jax import config_schema, experiment, models, stored_config
  config = _test_config(**{"noise.distribution": "log_normal", "noise.weighting": "edm",
                           "noise.sigma_data": 4.0, "model.preconditioning": "edm"})
  config_schema.validate(config, modes=("train",))
  model = models.build(config)
  assert model.preconditioning == "edm" and model.sigma_data == 4.0
  kwargs = experiment.loss_kwargs_from_config(config, model, experiment.sigmas_from_config(config))
  assert kwargs["distribution"].continuous and kwargs["weighting"] == "edm"
  # The ladder of a continuous run only sets the samplers' ladder: a checkpoint stays usable.
  stored = json.loads(config.to_json())
  other = _test_config(**{"noise.distribution": "log_normal", "noise.weighting": "edm",
                          "noise.sigma_data": 4.0, "model.preconditioning": "edm",
                          "noise.num_scales": 7})
  stored_config.check_compatible(stored, other, "w")
  with pytest.raises(checkpoint.CheckpointError, match="noise.distribution"):
    stored_config.check_compatible(stored, _test_config(**{"model.preconditioning": "edm",
                                                           "noise.sigma_data": 4.0}), "w")
  ladder = json.loads(_test_config().to_json())
  with pytest.raises(checkpoint.CheckpointError, match="noise.num_scales"):
    stored_config.check_compatible(ladder, _test_config(**{"noise.num_scales": 7}), "w")


@pytest.mark.parametrize("changes,match", [
    ({"noise.distribution": "log_uniform", "noise.level_sampling": "stratified"},
     "level_sampling=uniform"),
    ({"noise.distribution": "log_normal", "noise.p_std": 0.0}, "noise.p_std"),
    ({"noise.weighting": "min_snr"}, "noise.weighting"),
    ({"model.preconditioning": "karras"}, "model.preconditioning"),
])
def test_config_rejects_bad_noise_settings(changes, match):
  from score_jax import config_schema
  with pytest.raises(config_schema.UsageError, match=match):
    config_schema.validate(_test_config(**changes), modes=("train",))
