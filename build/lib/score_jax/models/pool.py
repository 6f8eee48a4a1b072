"""Stride-1 'same' pooling of chained residual pooling (RefineNet CRP), written for speed.

`max_pool_same(x, k)` equals torch `MaxPool2d(k, 1, k // 2)` / `flax.linen.max_pool` with -inf
padding, and `avg_pool_same(x, k)` equals torch `AvgPool2d(k, 1, k // 2)` (zero padding counted,
the default `count_include_pad=True`). Both are separable: a k x k window is a k-window along
height, then along width, so each output costs 2k operations instead of k^2.

Why: XLA:CPU runs the 2-D `reduce_window` of `nn.max_pool` at ~15 ms and its gradient
(select-and-scatter) at ~130 ms for one [16, 32, 32, 128] array on the 2-core CI machine; ten of
them sit in every NCSNv2 training step (bench/NOTES.md).

Gradients of the max pool: a custom VJP sends each window's gradient to its first maximal
element (lowest index) along each axis, as select-and-scatter does, computed by slices and selects
that XLA fuses. Where a 2-D window has several equal maxima, the element chosen (first along
height, then along width) can differ from the row-major first that select-and-scatter picks;
values are identical, and gradients differ only at such ties. Like the convolutions of conv.py,
the max pool has reverse mode only (no jvp); `avg_pool_same` has both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float


def _check(x: jax.Array, k: int) -> None:
  if x.ndim != 4:
    raise ValueError(f"pooling takes NHWC [b, h, w, c] arrays, got shape {x.shape}")
  if k < 1 or k % 2 == 0:
    raise ValueError(f"window={k}: 'same' stride-1 pooling needs an odd window >= 1")


def _shifted(xp: jax.Array, axis: int, k: int, n: int) -> list[jax.Array]:
  """The k windows' d-th elements: xp[d : d + n] along `axis`, for d = 0..k-1."""
  return [lax.slice_in_dim(xp, d, d + n, axis=axis) for d in range(k)]


def _pad(x: jax.Array, axis: int, k: int, value: float) -> jax.Array:
  widths = [(0, 0)] * x.ndim
  widths[axis] = (k // 2, k // 2)
  return jnp.pad(x, widths, constant_values=value)


def _first_max(x: jax.Array, axis: int, k: int) -> tuple[jax.Array, jax.Array]:
  """Max over each k-window along `axis` and the index (int8) of its first maximal element."""
  values = _shifted(_pad(x, axis, k, -jnp.inf), axis, k, x.shape[axis])
  y = functools.reduce(jnp.maximum, values)
  first = jnp.full(y.shape, k - 1, jnp.int8)
  for d in range(k - 2, -1, -1):
    first = jnp.where(values[d] == y, jnp.int8(d), first)
  return y, first


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_1d(x: jax.Array, axis: int, k: int) -> jax.Array:
  return _first_max(x, axis, k)[0]  # XLA drops the unused index


def _max_1d_fwd(x, axis, k):
  return _first_max(x, axis, k)


def _max_1d_bwd(axis, k, first, g):
  # Input j collects g[o] from each output o = j + p - d whose first maximum is at offset d.
  # With g and `first` padded by p, that is a slice at 2p - d of each: k slices of two padded
  # arrays, which XLA fuses into one vectorized loop (padding each of the k terms instead, as
  # the transpose of a JVP would, runs ~2-5x slower on XLA:CPU).
  n, p = g.shape[axis], k // 2
  g_pad, first_pad = _pad(g, axis, k, 0.0), _pad(first, axis, k, -1)
  terms = [jnp.where(lax.slice_in_dim(first_pad, 2 * p - d, 2 * p - d + n, axis=axis) == d,
                     lax.slice_in_dim(g_pad, 2 * p - d, 2 * p - d + n, axis=axis), 0.0)
           for d in range(k)]
  return (functools.reduce(jnp.add, terms).astype(g.dtype),)


_max_1d.defvjp(_max_1d_fwd, _max_1d_bwd)


# Not wrapped in jax.jit. A version with a nested jit hung once in 8-device CPU training
# (tests/test_image_train.py, 2026-11-26); that was most likely the run-ahead deadlock that
# parallel.DispatchWindow fixed later, but the jit bought nothing measurable and is not back.
def max_pool_same(x: Float[Array, "b h w c"], window: int = 5) -> Float[Array, "b h w c"]:
  """k x k max pooling, stride 1, -inf padding of k // 2 (output the size of the input)."""
  _check(x, window)
  return _max_1d(_max_1d(x, 1, window), 2, window)


def avg_pool_same(x: Float[Array, "b h w c"], window: int = 5) -> Float[Array, "b h w c"]:
  """k x k average pooling, stride 1, zero padding of k // 2 counted in the mean (torch default)."""
  _check(x, window)
  p = window // 2
  y = lax.reduce_window(x, 0.0, lax.add, (1, window, 1, 1), (1, 1, 1, 1),
                        ((0, 0), (p, p), (0, 0), (0, 0)))
  y = lax.reduce_window(y, 0.0, lax.add, (1, 1, window, 1), (1, 1, 1, 1),
                        ((0, 0), (0, 0), (p, p), (0, 0)))
  return y / (window * window)
