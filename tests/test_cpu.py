"""score_jax.cpu: the switch, what it rewrites, and forward mode through every image network.

`jax.jvp` through each image network on its tiny preset, with the fast CPU path on and off,
equals central finite differences of the plain network and agrees between on and off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import cpu
from tests.test_param_trees import tiny_networks

pytestmark = pytest.mark.usefixtures("fast_compile")

IMAGE_NETWORKS = ("ncsn", "ncsnv2", "ncsnv2_deeper", "ncsnv2_deepest", "unet_conditional",
                  "biggan32", "biggan64_attn", "dcgan32")


def _network(name):
  """(apply(variables, x) for any batch of x, variables, x) of a tiny preset."""
  module, shape, takes_sigma = tiny_networks()[name]
  x = jax.random.uniform(jax.random.key(1), shape)
  sigma = jnp.linspace(0.9, 0.05, shape[0])
  extra = (sigma,) if takes_sigma else ()
  variables = jax.jit(module.init)(jax.random.key(0), x, *extra)
  # Away from the DDPM zero initialization, so every layer shapes the output.
  variables = jax.tree.map(
      lambda v: v + 0.05 * jax.random.normal(jax.random.key(2), v.shape) if v.ndim else v,
      variables)
  model = cpu.accelerate(module)

  def apply(v, x):
    reps = x.shape[0] // shape[0]  # the networks are per example: stacked inputs, tiled sigma
    return model.apply(v, x, *(jnp.tile(e, reps) for e in extra))

  return apply, variables, x


def _traced(f, *args) -> str:
  # A fresh function each time: JAX caches traces per function, and the switch is read when
  # tracing.
  return str(jax.make_jaxpr(lambda *a: f(*a))(*args))


def test_the_switch_rewrites_convolutions_pooling_and_activations(monkeypatch):
  apply, variables, x = _network("ncsnv2")
  on = _traced(apply, variables, x)
  assert "onednn_conv_same" in on and "reduce_window" not in on and "expm1" not in on
  with cpu.fast_path(False):
    off = _traced(apply, variables, x)
  assert "onednn_conv_same" not in off and "reduce_window_max" in off and "expm1" in off
  monkeypatch.setenv("SCORE_JAX_ONEDNN", "0")
  assert not cpu.enabled() and "onednn_conv_same" not in _traced(apply, variables, x)
  with cpu.fast_path(True):
    assert cpu.enabled()


def test_elu_with_an_explicit_alpha_and_strided_convolutions_stay_xla():
  import flax.linen as nn
  f = lambda x: jax.nn.elu(x, 0.5)
  assert "expm1" in _traced(cpu.rewrite(f), jnp.ones((2, 3)))
  layer = nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME")
  variables = layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))
  text = _traced(cpu.rewrite(layer.apply), variables, jnp.ones((1, 8, 8, 2)))
  assert "conv_general_dilated" in text and "onednn_conv_same" not in text


@pytest.mark.parametrize("name", IMAGE_NETWORKS)
def test_jvp_equals_finite_differences_with_the_fast_path_on_and_off(name):
  apply, variables, x = _network(name)
  t = jax.random.normal(jax.random.key(3), x.shape)
  h = 4e-3

  def tangents_and_differences(x, t):
    on = jax.jvp(lambda x: apply(variables, x), (x,), (t,))[1]
    with cpu.fast_path(False):  # read while this function is traced
      off = jax.jvp(lambda x: apply(variables, x), (x,), (t,))[1]
      # Central differences at h and h / 2 in one batch, Richardson-extrapolated: error
      # O(h^4) plus float32 rounding ~1e-7 |f| / h.
      f = apply(variables, jnp.concatenate([x + s * t for s in (h, -h, h / 2, -h / 2)]))
    f = f.reshape((4,) + on.shape)
    d_h, d_half = (f[0] - f[1]) / (2 * h), (f[2] - f[3]) / h
    return on, off, (4 * d_half - d_h) / 3

  on, off, diff = jax.jit(tangents_and_differences)(x, t)
  scale = float(jnp.linalg.norm(diff))
  assert scale > 0
  # Differences of float32 networks with ReLU/max kinks (a step of h crosses some) and sums
  # that cancel (discriminator logits) agree with the exact tangent to a few percent: a loose
  # check that catches a wrong rule (sign, missing term, zero); on against off is the tight one.
  assert float(jnp.linalg.norm(off - diff)) < 1e-1 * scale, name
  assert float(jnp.linalg.norm(on - diff)) < 1e-1 * scale, name
  assert float(jnp.linalg.norm(on - off)) < 1e-4 * scale, name


def test_jacfwd_and_a_hessian_vector_product_through_the_fast_path():
  apply, variables, x = _network("ncsnv2")
  directions = jax.random.normal(jax.random.key(4), (2,) + x.shape)
  along = lambda c: apply(variables, x + jnp.tensordot(c, directions, 1))
  jac = jax.jit(jax.jacfwd(along))(jnp.zeros(2))
  for i in range(2):
    with cpu.fast_path(False):
      want = jax.jvp(lambda x: apply(variables, x), (x,), (directions[i],))[1]
    np.testing.assert_allclose(jac[..., i], want, rtol=1e-3, atol=1e-4 * float(jnp.abs(want).max()))
  loss = lambda x: jnp.sum(apply(variables, x) ** 2)
  hvp = lambda: jax.jvp(jax.grad(loss), (x,), (directions[0],))[1]
  on = jax.jit(hvp)()
  with cpu.fast_path(False):
    off = jax.jit(hvp)()
  assert float(jnp.linalg.norm(on - off)) < 1e-3 * float(jnp.linalg.norm(off))


def test_accelerated_module_keeps_the_module_interface():
  module, shape, _ = tiny_networks()["ncsnv2"]
  model = cpu.accelerate(module)
  assert cpu.accelerate(model) is model and cpu.unwrap(model) is module
  assert model.output_convention == module.output_convention and model.ngf == module.ngf
  assert model == cpu.accelerate(module) and hash(model) == hash(cpu.accelerate(module))
