"""score_jax.cpu: the switch, what it rewrites, and the rewritten networks against XLA's own.

For one network per set of operations the rewrite replaces (convolutions with and without
dilation, max and sum pooling, ELU, softplus, inside remat or not) and per network family with
other operations around the replaced ones (UNet, BigGAN discriminator), the value, a
forward-mode tangent and the gradient with respect to the input and every variable with the
fast path on equal those with it off; the fast operations' own kernels are checked
against lax in test_conv.py, test_pool.py and test_activations.py. On one small network the
fast path's derivatives are also checked against finite differences, `jax.jacfwd` and a
Hessian-vector product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import cpu
from score_jax.models import ncsn
from tests.test_param_trees import LADDER, tiny_networks

pytestmark = pytest.mark.usefixtures("fast_compile")


def _network(name, module=None):
  """(apply(variables, x) for any batch of x, variables, x) of a tiny preset (or `module` in
  its place, with the preset's input)."""
  preset, shape, takes_sigma = tiny_networks()[name]
  module = preset if module is None else module
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


def _ncsnv2_remat():
  return ncsn.NCSNv2(ngf=4, remat=True)


def _ncsn_on_8x8x3():
  return ncsn.NCSN(ngf=4, num_channels=3, level_sigmas=LADDER)


# name -> (tiny preset whose input it takes, module in the preset's place or None, XLA operations
# the fast path replaces in all of the network: absent from the program with the switch on,
# present with it off). A 5 x 5 pooling window is replaced by separable 1 x 5 and 5 x 1 ones.
REWRITTEN = {
    # NCSNv2: 3x3, dilated 3x3 and 1x1 convolutions, 5x5 max pooling, ELU, all inside remat.
    "ncsnv2_remat": ("ncsnv2", _ncsnv2_remat,
                     ("conv_general_dilated", "window_dimensions=(1, 5, 5, 1)", "expm1")),
    # NCSN: 5x5 sum pooling (average pooling) between level-conditional norms.
    "ncsn": ("ncsnv2", _ncsn_on_8x8x3,
             ("conv_general_dilated", "window_dimensions=(1, 5, 5, 1)", "expm1")),
    # Softplus.
    "mlp": ("mlp", None, ("logaddexp",)),
    # Stride-1 convolutions among stride-2 ones (XLA's), swish, group norm, attention.
    "unet_conditional": ("unet_conditional", None, ("window_strides=(1, 1)\n",)),
    # Convolutions through lax with spectral norm, 2x2 average pooling (XLA's), ReLU.
    "biggan32": ("biggan32", None, ("window_strides=(1, 1)\n",)),
}


@pytest.mark.parametrize("name", sorted(REWRITTEN))
def test_the_fast_path_equals_xla_in_value_tangent_and_gradients(name):
  preset, module, replaced = REWRITTEN[name]
  apply, variables, x = _network(preset, module and module())
  on_text = _traced(apply, variables, x)
  with cpu.fast_path(False):
    off_text = _traced(apply, variables, x)
  for op in replaced:
    assert op not in on_text and op in off_text, (name, op)
  t = jax.random.normal(jax.random.key(3), x.shape)

  def value_tangent_gradients(variables, x):
    y, tangent = jax.jvp(lambda x: apply(variables, x), (x,), (t,))
    cotangent = jax.random.normal(jax.random.key(4), y.shape)
    grads = jax.grad(lambda v, x: jnp.vdot(apply(v, x), cotangent), argnums=(0, 1))(variables, x)
    return {"value": y, "tangent": tangent, "gradient": grads}

  # Fresh functions: the switch is read when tracing.
  on = jax.jit(lambda v, x: value_tangent_gradients(v, x))(variables, x)
  with cpu.fast_path(False):
    off = jax.jit(lambda v, x: value_tangent_gradients(v, x))(variables, x)
  for part in ("value", "tangent", "gradient"):
    leaves_on, _ = jax.tree_util.tree_flatten_with_path(on[part])
    leaves_off = [np.asarray(b) for b in jax.tree.leaves(off[part])]
    scale = np.sqrt(sum(np.sum(np.square(b)) for b in leaves_off))
    assert np.isfinite(scale) and scale > 0, (name, part)
    for (path, a), b in zip(leaves_on, leaves_off):
      # Float32 sums in another order: a few ulp relative to the leaf, or to the whole part for
      # a leaf that cancels to almost nothing (a convolution bias before a group norm).
      error = np.linalg.norm(np.asarray(a) - b)
      where = f"{name} {part}{jax.tree_util.keystr(path)}"
      assert error <= 1e-4 * np.linalg.norm(b) + 1e-5 * scale, where


def test_jvp_equals_finite_differences_with_the_fast_path_on_and_off():
  apply, variables, x = _network("ncsnv2")
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
  # Differences of a float32 network with max-pooling kinks (a step of h crosses some) agree
  # with the exact tangent to a few percent: a loose check that catches a wrong rule (sign,
  # missing term, zero); on against off is the tight one.
  assert float(jnp.linalg.norm(off - diff)) < 1e-1 * scale
  assert float(jnp.linalg.norm(on - diff)) < 1e-1 * scale
  assert float(jnp.linalg.norm(on - off)) < 1e-4 * scale


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
