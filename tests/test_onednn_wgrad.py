"""The oneDNN weight-gradient FFI call: build, values, FLOPs, shard_map, loops, fallbacks."""
import functools
import os
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import HANG_TIMEOUT_S, REPO
from score_jax.cpu import conv, onednn_wgrad

needs_wgrad = pytest.mark.skipif(not onednn_wgrad.available(),
                                 reason="the oneDNN weight gradient is not built here "
                                 "(not x86-64 Linux, no oneDNN wheels or no C++ compiler)")


def _lax_conv(x, w, d):
  p = d * (w.shape[0] // 2)
  return lax.conv_general_dilated(x, w, (1, 1), [(p, p)] * 2, rhs_dilation=(d, d),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _want(x, g, k, d):
  """The weight gradient by differentiating the lax convolution."""
  w = jnp.zeros((k, k, x.shape[3], g.shape[3]), jnp.float32)
  return jax.vjp(lambda w: _lax_conv(x, w, d), w)[1](g)[0]


def _arrays(shape_x, o, seed=0):
  rs = np.random.RandomState(seed)
  return (jnp.asarray(rs.randn(*shape_x), jnp.float32),
          jnp.asarray(rs.randn(*shape_x[:3], o), jnp.float32))


def test_built_on_x86_64_linux():
  # A silent fallback would only show as a slower training step: where the pinned wheels and a
  # compiler exist, it must be on.
  if platform.machine() != "x86_64" or sys.platform != "linux":
    pytest.skip("the oneDNN wheels are pinned for x86-64 Linux only")
  if not (shutil.which("c++") or shutil.which("g++")):
    pytest.skip("no C++ compiler here to build the oneDNN weight gradient")
  assert onednn_wgrad.available()


@needs_wgrad
@pytest.mark.parametrize("k,d,shape", [(1, 1, (2, 7, 5, 3)), (3, 1, (3, 10, 9, 5)),
                                       (3, 2, (2, 8, 8, 16)), (3, 4, (2, 6, 7, 4)),
                                       (5, 1, (1, 9, 9, 6)), (3, 1, (4, 16, 16, 64))])
def test_matches_the_lax_gradient_and_counts_xlas_flops(k, d, shape):
  x, g = _arrays(shape, 2 * shape[3] + 1, seed=k + d)
  f = jax.jit(functools.partial(onednn_wgrad.weight_grad, kernel_size=k, dilation=d))
  compiled = f.lower(x, g).compile()
  assert onednn_wgrad.TARGET in compiled.as_text()
  want = _want(x, g, k, d)
  got = compiled(x, g)
  assert got.shape == (k, k, shape[3], g.shape[3]) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  # The same FLOPs as XLA counts for the forward convolution with the same taps.
  w = jnp.zeros((k, k, shape[3], g.shape[3]), jnp.float32)
  cost = jax.jit(functools.partial(_lax_conv, d=d)).lower(x, w).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert onednn_wgrad.flops(compiled.as_text()) == cost["flops"]


@pytest.mark.skipif(not onednn_wgrad.available(jnp.bfloat16),
                    reason="no oneDNN bf16 weight gradient here (needs it built and avx512_bf16 "
                    "or amx_bf16)")
@pytest.mark.parametrize("d", [1, 2])
def test_bfloat16_matches_float32_within_one_rounding(d):
  x, g = _arrays((4, 10, 9, 32), 16, seed=d)
  xb, gb = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
  f = jax.jit(functools.partial(onednn_wgrad.weight_grad, kernel_size=3, dilation=d))
  compiled = f.lower(xb, gb).compile()
  assert onednn_wgrad.TARGET in compiled.as_text()
  got = compiled(xb, gb)
  assert got.dtype == jnp.bfloat16
  want = _want(xb.astype(jnp.float32), gb.astype(jnp.float32), 3, d)
  # float32 accumulation, one bf16 rounding: within 2^-8 relative (plus summation order).
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2 ** -8,
                             atol=1e-5 * float(jnp.abs(want).max()))
  assert onednn_wgrad.flops(compiled.as_text()) == onednn_wgrad.flops(
      f.lower(x, g).compile().as_text()) > 0
  # And the model's bf16 convolution takes it for its weight gradient.
  w = jnp.zeros((3, 3, 32, 16), jnp.bfloat16)
  grad = jax.jit(jax.grad(lambda w: jnp.sum(conv.same_conv(xb, w, d).astype(jnp.float32) ** 2)))
  assert onednn_wgrad.TARGET in grad.lower(w).compile().as_text()


@needs_wgrad
def test_model_gradients_use_it_also_inside_scan():
  x, _ = _arrays((2, 8, 8, 4), 4)
  w = jnp.asarray(np.random.RandomState(1).randn(3, 3, 4, 4), jnp.float32) * 0.2

  def run(f, w):
    grad = jax.grad(lambda w: jnp.sum(jnp.sin(f(x, w)) ** 2))
    return jax.lax.scan(lambda w, _: (w - 1e-2 * grad(w), None), w, None, length=3)[0]

  ours = jax.jit(functools.partial(run, lambda x, w: conv.same_conv(x, w, 2)))
  assert onednn_wgrad.TARGET in ours.lower(w).compile().as_text()
  np.testing.assert_allclose(ours(w), run(lambda x, w: _lax_conv(x, w, 2), w), rtol=1e-5, atol=1e-6)


@needs_wgrad
def test_per_device_gradients_on_all_devices_at_once():
  # Every simulated device runs the same primitive concurrently (each call its own scratchpad).
  from score_jax import parallel
  mesh = parallel.make_mesh(len(jax.devices()))
  x, _ = _arrays((2 * mesh.size, 12, 12, 32), 1)
  w = jnp.asarray(np.random.RandomState(2).randn(3, 3, 32, 48), jnp.float32) * 0.1
  loss = lambda f: lambda w, x: jnp.sum(jnp.tanh(f(x, w)) ** 2)

  def body(w, x):
    gw, gx = jax.grad(loss(lambda x, w: conv.same_conv(x, w, 2)), (0, 1))(parallel.per_device(w), x)
    return jax.lax.pmean(gw, parallel.BATCH_AXIS), gx

  xs = jax.device_put(x, NamedSharding(mesh, P(parallel.BATCH_AXIS)))
  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(parallel.BATCH_AXIS)),
                               out_specs=(P(), P(parallel.BATCH_AXIS))))
  text = step.lower(w, xs).compile().as_text()
  assert onednn_wgrad.TARGET in text
  # The simulated devices share the cores: each call gets its share of OpenMP threads.
  cores = len(os.sched_getaffinity(0))
  assert f"threads = {max(1, cores // mesh.size)} : i64" in text
  want_gw, want_gx = jax.grad(loss(lambda x, w: _lax_conv(x, w, 2)), (0, 1))(w, x)
  for _ in range(3):
    gw, gx = step(w, xs)
    np.testing.assert_allclose(gw, want_gw / mesh.size, rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(want_gw).max()) / mesh.size)
    np.testing.assert_allclose(gx, want_gx, rtol=1e-4, atol=1e-5 * float(jnp.abs(want_gx).max()))


