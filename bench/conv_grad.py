"""Why is the training step slow on CPU? Forward vs gradient convolutions, in isolation.

    .venv/bin/python bench/conv_grad.py                        # default XLA flags
    XLA_FLAGS=--xla_cpu_use_onednn=true .venv/bin/python bench/conv_grad.py

Times one 3x3 convolution at the sizes that dominate NCSNv2 on CIFAR-10 (batch 16, 32x32 and
16x16, 128 and 256 channels): the forward conv, XLA's input and weight gradients, the weight
gradient written by hand as shifted-slice matmuls and as one im2col GEMM, the canonical gradients of
score_jax/cpu/conv.py (whose CPU weight gradient runs in Eigen, see its docstring) next to the
same weight gradient in its plain form (which XLA gives to YNNPACK), and both weight gradients
inside a 4-step lax.scan (per step). Prints
GFLOP/s (2 * b * h * w * 9 * cin * cout per call) next to a float32 matmul of the same FLOPs.
Results and what was tried are recorded in bench/NOTES.md.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from score_jax.cpu.conv import _weight_grad as conv_weight_grad  # noqa: E402
from score_jax.cpu.conv import same_conv  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")


def _time(fn, *args, repeats=7):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)


def weight_grad_by_matmuls(x, g):
  """dW[i, j] = sum over (b, h, w) of x shifted by (i, j) outer g: nine [c, b*h*w] @ [b*h*w, f]."""
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  gm = g.reshape(-1, g.shape[-1])
  return jnp.stack([xp[:, i:i + h, j:j + w, :].reshape(-1, c).T @ gm
                    for i in range(3) for j in range(3)]).reshape(3, 3, c, g.shape[-1])


def weight_grad_im2col(x, g):
  """dW as one GEMM: patches [b*h*w, 9c] from nine shifted slices, contracted with g."""
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)],
                            axis=-1).reshape(-1, 9 * c)
  return lax.dot_general(patches, g.reshape(-1, g.shape[-1]),
                         (((0,), (0,)), ((), ()))).reshape(3, 3, c, g.shape[-1])


def _plain_weight_grad(x, g, inflate=1):
  """conv.py's weight gradient as a convolution: plain (YNNPACK runs it) or, with inflate=2,
  with its input/kernel-dilation trick (Eigen runs it; conv.py's CPU form without oneDNN)."""
  return conv_weight_grad(x, g, dilation=1, pad=1, inflate=inflate)


def in_scan(grad_fn, steps=4):
  """`grad_fn(x, w, g) -> dW` applied `steps` times inside one lax.scan (a while loop).

  The carry is x, which the weight gradient depends on, so XLA cannot hoist it out of the loop.
  """
  def run(x, w, g):
    body = lambda x, _: (x + 1e-9 * jnp.sum(grad_fn(x, w, g)), None)
    return lax.scan(body, x, None, length=steps)[0]
  return run


def main():
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} jax {jax.__version__}")
  rs = np.random.RandomState(0)
  for b, hw, c, f in ((16, 32, 128, 128), (16, 16, 256, 256)):
    x = jnp.asarray(rs.rand(b, hw, hw, c).astype(np.float32))
    w = jnp.asarray(rs.rand(3, 3, c, f).astype(np.float32) / 30)
    g = jnp.asarray(rs.rand(b, hw, hw, f).astype(np.float32))
    flops = 2 * b * hw * hw * 9 * c * f
    m = int(round((flops / 2) ** (1 / 3)))
    a = jnp.asarray(rs.rand(m, m).astype(np.float32))
    rows = {
        "matmul (same FLOPs)": _time(lambda a: a @ a, a) * flops / (2 * m ** 3),
        "forward conv": _time(conv, x, w),
        "input grad (XLA)": _time(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[0], x, w, g),
        "weight grad (XLA)": _time(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[1], x, w, g),
        "weight grad (9 matmuls)": _time(weight_grad_by_matmuls, x, g),
        "weight grad (im2col GEMM)": _time(weight_grad_im2col, x, g),
        "input grad (conv.py)": _time(lambda x, w, g: jax.vjp(same_conv, x, w)[1](g)[0], x, w, g),
        "weight grad (conv.py)": _time(lambda x, w, g: jax.vjp(same_conv, x, w)[1](g)[1], x, w, g),
        "weight grad (plain form)": _time(_plain_weight_grad, x, g),
        "weight grad (Eigen form)": _time(functools.partial(_plain_weight_grad, inflate=2), x, g),
        "weight grad (XLA) in scan": _time(in_scan(
            lambda x, w, g: jax.vjp(conv, x, w)[1](g)[1]), x, w, g, repeats=1) / 4,
        "weight grad (conv.py) in scan": _time(in_scan(
            lambda x, w, g: jax.vjp(same_conv, x, w)[1](g)[1]), x, w, g) / 4,
    }
    print(f"b={b} {hw}x{hw} {c}->{f}: {flops / 1e9:.2f} GFLOP per call")
    for name, t in rows.items():
      print(f"  {name:<26} {t * 1e3:8.1f} ms  {flops / t / 1e9:7.1f} GFLOP/s")


if __name__ == "__main__":
  main()
