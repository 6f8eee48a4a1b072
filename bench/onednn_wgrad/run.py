"""Prototype A/B: the convolution weight gradient in oneDNN's backward-weights primitive (an XLA
FFI call, `wgrad.cc`) against score_jax's Eigen form, per convolution and in the NCSNv2 CIFAR-10
training step (batch 16). Not used by score_jax; bench/NOTES.md section 2 has the findings.

    OUT=/tmp/onednn_wgrad bash bench/onednn_wgrad/build.sh
    OMP_NUM_THREADS=2 .venv/bin/python bench/onednn_wgrad/run.py /tmp/onednn_wgrad/libonednn_wgrad.so
"""

import ctypes
import functools
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import workloads  # noqa: E402
from conv_grad import _time  # noqa: E402
from score_jax.models import conv  # noqa: E402


def onednn_weight_grad(x, g, kernel_shape, dilation):
  return jax.ffi.ffi_call("onednn_wgrad", jax.ShapeDtypeStruct(kernel_shape, jnp.float32))(
      x, g, dilation=np.int64(dilation))


def eigen_weight_grad(x, g, kernel_shape, dilation):
  pad = dilation * (kernel_shape[0] // 2)
  dw = conv._weight_grad(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), dilation=dilation,
                         pad=pad, precision=None, inflate=2)
  return dw.transpose(1, 2, 0, 3)


def _bwd_with_onednn(dilation, precision, residuals, g):
  """conv.same_conv's backward with the weight gradient swapped (float32 only); XLA drops the
  unused Eigen weight gradient of the original rule."""
  dx, _ = conv._same_conv_bwd(dilation, precision, residuals, g)
  x, w = residuals
  dw = onednn_weight_grad(x, g, w.shape, dilation)
  missing = tuple(jax.typeof(w).mat.varying - jax.typeof(dw).mat.varying)
  return dx, (lax.pcast(dw, missing, to="varying") if missing else dw)


def per_convolution():
  rs = np.random.RandomState(0)
  for b, h, c, o, d in [(16, 32, 128, 128, 1), (16, 16, 256, 256, 1), (16, 16, 256, 256, 2),
                        (16, 16, 256, 256, 4), (16, 32, 128, 256, 1)]:
    x = jnp.asarray(rs.randn(b, h, h, c), jnp.float32)
    g = jnp.asarray(rs.randn(b, h, h, o), jnp.float32)
    ours = jax.jit(functools.partial(onednn_weight_grad, kernel_shape=(3, 3, c, o), dilation=d))
    eigen = jax.jit(functools.partial(eigen_weight_grad, kernel_shape=(3, 3, c, o), dilation=d))
    want = np.asarray(eigen(x, g))
    err = np.abs(np.asarray(ours(x, g)) - want).max() / np.abs(want).max()
    t_ours, t_eigen = _time(ours, x, g, repeats=15), _time(eigen, x, g, repeats=15)
    print(f"x {(b, h, h, c)} -> {o}, dilation {d}: oneDNN {t_ours * 1e3:.2f} ms, Eigen with "
          f"transposes {t_eigen * 1e3:.2f} ms, max relative difference {err:.1e}", flush=True)


def training_step(repeats=5):
  rng, steps = jax.random.key(0), {}
  for name, bwd in [("eigen", conv._same_conv_bwd), ("onednn", _bwd_with_onednn)]:
    conv.same_conv.defvjp(conv._same_conv_fwd, bwd)  # read when the step is traced
    _, _, state, step, batch = workloads._state_and_step(workloads._ncsnv2_cifar_config(), 16)
    state, _ = step(state, batch, rng)
    steps[name] = [jax.block_until_ready(state), step, batch]
  conv.same_conv.defvjp(conv._same_conv_fwd, conv._same_conv_bwd)
  times = {name: [] for name in steps}
  for _ in range(repeats):  # interleaved, so both see the same machine
    for name, entry in steps.items():
      state, step, batch = entry
      t0 = time.perf_counter()
      entry[0] = jax.block_until_ready(step(state, batch, rng)[0])
      times[name].append(time.perf_counter() - t0)
  for name, ts in times.items():
    print(f"training step, weight gradient in {name}: median {statistics.median(ts):.3f} s "
          f"({' '.join(f'{t:.3f}' for t in ts)})")


if __name__ == "__main__":
  lib = ctypes.cdll.LoadLibrary(sys.argv[1])
  jax.ffi.register_ffi_target("onednn_wgrad", jax.ffi.pycapsule(lib.OneDnnWeightGrad),
                              platform="cpu")
  per_convolution()
  training_step()