def test_threads_per_call_share_the_cores_or_omp_num_threads(monkeypatch):
  from score_jax import parallel
  x = jnp.ones((8, 4, 4, 2))
  cores = len(os.sched_getaffinity(0))
  monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
  assert onednn_wgrad._threads(x) == cores
  mesh = parallel.make_mesh(len(jax.devices()))
  seen = []
  body = lambda x: (seen.append(onednn_wgrad._threads(x)), x)[1]
  jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(parallel.BATCH_AXIS),
                        out_specs=P(parallel.BATCH_AXIS))).lower(x)
  assert seen == [max(1, cores // mesh.size)]
  monkeypatch.setenv("OMP_NUM_THREADS", "12,2")
  assert onednn_wgrad._threads(x) == 12


def test_derivatives_and_vmap_use_the_lax_form():
  x, g = _arrays((2, 6, 6, 3), 4)
  f = functools.partial(onednn_wgrad.weight_grad, kernel_size=3, dilation=1)
  ref = functools.partial(_want, k=3, d=1)
  v = jnp.asarray(np.random.RandomState(3).randn(3, 3, 3, 4), jnp.float32)
  # Bilinear in x and g: its derivatives (here: what differentiating a weight gradient again
  # needs) come from the lax form.
  for argnum in (0, 1):
    got = jax.grad(lambda x, g: jnp.vdot(f(x, g), v), argnum)(x, g)
    np.testing.assert_allclose(got, jax.grad(lambda x, g: jnp.vdot(ref(x, g), v), argnum)(x, g),
                               rtol=1e-5, atol=1e-5)
  xs, gs = jnp.stack([x, 2 * x]), jnp.stack([g, -g])
  np.testing.assert_allclose(jax.vmap(f)(xs, gs), jax.vmap(ref)(xs, gs), rtol=1e-5, atol=1e-5)


def test_rejects_even_kernels_and_mismatched_shapes():
  x, g = _arrays((2, 6, 6, 3), 4)
  with pytest.raises(ValueError, match="odd kernel_size"):
    onednn_wgrad.weight_grad(x, g, kernel_size=2)
  with pytest.raises(ValueError, match="same b, h, w"):
    onednn_wgrad.weight_grad(x, g[:, :5], kernel_size=3)


def test_other_platforms_lower_to_the_lax_convolution():
  x, g = _arrays((1, 5, 5, 2), 3)
  w = jnp.ones((3, 3, 2, 3))
  grad = jax.grad(lambda w, x: jnp.sum(conv.same_conv(x, w) ** 2))
  text = jax.export.export(jax.jit(grad), platforms=["cuda", "tpu"])(w, x).mlir_module()
  assert onednn_wgrad.TARGET not in text


def test_first_asked_inside_a_traced_gradient():
  # The probes run their own small programs; asked while a step is being traced (the usual
  # first use) they must still run eagerly and switch both custom calls on.
  code = ("import jax, jax.numpy as jnp; from score_jax.cpu import conv, onednn, "
          "onednn_wgrad; x = jnp.ones((2, 6, 6, 3)); w = jnp.ones((3, 3, 3, 4)); "
          "t = jax.jit(jax.grad(lambda w: jnp.sum(conv.same_conv(x, w) ** 2))).lower(w)"
          ".compile().as_text(); print(onednn.TARGET in t, onednn_wgrad.TARGET in t)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=HANG_TIMEOUT_S, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["True", str(onednn_wgrad.available())]


@pytest.mark.parametrize("env", [{"SCORE_JAX_ONEDNN": "0"}, {"CXX": "/bin/false"}],
                         ids=["switch", "failed-build"])
def test_the_switch_and_a_failed_build_fall_back_to_xla(env, tmp_path):
  code = ("import jax, jax.numpy as jnp, numpy as np; from jax import lax; "
          "from score_jax.cpu import conv, onednn_wgrad; "
          "x = jnp.asarray(np.random.RandomState(0).randn(2, 6, 6, 3), jnp.float32); "
          "w = jnp.ones((3, 3, 3, 4)) * 0.1; "
          "f = lambda c: jax.grad(lambda w: jnp.sum(jnp.sin(c(x, w)) ** 2)); "
          "lx = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2, "
          "dimension_numbers=('NHWC', 'HWIO', 'NHWC')); "
          "ours = jax.jit(f(conv.same_conv)); "
          "np.testing.assert_allclose(ours(w), f(lx)(w), rtol=1e-5, atol=1e-5); "
          "print(onednn_wgrad.TARGET in ours.lower(w).compile().as_text())")
  # A fresh cache, so the failing compiler is really asked to build.
  env = dict(os.environ, JAX_PLATFORMS="cpu", SCORE_JAX_CACHE=str(tmp_path), **env)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=HANG_TIMEOUT_S, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "False"
