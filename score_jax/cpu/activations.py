"""Activations whose XLA:CPU code is cheaper than the library versions, same values.

`softplus(x) = log(1 + e^x)`, computed as `max(x, 0) + log1p(u)` with `u = e^{-|x|}` in (0, 1].
The log1p of `u` uses `log1p(u) = 2 atanh(s)`, `s = u / (2 + u)` in [0, 1/3], and the odd series
`2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ... + s^12/13)`: with `s^2 <= 1/9` the first omitted term is
below 2^-25 relative, so the result is within a few float32 ulp of the exact value (tested against
float64 in tests/test_activations.py). The point is speed: XLA:CPU evaluates `jax.nn.softplus`
(`logaddexp(x, 0)`, an exp and a log1p) at ~17 us per 64 x 128 array inside a loop on the
2-core EPYC CI machine; this version needs one exp, one division and seven FMAs (bench/NOTES.md).

The derivative is `sigmoid(x)` (a custom JVP, so higher derivatives, e.g. for sliced score matching,
come from `jax.nn.sigmoid`'s own).

`elu(x)` (alpha 1, the NCSN/NCSNv2 nonlinearity) is `x` for `x > 0` and `expm1(x)` otherwise.
For `x <= -0.35`, `expm1(x) = exp(x) - 1` loses at most ~2 ulp (`1 - e^x >= 0.29`); on
`(-0.35, 0]` it is the Taylor series up to `x^9 / 9!` (the first omitted term is below 2^-30
relative), so the result is within ~1.5 ulp of float64, closer than XLA's `expm1` (~5 ulp). On
the 2-core CPU, on a [16, 32, 32, 128] array, it runs 1.6-1.8x faster than `jax.nn.elu` (an XLA
`expm1`), 2.0-2.3x with its gradient. Its derivative is computed from the output `y`: `1` for
`y > 0` and `y + 1` otherwise (what JAX uses for `expm1` too), so the backward pass needs no `exp`
(a custom JVP; higher derivatives follow from it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

# 1 / (2k + 1) for k = 6..0: the atanh series in s^2, highest power first (Horner).
_ATANH_COEFFS = tuple(1.0 / (2 * k + 1) for k in range(6, -1, -1))


# 1 / k! for k = 9..1: the expm1 series near 0, highest power first (Horner).
_EXPM1_COEFFS = tuple(1.0 / math.factorial(k) for k in range(9, 0, -1))
_EXPM1_SERIES_BELOW = 0.35  # |x| under which the series is used


def _float_compute(x, name: str):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} needs a floating array, got dtype {x.dtype}")
  # The series are in float32 at least; bf16/f16 inputs are computed in f32 and cast back.
  return x, x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _log1p_unit(u: Float[Array, "..."]) -> Float[Array, "..."]:
  """log(1 + u) for u in [0, 1], without a log: 2 atanh(u / (2 + u)) by its series."""
  s = u / (2.0 + u)
  t = s * s
  p = jnp.full_like(t, _ATANH_COEFFS[0])
  for c in _ATANH_COEFFS[1:]:
    p = p * t + c
  return 2.0 * s * p


@jax.custom_jvp
def softplus(x: Float[Array, "..."]) -> Float[Array, "..."]:
  """log(1 + exp(x)), elementwise; float32 values within a few ulp of `jax.nn.softplus`."""
  x, xf = _float_compute(x, "softplus")
  y = jnp.maximum(xf, 0.0) + _log1p_unit(jnp.exp(-jnp.abs(xf)))
  return y.astype(x.dtype)


@softplus.defjvp
def _softplus_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  return softplus(x), jax.nn.sigmoid(x) * x_dot


def _expm1_nonpositive(x: Float[Array, "..."]) -> Float[Array, "..."]:
  """expm1(x) for x <= 0: the series near 0, exp(x) - 1 further out."""
  p = jnp.full_like(x, _EXPM1_COEFFS[0])
  for c in _EXPM1_COEFFS[1:]:
    p = p * x + c
  return jnp.where(x > -_EXPM1_SERIES_BELOW, p * x, jnp.exp(x) - 1.0)


@jax.custom_jvp
def elu(x: Float[Array, "..."]) -> Float[Array, "..."]:
  """ELU with alpha 1, elementwise; float32 values within ~1.5 ulp of the exact value."""
  x, xf = _float_compute(x, "elu")
  y = jnp.where(xf > 0, xf, _expm1_nonpositive(jnp.minimum(xf, 0.0)))
  return y.astype(x.dtype)


@elu.defjvp
def _elu_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  y = elu(x)
  return y, jnp.where(y > 0, 1.0, y + 1.0).astype(y.dtype) * x_dot
