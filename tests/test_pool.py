"""cpu/pool.py: separable stride-1 pooling equals flax's 2-D pooling, values and derivatives."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax.cpu import pool


def _avg_pool_same(x, k):
  return pool.sum_pool_same(x, k) / (k * k)


def _reference(kind, k):
  pad = ((k // 2, k // 2), (k // 2, k // 2))
  if kind == "max":
    return lambda x: nn.max_pool(x, (k, k), strides=(1, 1), padding=pad)
  return lambda x: nn.avg_pool(x, (k, k), strides=(1, 1), padding=pad, count_include_pad=True)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("shape,k", [((2, 8, 8, 3), 5), ((3, 7, 10, 4), 3), ((1, 4, 4, 2), 5)])
def test_pool_matches_flax_values_and_gradients(kind, shape, k):
  ours = lambda x: (pool.max_pool_same if kind == "max" else _avg_pool_same)(x, k)
  ref = _reference(kind, k)
  x = jax.random.normal(jax.random.key(0), shape)
  g = jax.random.normal(jax.random.key(1), shape)
  np.testing.assert_allclose(jax.jit(ours)(x), ref(x), rtol=1e-6, atol=1e-6)
  grad = jax.jit(lambda x, g: jax.vjp(ours, x)[1](g)[0])(x, g)
  np.testing.assert_allclose(grad, jax.vjp(ref, x)[1](g)[0], rtol=1e-5, atol=1e-6)
  tangent = jax.jit(lambda x, g: jax.jvp(ours, (x,), (g,))[1])(x, g)
  np.testing.assert_allclose(tangent, jax.jvp(ref, (x,), (g,))[1], rtol=1e-5, atol=1e-6)


def test_max_pool_ties_send_the_gradient_to_the_first_maximum():
  # Constant input: every window's first maximum is its top-left element inside the image.
  x = jnp.ones((1, 6, 5, 1))
  grad = jax.grad(lambda x: pool.max_pool_same(x, 5).sum())(x)[0, :, :, 0]
  expected = np.zeros((6, 5))
  for i in range(6):
    for j in range(5):
      expected[max(i - 2, 0), max(j - 2, 0)] += 1
  np.testing.assert_array_equal(grad, expected)
  np.testing.assert_array_equal(grad, jax.grad(lambda x: _reference("max", 5)(x).sum())(x)[0, ..., 0])


def test_pool_in_scan_and_bfloat16():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))

  def loss(x):
    def body(h, _):
      return pool.max_pool_same(h, 5) * 0.5 + _avg_pool_same(h, 5), None
    return jax.lax.scan(body, x, None, length=3)[0].sum()

  def ref_loss(x):
    def body(h, _):
      return _reference("max", 5)(h) * 0.5 + _reference("avg", 5)(h), None
    return jax.lax.scan(body, x, None, length=3)[0].sum()

  np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), jax.grad(ref_loss)(x), rtol=1e-5,
                             atol=1e-5)
  xb = x.astype(jnp.bfloat16)
  for fn in (pool.max_pool_same, _avg_pool_same):
    y, vjp = jax.vjp(lambda x: fn(x, 5), xb)
    assert y.dtype == jnp.bfloat16 and vjp(y)[0].dtype == jnp.bfloat16


def test_pool_rejects_bad_arguments():
  with pytest.raises(ValueError, match="odd window"):
    pool.max_pool_same(jnp.ones((1, 4, 4, 1)), 4)
  with pytest.raises(ValueError, match=r"NHWC \[b, h, w, c\]"):
    pool.sum_pool_same(jnp.ones((4, 4, 1)), 5)
