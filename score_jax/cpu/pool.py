"""Stride-1 'same' pooling of chained residual pooling (RefineNet CRP), written for speed.

`max_pool_same(x, k)` equals torch `MaxPool2d(k, 1, k // 2)` / `flax.linen.max_pool` with -inf
padding, and `sum_pool_same(x, k)` the sum over the same windows with zero padding
(`flax.linen.avg_pool(..., count_include_pad=True)` times k^2, torch `AvgPool2d(k, 1, k // 2)`
times k^2). Both are separable: a k x k window is a k-window along height, then along width, so
each output costs 2k operations instead of k^2.

Why: XLA:CPU runs the 2-D `reduce_window` of `nn.max_pool` and, much slower, its gradient
(select-and-scatter); ten of them sit in every NCSNv2 training step (bench/NOTES.md).

Derivatives of the max pool: the tangent of each 1-D max is the tangent at the window's first
maximal element (lowest index), a map linear in the tangent (`_select_first_p`), whose transpose
sends each window's gradient to that element, as select-and-scatter does, computed by slices and
selects that XLA fuses. Forward mode (`jax.jvp`, `jax.jacfwd`) and reverse mode both work, to any
order. Where a 2-D window has several equal maxima, the element chosen (first along height, then
along width) can differ from the row-major first that select-and-scatter picks; values are
identical, and derivatives differ only at such ties.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jaxtyping import Array, Float

from score_jax import parallel


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


def _select_first(t: jax.Array, first: jax.Array, *, axis: int, k: int) -> jax.Array:
  """out[o] = t_pad[o + first[o]] along `axis` (t padded by k // 2): the tangent of the 1-D max."""
  n = t.shape[axis]
  t_pad = _pad(t, axis, k, 0.0)
  terms = [jnp.where(first == d, lax.slice_in_dim(t_pad, d, d + n, axis=axis), 0.0)
           for d in range(k)]
  return functools.reduce(jnp.add, terms).astype(t.dtype)


def _scatter_first(g: jax.Array, first: jax.Array, *, axis: int, k: int) -> jax.Array:
  """The transpose of `_select_first` in `t`: input j collects g[o] from each output
  o = j + p - d whose first maximum is at offset d."""
  # With g and `first` padded by p, that is a slice at 2p - d of each: k slices of two padded
  # arrays, which XLA fuses into one vectorized loop (padding each of the k terms instead, as
  # JAX's transpose of `_select_first` would, runs ~2-5x slower on XLA:CPU).
  n, p = g.shape[axis], k // 2
  g_pad, first_pad = _pad(g, axis, k, 0.0), _pad(first, axis, k, -1)
  terms = [jnp.where(lax.slice_in_dim(first_pad, 2 * p - d, 2 * p - d + n, axis=axis) == d,
                     lax.slice_in_dim(g_pad, 2 * p - d, 2 * p - d + n, axis=axis), 0.0)
           for d in range(k)]
  return functools.reduce(jnp.add, terms).astype(g.dtype)


# Linear in its first operand, with `_scatter_first` as the transpose: a primitive, because a
# transpose cannot be given to a plain function.
_select_first_p = Primitive("select_first_max")
_select_first_p.def_impl(_select_first)
_select_first_p.def_abstract_eval(lambda t, first, *, axis, k: t)
mlir.register_lowering(_select_first_p, mlir.lower_fun(_select_first, multiple_results=False))


def _select_first_jvp(primals, tangents, *, axis, k):
  (t, first), (t_dot, _) = primals, tangents
  out = _select_first_p.bind(t, first, axis=axis, k=k)
  if type(t_dot) is ad.Zero:
    return out, jnp.zeros_like(out)
  return out, _select_first_p.bind(t_dot, first, axis=axis, k=k)


def _select_first_transpose(ct, t, first, *, axis, k):
  if type(ct) is ad.Zero:
    return None, None
  return _scatter_first(ct, first, axis=axis, k=k), None


def _select_first_batch(args, dims, *, axis, k):
  # The lax form under vmap (its transpose is JAX's, slower but equal).
  return jax.vmap(functools.partial(_select_first, axis=axis, k=k), in_axes=dims)(*args), 0


ad.primitive_jvps[_select_first_p] = _select_first_jvp
ad.primitive_transposes[_select_first_p] = _select_first_transpose
batching.primitive_batchers[_select_first_p] = _select_first_batch


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _max_1d(x: jax.Array, axis: int, k: int) -> jax.Array:
  return _first_max(x, axis, k)[0]  # XLA drops the unused index


@_max_1d.defjvp
def _max_1d_jvp(axis, k, primals, tangents):
  (x,), (t,) = primals, tangents
  y, first = _first_max(x, axis, k)
  t, first = parallel.same_varying(t.astype(y.dtype), first)
  return y, _select_first_p.bind(t, first, axis=axis, k=k)


def max_pool_same(x: Float[Array, "b h w c"], window: int = 5) -> Float[Array, "b h w c"]:
  """k x k max pooling, stride 1, -inf padding of k // 2 (output the size of the input)."""
  _check(x, window)
  return _max_1d(_max_1d(x, 1, window), 2, window)


def sum_pool_same(x: Float[Array, "b h w c"], window: int = 5) -> Float[Array, "b h w c"]:
  """k x k sum pooling, stride 1, zero padding of k // 2 (output the size of the input)."""
  _check(x, window)
  p = window // 2
  y = lax.reduce_window(x, 0.0, lax.add, (1, window, 1, 1), (1, 1, 1, 1),
                        ((0, 0), (p, p), (0, 0), (0, 0)))
  y = lax.reduce_window(y, 0.0, lax.add, (1, 1, window, 1), (1, 1, 1, 1),
                        ((0, 0), (0, 0), (p, p), (0, 0)))
  return y
