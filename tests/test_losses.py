"""Objectives against closed forms: Gaussian data (exact scores) and point masses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import losses, noise, toy

D, S, MU = 8, 0.7, 1.5


def _gaussian():
  return toy.Gaussian(np.full(D, MU), S)


def test_dsm_with_exact_gaussian_score_matches_closed_form_per_level():
  g = _gaussian()
  sigmas = noise.geometric_sigmas(2.0, 0.1, 4)
  n = 20000
  x = g.sample(jax.random.key(0), n)
  idx = jnp.arange(n) % 4
  loss, m = losses.dsm_loss(g.score, x, sigmas, jax.random.key(1), sigma_idx=idx)
  per_level = np.asarray(m["level_loss_sum"] / m["level_count"])
  # E[loss | sigma] = D/2 * S^2 / (S^2 + sigma^2): the conditional variance of z given x~.
  expected = 0.5 * D * S ** 2 / (S ** 2 + np.asarray(sigmas) ** 2)
  np.testing.assert_allclose(per_level, expected, rtol=0.03)
  assert float(loss) == pytest.approx(expected.mean(), rel=0.02)
  np.testing.assert_allclose(m["level_count"], n / 4)


def test_dsm_is_zero_for_a_point_mass():
  p = toy.PointMass(np.zeros(5))
  x = p.sample(jax.random.key(0), 64)
  loss, _ = losses.dsm_loss(p.score, x, noise.geometric_sigmas(10.0, 0.01, 10), jax.random.key(1))
  assert float(loss) < 1e-8


def test_per_example_keys_make_loss_independent_of_batch_split():
  g = _gaussian()
  sigmas = noise.geometric_sigmas(2.0, 0.1, 4)
  x = g.sample(jax.random.key(0), 16)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(3), jnp.arange(16))
  whole, _ = losses.dsm_loss(g.score, x, sigmas, keys)
  halves = [losses.dsm_loss(g.score, x[i:i + 8], sigmas, keys[i:i + 8])[0] for i in (0, 8)]
  assert float(whole) == pytest.approx(float(sum(halves) / 2), rel=1e-6)
  with pytest.raises(ValueError, match="stratified"):
    losses.dsm_loss(g.score, x, sigmas, keys, level_sampling="stratified")


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
def test_ssm_and_explicit_sm_agree_with_closed_form(projection):
  g = _gaussian()
  sigmas = jnp.asarray([0.5])
  n = 20000
  x = g.sample(jax.random.key(0), n)
  v = S ** 2 + 0.25
  # E[sigma^2 (0.5 |s|^2 + tr grad s)] = sigma^2 D (0.5 / v - 1 / v) for N(mu, v I).
  expected = -0.5 * 0.25 * D / v
  ssm, _ = losses.ssm_loss(g.score, x, sigmas, jax.random.key(1), projection=projection,
                           num_projections=2)
  esm, _ = losses.explicit_score_matching_loss(g.score, x, sigmas, jax.random.key(1))
  assert float(esm) == pytest.approx(expected, rel=0.02)
  assert float(ssm) == pytest.approx(expected, rel=0.05)
  # ESM and DSM differ by the model-independent constant D/2 (here computed exactly).
  dsm, _ = losses.dsm_loss(g.score, x, sigmas, jax.random.key(1))
  assert float(dsm) - float(esm) == pytest.approx(0.5 * D, rel=0.03)


def test_losses_have_gradients_through_a_network():
  import flax.linen as nn
  from score_jax.models.mlp import NoiseConditionalMLP
  from score_jax.score import make_score_fn
  model = NoiseConditionalMLP(hidden=16, num_layers=2)
  x = jnp.ones((4, 2))
  params = model.init(jax.random.key(0), x, jnp.ones(4))["params"]
  sigmas = noise.geometric_sigmas(1.0, 0.1, 3)
  for fn in (losses.dsm_loss, losses.ssm_loss, losses.explicit_score_matching_loss):
    grads = jax.jit(jax.grad(
        lambda p: fn(make_score_fn(model, p), x, sigmas, jax.random.key(1))[0]))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert any(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads))


def test_ssm_differentiates_a_network_with_custom_vjp_convs_and_pooling():
  # The fast CPU convolutions (cpu/conv.py) and max pooling (cpu/pool.py) have hand-written
  # derivative rules: sliced score matching must reach v^T J v through them.
  import flax.linen as nn
  from score_jax.cpu import pool
  from score_jax.models import layers
  from score_jax.score import make_score_fn

  class TinyImageNet(nn.Module):
    output_convention = "scaled_score"

    @nn.compact
    def __call__(self, x, sigma, train=False):
      h = nn.elu(layers.Conv(8)(x / sigma[:, None, None, None]))
      return layers.Conv(x.shape[-1])(pool.max_pool_same(h, 5))

  model = TinyImageNet()
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
  sigmas = noise.geometric_sigmas(1.0, 0.1, 3)
  params = model.init(jax.random.key(1), x, sigmas[:2])["params"]
  loss_fn = lambda p: losses.ssm_loss(make_score_fn(model, p), x, sigmas, jax.random.key(2),
                                      num_projections=2)[0]
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert all(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads))
