"""A stride-1 'same' convolution whose gradients XLA:CPU runs fast, also inside loops.

Why: XLA:CPU hands a convolution to a library (YNNPACK for plain float32 2-D convolutions, Eigen
otherwise) only in a canonical form (batch first, features last, kernel HWIO). Outside loops its
`ConvCanonicalization` rewrites the weight gradient (a convolution whose "kernel" is the output
gradient) into that form; inside a `while` body (`lax.scan`: fused training steps, samplers that
differentiate) the rewrite does not happen and the weight gradient runs in XLA's generic loop
emitter, about 30x slower, and the input gradient about 3x slower (bench/NOTES.md). This module
writes both gradients as canonical convolutions itself (transposes are cheap next to the
convolution), so they are fast everywhere; the values are the same as `jax.grad` of
`lax.conv_general_dilated` up to float rounding. Forward and input-gradient convolutions run in
oneDNN where `onednn.available` says so (`onednn.conv_same`), and the weight gradient in oneDNN's
backward-weights primitive (`onednn_wgrad`) where it is built; otherwise the weight gradient is
written so that Eigen runs it (`_weight_grad`; oneDNN's forward convolution is slower for that
shape).

The convolution is `onednn.conv_same_p`, and its differentiation rules are here. The map is
bilinear, so its forward mode is the primitive itself, `(dx, dw) -> conv(dx, w) + conv(x, dw)`
(`jax.jvp`, `jax.jacfwd`), and reverse mode comes from transposing that tangent map: in `x` it is
the output gradient convolved with the flipped kernel, in `w` the weight gradient. Derivatives of
any order follow.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad
from jaxtyping import Array, Float

from score_jax.cpu import onednn, onednn_wgrad

_NHWC = ("NHWC", "HWIO", "NHWC")


def same_conv(x: Float[Array, "b h w c"], w: Float[Array, "k k c o"],
              dilation: int = 1) -> Float[Array, "b h w o"]:
  """Stride-1 NHWC/HWIO convolution, odd square kernel, padding dilation * (k // 2).

  Raises:
    ValueError: shapes or dtypes that this convolution does not take.
  """
  k = w.shape[0]
  if (x.ndim != 4 or w.ndim != 4 or w.shape[1] != k or k % 2 == 0 or x.shape[3] != w.shape[2]
      or x.dtype != w.dtype):
    raise ValueError(f"same_conv takes x [b, h, w, c] and an odd square kernel [k, k, c, o] of "
                     f"x's dtype; got {x.shape} {x.dtype} and {w.shape} {w.dtype}")
  onednn.available(x.dtype)  # probes once, so that the lowering knows whether oneDNN runs it
  return onednn.conv_same(x, w, dilation)


def _jvp(primals, tangents, *, dilation):
  x, w = primals
  dx, dw = tangents
  y = onednn.conv_same_p.bind(x, w, dilation=dilation)
  terms = []
  if type(dx) is not ad.Zero:
    terms.append(same_conv(dx.astype(x.dtype), w, dilation))
  if type(dw) is not ad.Zero:
    terms.append(same_conv(x, dw.astype(w.dtype), dilation))
  return y, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)


def _transpose(ct, x, w, *, dilation):
  if ad.is_undefined_primal(x) == ad.is_undefined_primal(w):
    raise ValueError("same_conv is bilinear: transpose it in one operand, the other known")
  if type(ct) is ad.Zero:
    return None, None
  if ad.is_undefined_primal(x):
    # dL/dx: the output gradient convolved with the flipped kernel, in/out channels swapped.
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    return same_conv(ct.astype(w.dtype), w_t, dilation), None
  k = w.aval.shape[0]
  return None, weight_grad(x, ct.astype(x.dtype), k, dilation).astype(w.aval.dtype)


ad.primitive_jvps[onednn.conv_same_p] = _jvp
ad.primitive_transposes[onednn.conv_same_p] = _transpose


def weight_grad(x: Float[Array, "b h w c"], g: Float[Array, "b h w o"], kernel_size: int,
                dilation: int = 1) -> Float[Array, "k k c o"]:
  """dL/dw[i, j, c, o] = sum_{n,h,w} x_pad[n, h + i d, w + j d, c] g[n, h, w, o] (HWIO).

  On CPU in oneDNN's backward-weights primitive where it is available, else as a convolution that
  Eigen runs (`_weight_grad` with `inflate=2`); on other platforms the plain convolution.
  """
  if onednn_wgrad.available(x.dtype):
    return onednn_wgrad.weight_grad(x, g, kernel_size, dilation)
  pad = dilation * (kernel_size // 2)
  plain = functools.partial(_weight_grad, dilation=dilation, pad=pad)
  return lax.platform_dependent(x, g, cpu=functools.partial(plain, inflate=2),
                                default=functools.partial(plain, inflate=1))


def _weight_grad(x, g, *, dilation, pad, inflate):
  """dL/dw as HWIO `[k, k, c, o]` from x `[n, h, w, c]` and g `[n, h, w, o]`: a canonical
  convolution of x_t `[c, h, w, n]` (x's channels as the batch, its batch as the features) with
  g_t `[h, w, n, o]` as the kernel, window stride d, giving `[c, k, k, o]`.

  `inflate=1` is the plain convolution (window stride d). `inflate=2` (used on CPU) reads exactly
  the same elements through input dilation 2, kernel dilation 2 and window stride 2d (input'
  position 2d i + 2h is input position d i + h), so the value is the same. YNNPACK, which XLA:CPU
  gives every plain 2-D float32 convolution, takes no input dilation, so the inflated form goes
  to Eigen, whose weight-gradient-shaped convolution (a kernel as large as the image) runs faster
  (bench/NOTES.md).
  """
  s = inflate * dilation
  dw = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (s, s),
                                [(inflate * pad, inflate * pad)] * 2,
                                lhs_dilation=(inflate, inflate), rhs_dilation=(inflate, inflate),
                                dimension_numbers=_NHWC)
  return dw.transpose(1, 2, 0, 3)


def covered(x_shape, w_shape, params: dict) -> int | None:
  """The dilation if `same_conv` computes the `lax.conv_general_dilated` with these operand
  shapes and primitive parameters, else None (strides, input dilation, groups, asymmetric or
  other padding, other layouts, a precision or output type asked for)."""
  if len(x_shape) != 4 or tuple(params["window_strides"]) != (1, 1):
    return None
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    return None
  if params.get("precision") is not None or params.get("preferred_element_type") is not None:
    return None
  if tuple(params["lhs_dilation"]) != (1, 1):
    return None
  if params["dimension_numbers"] != lax.conv_dimension_numbers(x_shape, w_shape, _NHWC):
    return None
  d = tuple(params["rhs_dilation"])
  k = w_shape[:2]
  if d[0] != d[1] or k[0] != k[1] or k[0] % 2 == 0:
    return None
  pad = d[0] * (k[0] // 2)
  if [tuple(p) for p in params["padding"]] != [(pad, pad)] * 2:
    return None
  return d[0]
