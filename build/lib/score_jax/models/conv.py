"""A stride-1 'same' convolution whose gradients XLA:CPU runs fast, also inside loops.

Why (measured on the 2-core CPU, jax 0.10.2; bench/NOTES.md has the numbers): XLA:CPU hands a
convolution to a library (YNNPACK for plain float32 2-D convolutions, Eigen otherwise) only in a
canonical form (batch first, features last, kernel HWIO). Outside loops its
`ConvCanonicalization` rewrites the weight gradient (a convolution whose "kernel" is the output
gradient) into that form; inside a `while` body
(`lax.scan`: fused training steps, samplers that differentiate) the rewrite does not happen and
the weight gradient runs in XLA's generic loop emitter, about 30x slower, and the input gradient
about 3x slower. This module writes both gradients as canonical convolutions itself
(transposes are cheap next to the convolution), so they are fast everywhere; the values are
the same as `jax.grad` of `lax.conv_general_dilated` up to float rounding. On CPU, float32
forward and input-gradient convolutions run in oneDNN (`onednn.conv_same`, ~15-20% faster than
YNNPACK here; bfloat16 ones too where the CPU has native bf16, at ~2x the float32 rate), and the
weight gradient in oneDNN's backward-weights primitive (`onednn_wgrad`, float32 ~20% faster than
Eigen here, bfloat16 where the CPU has native bf16) where it is built; otherwise the weight
gradient is written so that Eigen runs it (`_weight_grad`; oneDNN's forward convolution is slower
for that shape). Being a custom VJP, `same_conv` has reverse mode only (no `jax.jvp`).

`conv_general_dilated` has the signature of `lax.conv_general_dilated` and is passed to
`flax.linen.Conv(conv_general_dilated=...)`; configurations it does not cover (strides, input
dilation, groups, asymmetric padding, other layouts) go to `lax.conv_general_dilated` unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from score_jax.models import onednn, onednn_wgrad

_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x: jax.Array, w: jax.Array, *, window: int, dilation: int, pad: int,
          precision: Any = None) -> jax.Array:
  if (window == 1 and pad == dilation * (w.shape[0] // 2) and x.dtype == w.dtype
      and onednn.available(x.dtype)):
    return onednn.conv_same(x, w, dilation)  # oneDNN on CPU, the lax convolution elsewhere
  return lax.conv_general_dilated(x, w, (window, window), [(pad, pad)] * 2,
                                  rhs_dilation=(dilation, dilation), dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def same_conv(x: jax.Array, w: jax.Array, dilation: int = 1, precision: Any = None) -> jax.Array:
  """Stride-1 NHWC/HWIO convolution, odd square kernel, padding dilation * (k - 1) / 2."""
  k = w.shape[0]
  return _conv(x, w, window=1, dilation=dilation, pad=dilation * (k // 2), precision=precision)


def _same_conv_fwd(x, w, dilation, precision):
  return same_conv(x, w, dilation, precision), (x, w)


def _same_conv_bwd(dilation, precision, residuals, g):
  x, w = residuals
  g = g.astype(x.dtype)
  k = w.shape[0]
  pad = dilation * (k // 2)
  # dL/dx: the output gradient convolved with the flipped kernel, in/out channels swapped.
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = _conv(g, w_t.astype(x.dtype), window=1, dilation=dilation, pad=pad, precision=precision)
  # dL/dw[i, j, c, o] = sum_{n,h,w} x_pad[n, h + i d, w + j d, c] g[n, h, w, o]: on CPU in
  # oneDNN's backward-weights primitive where it is available (float32; bfloat16 with native
  # bf16), else as a convolution that Eigen runs; elsewhere the plain convolution.
  weight_grad = functools.partial(_weight_grad, dilation=dilation, pad=pad, precision=precision)
  if onednn_wgrad.available(x.dtype):
    cpu = functools.partial(onednn_wgrad.weight_grad, kernel_size=k, dilation=dilation)
  else:
    cpu = functools.partial(weight_grad, inflate=2)
  dw = lax.platform_dependent(x, g, cpu=cpu, default=functools.partial(weight_grad, inflate=1))
  return dx, dw.astype(w.dtype)


def _weight_grad(x, g, *, dilation, pad, precision, inflate):
  """dL/dw as HWIO `[k, k, c, o]` from x `[n, h, w, c]` and g `[n, h, w, o]`: a canonical
  convolution of x_t `[c, h, w, n]` (x's channels as the batch, its batch as the features) with
  g_t `[h, w, n, o]` as the kernel, window stride d, giving `[c, k, k, o]`.

  `inflate=1` is the plain convolution (window stride d). `inflate=2` (used on CPU) reads exactly
  the same elements through input dilation 2, kernel dilation 2 and window stride 2d (input'
  position 2d i + 2h is input position d i + h), so the value is the same. YNNPACK, which XLA:CPU
  gives every plain 2-D float32 convolution, takes no input dilation, so the inflated form goes
  to Eigen, whose weight-gradient-shaped convolution (a kernel as large as the image) runs ~1.6x
  faster: 367 vs 229 GFLOP/s at [16, 32, 32, 128] (bench/NOTES.md).
  """
  s = inflate * dilation
  dw = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (s, s),
                                [(inflate * pad, inflate * pad)] * 2,
                                lhs_dilation=(inflate, inflate), rhs_dilation=(inflate, inflate),
                                dimension_numbers=_NHWC, precision=precision)
  return dw.transpose(1, 2, 0, 3)


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def _covered(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
             lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count: int) -> int | None:
  """The dilation if `same_conv` computes this convolution, else None."""
  if lhs.ndim != 4 or tuple(window_strides) != (1, 1) or feature_group_count != 1:
    return None
  if lhs_dilation is not None and tuple(lhs_dilation) != (1, 1):
    return None
  d = tuple(rhs_dilation) if rhs_dilation is not None else (1, 1)
  k = rhs.shape[:2]
  if d[0] != d[1] or k[0] != k[1] or k[0] % 2 == 0:
    return None
  pad = d[0] * (k[0] // 2)
  if isinstance(padding, str) or [tuple(p) for p in padding] != [(pad, pad)] * 2:
    return None
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  got = (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
         if dimension_numbers is not None else None)
  return d[0] if got == want else None


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, with `same_conv` where it applies (see the module docstring)."""
  d = (_covered(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                dimension_numbers, feature_group_count)
       if batch_group_count == 1 and preferred_element_type is None else None)
  if d is None:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  return same_conv(lhs, rhs, d, precision)
