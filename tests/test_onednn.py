"""The oneDNN convolution custom call: values, FLOP accounting, shard_map, vmap, fallbacks."""
import functools
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import HANG_TIMEOUT_S, REPO
from score_jax.cpu import conv, onednn

needs_onednn = pytest.mark.skipif(not onednn.available(),
                                  reason="this jaxlib has no oneDNN convolutions (not x86-64?)")


def _arrays(shape_x, shape_w, seed=0):
  rs = np.random.RandomState(seed)
  return (jnp.asarray(rs.randn(*shape_x), jnp.float32),
          jnp.asarray(rs.randn(*shape_w) * 0.2, jnp.float32))


def test_available_on_x86_64_linux():
  # A silent fallback would only show as a slower training step: on x86-64 it must be on.
  if platform.machine() != "x86_64" or sys.platform != "linux":
    pytest.skip("oneDNN is only expected in x86-64 Linux jaxlib builds")
  assert onednn.available()


@needs_onednn
@pytest.mark.parametrize("k,d", [(1, 1), (3, 1), (3, 2), (3, 4), (5, 1)])
def test_custom_call_matches_lax_and_its_flops_match_xla(k, d):
  x, w = _arrays((2, 10, 9, 5), (k, k, 5, 7), seed=k + d)
  ours = jax.jit(functools.partial(onednn.conv_same, dilation=d)).lower(x, w).compile()
  ref = jax.jit(functools.partial(onednn._lax_conv_same, dilation=d)).lower(x, w).compile()
  assert onednn.TARGET in ours.as_text()
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  cost = ref.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert onednn.flops(ours.as_text()) == cost["flops"]


@needs_onednn
def test_inside_shard_map_with_replicated_weights_and_gradients():
  from score_jax import parallel
  mesh = parallel.make_mesh(len(jax.devices()))
  x, w = _arrays((2 * mesh.size, 6, 6, 3), (3, 3, 3, 4))

  def body(w, x):  # x per device, w replicated: the custom call needs matching varying axes
    loss = lambda w, x: jnp.sum(jnp.sin(conv.same_conv(x, w, 2)))
    gw, gx = jax.grad(loss, (0, 1))(parallel.per_device(w), x)
    return jax.lax.pmean(gw, parallel.BATCH_AXIS), gx, onednn.conv_same(x, w, 2)

  xs = jax.device_put(x, NamedSharding(mesh, P(parallel.BATCH_AXIS)))
  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(parallel.BATCH_AXIS)),
                               out_specs=(P(), P(parallel.BATCH_AXIS), P(parallel.BATCH_AXIS))))
  assert onednn.TARGET in step.lower(w, xs).compile().as_text()
  gw, gx, y = step(w, xs)
  np.testing.assert_allclose(y, onednn._lax_conv_same(x, w, dilation=2), rtol=1e-5, atol=1e-5)
  ref_loss = lambda w, x: jnp.sum(jnp.sin(onednn._lax_conv_same(x, w, dilation=2)))
  want_gw, want_gx = jax.grad(ref_loss, (0, 1))(w, x)
  np.testing.assert_allclose(gx, want_gx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw, want_gw / mesh.size, rtol=1e-4, atol=1e-5)


def test_vmap_and_second_order_fall_back_to_lax():
  x, w = _arrays((3, 2, 6, 6, 3), (3, 3, 3, 4))
  got = jax.vmap(lambda x: onednn.conv_same(x, w))(x)
  np.testing.assert_allclose(got, jax.vmap(lambda x: onednn._lax_conv_same(x, w, dilation=1))(x),
                             rtol=1e-5, atol=1e-5)
  # Hessian-vector product through the hand-written derivatives (as sliced score matching needs).
  f = lambda x: jnp.sum(jnp.tanh(conv.same_conv(x, w)) ** 2)
  g = lambda x: jnp.sum(jnp.tanh(onednn._lax_conv_same(x, w, dilation=1)) ** 2)
  v = jnp.ones_like(x[0])
  hvp = lambda fn: jax.grad(lambda x: jnp.vdot(jax.grad(fn)(x), v))(x[0])
  np.testing.assert_allclose(hvp(f), hvp(g), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not onednn.available(jnp.bfloat16),
                    reason="no oneDNN bf16 here (needs avx512_bf16 or amx_bf16 and x86-64 jaxlib)")
