"""activations.softplus: float32 accuracy against float64, special values, derivatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax.models.activations import softplus


def _ulp_error(y, ref):
  ref32 = ref.astype(np.float32)
  return np.abs(y.astype(np.float64) - ref) / np.spacing(np.abs(ref32)).astype(np.float64)


def test_softplus_within_a_few_ulp_of_float64():
  x = np.concatenate([np.linspace(-80, 80, 400_001), -np.logspace(-10, 1.9, 50_000),
                      np.logspace(-10, 1.9, 50_000)]).astype(np.float32)
  ref = np.logaddexp(x.astype(np.float64), 0.0)
  err = _ulp_error(np.asarray(jax.jit(softplus)(x)), ref)
  lib = _ulp_error(np.asarray(jax.jit(jax.nn.softplus)(x)), ref)
  assert err.max() <= 4.0, (err.max(), x[err.argmax()])
  assert err.mean() <= 2 * lib.mean() + 0.05


def test_softplus_special_values_and_dtype():
  y = softplus(jnp.array([np.inf, -np.inf, np.nan, 0.0, 200.0, -200.0], jnp.float32))
  np.testing.assert_array_equal(np.asarray(y)[[0, 1, 4, 5]], [np.inf, 0.0, 200.0, 0.0])
  assert np.isnan(y[2]) and np.isclose(float(y[3]), np.log(2.0), rtol=1e-7)
  xb = jnp.linspace(-5, 5, 11, dtype=jnp.bfloat16)
  assert softplus(xb).dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(softplus(xb), np.float32),
                             np.asarray(jax.nn.softplus(xb), np.float32), rtol=1e-2)
  with pytest.raises(TypeError, match="floating"):
    softplus(jnp.arange(3))


def test_softplus_derivatives_are_sigmoid_and_its_derivative():
  x = jnp.linspace(-30.0, 30.0, 241)
  d1 = jax.vmap(jax.grad(softplus))(x)
  d2 = jax.vmap(jax.grad(jax.grad(softplus)))(x)
  np.testing.assert_allclose(d1, jax.nn.sigmoid(x), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(d2, jax.nn.sigmoid(x) * jax.nn.sigmoid(-x), rtol=1e-5, atol=1e-7)
  # Exactly at 0, where |x| has a kink: sigmoid(0) = 1/2, its slope 1/4.
  assert float(jax.grad(softplus)(0.0)) == 0.5
  assert float(jax.grad(jax.grad(softplus))(0.0)) == pytest.approx(0.25)
