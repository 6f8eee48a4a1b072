"""An adaptive Dormand-Prince 5(4) ODE solver compiled into one `lax.while_loop` program.

Dormand & Prince 1980 ("A family of embedded Runge-Kutta formulae"), the DOPRI5 tableau of
Hairer, Norsett & Wanner, "Solving Ordinary Differential Equations I", Section II.5 (Table 5.2):
7 stages with first-same-as-last (6 new evaluations per step), the 5th-order solution propagated
(local extrapolation), the embedded 4th-order one for the error estimate, and the starting step
size of Section II.4. Step control is per sample: every example of the batch has its own time,
step size and accept/reject decision, so an example's trajectory does not depend on the other
examples in its batch (a batch gives the values of its examples solved one by one). All examples
are evaluated together in one call of the vector field per stage; the loop runs until every
example has reached the end (or its step budget).

The state is a pytree whose leaves all have the batch as their leading axis `[b, ...]`; the
error norm of an example is the largest, over leaves, of the RMS of err / (atol + rtol max(|y|,
|y_new|)) (the mixed norm of torchdiffeq), so a small leaf (e.g. a log-density) is controlled as
tightly as a large one. Reverse-mode differentiation through the solve is not supported
(`lax.while_loop`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

# Dormand-Prince 5(4): nodes c, stage matrix a (rows 2..7), 5th-order weights b (= row 7 of a)
# and the error weights b - b_hat (b_hat: the embedded 4th-order weights).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B_HAT = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b - bh for b, bh in zip(_B, _B_HAT))
_ORDER = 5  # the error estimate is O(h^5): step factor err^(-1/5)

VectorField = Callable[[Float[Array, "b"], Any], Any]


class SolveStats(NamedTuple):
  """Per-example statistics of a solve (all `[b]`).

  Attributes:
    nfe: evaluations of the vector field made while the example was integrating (the starting
      step size costs 2, every attempted step 6).
    num_accepted: accepted steps.
    num_rejected: rejected steps.
    success: True where the example reached `t1` within `max_steps` attempted steps.
  """
  nfe: Int[Array, "b"]
  num_accepted: Int[Array, "b"]
  num_rejected: Int[Array, "b"]
  success: Bool[Array, "b"]


def _bcast(v: jax.Array, leaf: jax.Array) -> jax.Array:
  return v.reshape(v.shape + (1,) * (leaf.ndim - v.ndim))


def _combine_stacked(y, h, k_stack, weights):
  """y + h * sum_i w_i k_i with the slopes stacked `[n, b, ...]` and weights `[n]`."""
  def leaf_sum(y_leaf, k_leaf):
    acc = jnp.tensordot(weights.astype(k_leaf.dtype), k_leaf, axes=1)
    return y_leaf + _bcast(h, y_leaf) * acc
  return jax.tree.map(leaf_sum, y, k_stack)


def _error_norm(err, y0, y1, rtol, atol) -> Float[Array, "b"]:
  """Largest per-leaf RMS of err / (atol + rtol * max(|y0|, |y1|)) for each example."""
  def leaf_rms(e, a, b):
    scale = atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b))
    r = (e / scale).reshape(e.shape[0], -1)
    return jnp.sqrt(jnp.mean(r * r, axis=1))
  return jnp.max(jnp.stack(jax.tree.leaves(jax.tree.map(leaf_rms, err, y0, y1))), axis=0)


def _rms_norm(y, scale_like, rtol, atol) -> Float[Array, "b"]:
  zero = jax.tree.map(jnp.zeros_like, y)
  return _error_norm(y, scale_like, zero, rtol, atol)


def _first_guess(y0, f0, span, rtol, atol) -> Float[Array, "b"]:
  d0 = _rms_norm(y0, y0, rtol, atol)
  d1 = _rms_norm(f0, y0, rtol, atol)
  h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-30))
  return jnp.minimum(h0, span)


def _start(fun, t0, y0, direction, span, rtol, atol):
  """The slope at t0 and the starting step size magnitude per example (Hairer, Norsett &
  Wanner, Section II.4): a first guess from |y0| and |f0|, refined with a second slope f1 taken
  an Euler step away. The two evaluations run in a two-pass loop, so the vector field appears
  once in the program."""
  def evaluate(i, carry):
    f0, _, h0 = carry
    h = jnp.where(i == 0, 0.0, direction * h0)
    f = fun(t0 + h, jax.tree.map(lambda y, g: y + _bcast(h, y) * g, y0, f0))
    f0 = jax.tree.map(lambda new, old: jnp.where(i == 0, new, old), f, f0)
    h0 = jnp.where(i == 0, _first_guess(y0, f, span, rtol, atol), h0)
    return f0, f, h0

  zeros = jax.tree.map(jnp.zeros_like, y0)
  f0, f1, h0 = jax.lax.fori_loop(0, 2, evaluate, (zeros, zeros, jnp.ones_like(span)))
  d1 = _rms_norm(f0, y0, rtol, atol)
  diff = jax.tree.map(lambda a, b: a - b, f1, f0)
  d2 = _rms_norm(diff, y0, rtol, atol) / h0
  dmax = jnp.maximum(d1, d2)
  h1 = jnp.where(dmax <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3),
                 (0.01 / jnp.maximum(dmax, 1e-30)) ** (1.0 / _ORDER))
  return f0, jnp.minimum(jnp.minimum(100.0 * h0, h1), span)


def dopri5(fun: VectorField, y0: Any, t0: Float[Array, "b"] | float,
           t1: Float[Array, "b"] | float, *, rtol: float = 1e-5, atol: float = 1e-5,
           max_steps: int = 4096, safety: float = 0.9, min_factor: float = 0.2,
           max_factor: float = 10.0) -> tuple[Any, SolveStats]:
  """Solves dy/dt = fun(t, y) from `t0` to `t1` per example with adaptive Dormand-Prince 5(4).

  Args:
    fun: the vector field `(t [b], y) -> dy/dt`, with `y` and its result pytrees of `[b, ...]`
      arrays; examples must not interact (row i of the result depends on row i of `y` only).
    y0: the initial state, a pytree of `[b, ...]` arrays.
    t0: start time, scalar or per example `[b]`.
    t1: end time, scalar or `[b]`; may be below `t0` (integration backwards).
    rtol: relative tolerance.
    atol: absolute tolerance.
    max_steps: attempted steps (accepted or rejected) allowed per example.
    safety: step-size safety factor.
    min_factor: smallest step-size change factor.
    max_factor: largest step-size change factor.

  Returns:
    `(y1, stats)`: the state at `t1` (where `stats.success`; else where the budget ran out) and
    the per-example `SolveStats`.
  """
  leaves = jax.tree.leaves(y0)
  if not leaves:
    raise ValueError("dopri5: y0 has no arrays")
  b = leaves[0].shape[0]
  if any(leaf.ndim < 1 or leaf.shape[0] != b for leaf in leaves):
    raise ValueError(f"dopri5: every leaf of y0 needs the batch of {b} as its leading axis; "
                     f"got shapes {[tuple(leaf.shape) for leaf in leaves]}")
  if int(max_steps) < 1:
    raise ValueError(f"dopri5: max_steps={max_steps} must be >= 1")
  return _dopri5(fun, y0, t0, t1, rtol, atol, max_steps=int(max_steps), safety=float(safety),
                 min_factor=float(min_factor), max_factor=float(max_factor))


@functools.partial(jax.jit, static_argnames=("fun", "max_steps", "safety", "min_factor",
                                             "max_factor"))
def _dopri5(fun, y0, t0, t1, rtol, atol, *, max_steps, safety, min_factor, max_factor):
  leaves = jax.tree.leaves(y0)
  b = leaves[0].shape[0]
  dtype = jnp.result_type(leaves[0].dtype, jnp.float32)
  t0 = jnp.broadcast_to(jnp.asarray(t0, dtype), (b,))
  t1 = jnp.broadcast_to(jnp.asarray(t1, dtype), (b,))
  direction = jnp.where(t1 >= t0, 1.0, -1.0).astype(dtype)
  span = jnp.abs(t1 - t0)

  a_rows = jnp.asarray([list(row) + [0.0] * (7 - len(row)) for row in _A], dtype)  # [6, 7]
  c_nodes = jnp.asarray(_C, dtype)
  b_weights = jnp.asarray(_B, dtype)
  e_weights = jnp.asarray(_E, dtype)

  f0, h = _start(fun, t0, y0, direction, jnp.maximum(span, 1e-30), rtol, atol)
  zeros = jnp.zeros((b,), jnp.int32)
  done0 = span == 0
  carry = (t0, y0, f0, h, done0, jnp.full((b,), 2, jnp.int32) * (~done0), zeros, zeros)

  def active_of(c):
    _, _, _, _, done, _, n_acc, n_rej = c
    return (~done) & (n_acc + n_rej < max_steps)

  def cond(c):
    return jnp.any(active_of(c))

  def body(c):
    t, y, f, h_mag, done, nfe, n_acc, n_rej = c
    active = active_of(c)
    remaining = jnp.abs(t1 - t)
    last = h_mag >= remaining
    step = jnp.where(active, direction * jnp.where(last, remaining, h_mag), 0.0)
    # The six new stages run in a loop (one copy of the vector field in the program, not six);
    # the slopes are stacked [7, b, ...], and a row of the stage matrix is zero past its stage.
    k_stack = jax.tree.map(lambda leaf: jnp.zeros((7,) + leaf.shape, leaf.dtype).at[0].set(leaf),
                           f)

    def stage(i, k_stack):
      y_stage = _combine_stacked(y, step, k_stack, a_rows[i - 1])
      k_i = fun(t + c_nodes[i] * step, y_stage)
      return jax.tree.map(lambda st, leaf: st.at[i].set(leaf), k_stack, k_i)

    k_stack = jax.lax.fori_loop(1, 7, stage, k_stack)
    y_new = _combine_stacked(y, step, k_stack, b_weights)
    err = _combine_stacked(jax.tree.map(jnp.zeros_like, y), step, k_stack, e_weights)
    norm = _error_norm(err, y, y_new, rtol, atol)
    norm = jnp.where(jnp.isnan(norm), jnp.inf, norm)  # a non-finite step shrinks, never accepts
    accept = active & (norm <= 1.0)
    factor = jnp.where(norm == 0.0, max_factor,
                       safety * jnp.maximum(norm, 1e-30) ** (-1.0 / _ORDER))
    factor = jnp.clip(factor, min_factor, max_factor)
    factor = jnp.where(accept, factor, jnp.minimum(factor, 1.0))
    h_new = jnp.where(active, jnp.abs(step) * factor, h_mag)
    t_new = jnp.where(accept, jnp.where(last, t1, t + step), t)
    pick = lambda new, old: jnp.where(_bcast(accept, new), new, old)
    y_out = jax.tree.map(pick, y_new, y)
    f_out = jax.tree.map(pick, jax.tree.map(lambda st: st[6], k_stack), f)
    done_new = done | (accept & last)
    return (t_new, y_out, f_out, h_new, done_new, nfe + 6 * active,
            n_acc + accept, n_rej + (active & ~accept))

  _, y1, _, _, done, nfe, n_acc, n_rej = jax.lax.while_loop(cond, body, carry)
  return y1, SolveStats(nfe=nfe, num_accepted=n_acc, num_rejected=n_rej, success=done)


__all__ = ["dopri5", "SolveStats", "VectorField"]