@pytest.mark.parametrize("d", [1, 2])
def test_bfloat16_custom_call_matches_float32_lax_within_bf16_rounding(d):
  x, w = _arrays((2, 10, 9, 16), (3, 3, 16, 8), seed=d)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  ours = jax.jit(functools.partial(onednn.conv_same, dilation=d)).lower(xb, wb).compile()
  assert onednn.TARGET in ours.as_text()
  # The convolution's FLOPs do not depend on the dtype (XLA's bf16 count adds its f32 converts).
  ref = jax.jit(functools.partial(onednn._lax_conv_same, dilation=d)).lower(x, w).compile()
  cost = ref.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert onednn.flops(ours.as_text()) == cost["flops"]
  got = ours(xb, wb)
  assert got.dtype == jnp.bfloat16
  want = onednn._lax_conv_same(xb.astype(jnp.float32), wb.astype(jnp.float32), dilation=d)
  # float32 accumulation, one bf16 rounding of the output: within 2^-8 relative.
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2 ** -8, atol=1e-6)
  # And through the model's convolution with its transpose rule (both gradients in bf16).
  loss = lambda f: lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) ** 2)
  gx, gw = jax.grad(loss(lambda x, w: conv.same_conv(x, w, d)), (0, 1))(xb, wb)
  rx, rw = jax.grad(loss(lambda x, w: onednn._lax_conv_same(x, w, dilation=d)), (0, 1))(
      xb.astype(jnp.float32), wb.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(gx, np.float32), rx, rtol=3e-2, atol=3e-2 * abs(rx).max())
  np.testing.assert_allclose(np.asarray(gw, np.float32), rw, rtol=3e-2, atol=3e-2 * abs(rw).max())


def test_the_switch_and_other_dtypes_use_xla():
  code = ("import jax, jax.numpy as jnp; from score_jax.cpu import onednn, conv; "
          "x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2)); "
          "f = lambda x, w: jax.jit(conv.same_conv).lower(x, w).compile().as_text(); "
          "print(onednn.TARGET in f(x, w) + f(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)))")
  env = dict(os.environ, SCORE_JAX_ONEDNN="0", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=HANG_TIMEOUT_S, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "False"
  x, w = _arrays((1, 5, 5, 2), (3, 3, 2, 2))
  text = jax.jit(conv.same_conv).lower(x.astype(jnp.float16), w.astype(jnp.float16))
  assert onednn.TARGET not in text.compile().as_text()
  assert not onednn.available(jnp.float16)


def test_other_platforms_lower_to_the_lax_convolution():
  # No GPU here: lower (not compile) for CUDA and TPU, as jax.export does for any platform.
  x, w = _arrays((1, 5, 5, 2), (3, 3, 2, 2))
  exported = jax.export.export(jax.jit(conv.same_conv), platforms=["cuda", "tpu"])(x, w)
  text = exported.mlir_module()
  assert "stablehlo.convolution" in text and onednn.TARGET not in text


def test_eager_calls_compile_once():
  # Outside jit the primitives run through a cached jitted function: the second eager call of
  # the same shape must not compile again (a model applied eagerly calls them many times).
  from score_jax.cpu import onednn_wgrad
  x, w = _arrays((1, 6, 6, 2), (3, 3, 2, 3))
  g = jnp.ones((1, 6, 6, 3))
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event \
      else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for _ in range(2):
      compiles.clear()
      onednn.conv_same(x, w, 2)
      onednn_wgrad.weight_grad(x, g, 3, 2)
    assert compiles == []
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
