"""activations.softplus and elu: float32 accuracy against float64, special values, derivatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax.cpu.activations import elu, softplus


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


def test_elu_within_two_ulp_of_float64_and_closer_than_xla():
  x = np.concatenate([np.linspace(-40, 10, 500_001), -np.logspace(-12, 1.6, 100_000),
                      np.linspace(-0.36, -0.34, 20_001)]).astype(np.float32)  # the switch
  x64 = x.astype(np.float64)
  ref = np.where(x64 > 0, x64, np.expm1(np.minimum(x64, 0.0)))
  err = _ulp_error(np.asarray(jax.jit(elu)(x)), ref)
  lib = _ulp_error(np.asarray(jax.jit(jax.nn.elu)(x)), ref)
  assert err.max() <= 2.0, (err.max(), x[err.argmax()])
  assert err.max() <= lib.max()


def test_elu_special_values_and_dtype():
  y = np.asarray(elu(jnp.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 3.0, -100.0], jnp.float32)))
  np.testing.assert_array_equal(y[[0, 1, 3, 5, 6]], [np.inf, -1.0, 0.0, 3.0, -1.0])
  assert np.isnan(y[2]) and np.signbit(y[4])  # expm1(-0) = -0, as XLA's
  xb = jnp.linspace(-5, 5, 11, dtype=jnp.bfloat16)
  assert elu(xb).dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(elu(xb), np.float32),
                                np.asarray(jax.nn.elu(xb), np.float32))
  with pytest.raises(TypeError, match="floating"):
    elu(jnp.arange(3))


def test_elu_derivatives_match_jax_nn_elu():
  x = jnp.concatenate([jnp.linspace(-30.0, 5.0, 351), jnp.array([-0.35, -1e-3, 1e-3])])
  for order in (1, 2, 3):
    f, g = elu, jax.nn.elu
    for _ in range(order):
      f, g = jax.grad(f), jax.grad(g)
    np.testing.assert_allclose(jax.vmap(f)(x), jax.vmap(g)(x), rtol=1e-6, atol=2e-7,
                               err_msg=f"derivative of order {order}")
