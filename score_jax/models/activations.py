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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

# 1 / (2k + 1) for k = 6..0: the atanh series in s^2, highest power first (Horner).
_ATANH_COEFFS = tuple(1.0 / (2 * k + 1) for k in range(6, -1, -1))


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
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"softplus needs a floating array, got dtype {x.dtype}")
  # The series is in float32 at least; bf16/f16 inputs are computed in f32 and cast back.
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  y = jnp.maximum(xf, 0.0) + _log1p_unit(jnp.exp(-jnp.abs(xf)))
  return y.astype(x.dtype)


@softplus.defjvp
def _softplus_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  return softplus(x), jax.nn.sigmoid(x) * x_dot
