"""The canonical-gradient convolution equals lax.conv_general_dilated and its derivatives."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from score_jax.cpu import conv

DN = ("NHWC", "HWIO", "NHWC")


def _lax(x, w, d, p, strides=(1, 1)):
  return lax.conv_general_dilated(x, w, strides, [(p, p)] * 2, rhs_dilation=(d, d),
                                  dimension_numbers=DN)


def _ours(x, w, d, p):
  assert p == d * (w.shape[0] // 2)
  return conv.same_conv(x, w, d)


def _covered(x, w, strides, padding, rhs_dilation=None):
  """`conv.covered` of the primitive that this `lax.conv_general_dilated` call binds."""
  jaxpr = jax.make_jaxpr(lambda x, w: lax.conv_general_dilated(
      x, w, strides, padding, rhs_dilation=rhs_dilation, dimension_numbers=DN))(x, w)
  return conv.covered(x.shape, w.shape, jaxpr.eqns[0].params)


@pytest.mark.parametrize("k,d", [(1, 1), (3, 1), (3, 2), (3, 4), (5, 1)])
def test_values_and_gradients_match_lax(k, d):
  rs = np.random.RandomState(k * 10 + d)
  x = jnp.asarray(rs.randn(3, 11, 9, 5), jnp.float32)
  w = jnp.asarray(rs.randn(k, k, 5, 6), jnp.float32)
  p = d * (k // 2)
  assert _covered(x, w, (1, 1), [(p, p)] * 2, (d, d)) == d
  loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w, d, p)) * jnp.arange(6.0)))
  np.testing.assert_allclose(_ours(x, w, d, p), _lax(x, w, d, p), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.grad(loss(_lax), (0, 1))(x, w), jax.grad(loss(_ours), (0, 1))(x, w)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(a))))
  # Forward mode in both operands, and a Hessian-vector product (forward over reverse).
  dx, dw = jnp.cos(x), jnp.sin(w)
  want = jax.jvp(lambda x, w: _lax(x, w, d, p), (x, w), (dx, dw))[1]
  got = jax.jit(lambda *a: jax.jvp(lambda x, w: _ours(x, w, d, p), a[:2], a[2:])[1])(x, w, dx, dw)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))
  hvp = lambda f: jax.jvp(jax.grad(loss(f)), (x, w), (dx, dw))[1]
  for a, b in zip(hvp(_lax), jax.jit(lambda: hvp(_ours))()):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(a))))


def test_gradients_inside_scan_and_bfloat16():
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(2, 8, 8, 4), jnp.float32)
  w = jnp.asarray(rs.randn(3, 3, 4, 4), jnp.float32) * 0.2

  def run(f, dtype):
    g = jax.grad(lambda w: jnp.sum(f(x.astype(dtype), w.astype(dtype), 1, 1) ** 2))
    return jax.lax.scan(lambda w, _: (w - 1e-2 * g(w), None), w, None, length=3)[0]

  np.testing.assert_allclose(run(_ours, jnp.float32), run(_lax, jnp.float32), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(run(_ours, jnp.bfloat16), run(_lax, jnp.bfloat16), rtol=2e-2,
                             atol=2e-2)


def test_covered_configurations():
  x = jnp.ones((1, 8, 8, 2))
  w = jnp.ones((3, 3, 2, 2))
  assert _covered(x, w, (1, 1), "SAME") == 1  # "SAME" is the symmetric padding here
  assert _covered(x, w, (1, 1), "SAME", (2, 2)) == 2
  assert _covered(x, w, (2, 2), [(1, 1)] * 2) is None  # stride
  assert _covered(x, w, (1, 1), [(0, 0)] * 2) is None  # 'valid'
  assert _covered(x, w, (1, 1), [(1, 2), (1, 1)]) is None  # asymmetric
  assert _covered(x, jnp.ones((4, 4, 2, 2)), (1, 1), [(2, 2)] * 2) is None  # even kernel


def test_same_conv_rejects_what_it_does_not_compute():
  with pytest.raises(ValueError, match="odd square kernel"):
    conv.same_conv(jnp.ones((1, 8, 8, 2)), jnp.ones((4, 4, 2, 2)))
  with pytest.raises(ValueError, match="odd square kernel"):
    conv.same_conv(jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 2), jnp.bfloat16))


@pytest.mark.parametrize("k,d", [(3, 1), (3, 2), (3, 4), (5, 1), (1, 1)])
def test_inflated_weight_gradient_equals_the_plain_form(k, d):
  # The CPU branch without oneDNN (input and kernel dilation 2, window stride 2d) and the other
  # platforms' branch compute the weight gradient of the lax convolution.
  rs = np.random.RandomState(k + 7 * d)
  x = jnp.asarray(rs.randn(3, 11, 9, 5), jnp.float32)
  g = jnp.asarray(rs.randn(3, 11, 9, 6), jnp.float32)
  kw = dict(dilation=d, pad=d * (k // 2))
  plain = conv._weight_grad(x, g, inflate=1, **kw)
  inflated = conv._weight_grad(x, g, inflate=2, **kw)
  assert plain.shape == inflated.shape == (k, k, 5, 6)
  np.testing.assert_allclose(inflated, plain, rtol=1e-5, atol=1e-5)
  w = jnp.zeros((k, k, 5, 6))
  want = jax.vjp(lambda w: _lax(x, w, d, d * (k // 2)), w)[1](g)[0]
  np.testing.assert_allclose(plain, want, rtol=1e-5, atol=1e-5)
