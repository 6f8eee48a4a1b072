"""CPU-only fast paths for the networks, behind one switch: `accelerate(module)`.

The networks in `score_jax.models` are written with plain Flax and lax layers (`nn.Conv`,
`nn.max_pool`, `nn.avg_pool`, `nn.elu`, `nn.softplus`) and know nothing of this package.
`accelerate(module)` returns the module with an `apply` that, when `enabled()`, traces the
network to a jaxpr and evaluates it with these operations replaced by equal ones that XLA:CPU
runs faster (the rest of the jaxpr runs as it is):

- a stride-1 'same' NHWC/HWIO convolution (`conv_general_dilated`, odd square kernel) ->
  `conv.same_conv`: oneDNN forward and input-gradient convolutions, the weight gradient in
  oneDNN's backward-weights primitive (`onednn`, `onednn_wgrad`), or a form Eigen runs;
- a stride-1 'same' k x k max or sum pooling (`reduce_window_max`/`_sum`, as `nn.max_pool` and
  `nn.avg_pool` emit them) -> the separable `pool.max_pool_same` / `pool.sum_pool_same`;
- `jax.nn.elu` (alpha 1) and `jax.nn.softplus` -> `activations.elu` / `activations.softplus`.

Design: rewriting the traced program, rather than swapping layers inside the networks (e.g.
with `flax.linen.intercept_methods`), reaches functions as well as module methods, so the
networks stay plain Flax, their variable trees stay what Flax makes of them, and `init`,
`eval_shape` and checkpoints never see this package. Every replacement has forward- and
reverse-mode rules, so `jax.jvp`, `jax.jacfwd` and `jax.grad` (to any order) work with the fast
path on and off.

The switch: `enabled()` is true when computations run on CPU (`parallel.default_platform`) and
`SCORE_JAX_ONEDNN` is not "0"; on GPU and TPU the networks run XLA's own operations unchanged.
`fast_path(False)` turns it off in a block (A/B comparisons, tests). It is read when a function
is traced: a function jitted before the switch changes keeps what it was traced with.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from score_jax import parallel
from score_jax.cpu import activations, conv, pool

_OVERRIDE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("score_jax_cpu_fast_path",
                                                                      default=None)


# The jaxpr rewrite binds equations with the parameter API of jax 0.8 and newer; older JAX
# (Colab's 0.7.2) runs the networks' own XLA operations.
_REWRITE_SUPPORTED = tuple(int(v) for v in jax.__version__.split(".")[:2]) >= (0, 8)


def enabled() -> bool:
  """Whether `accelerate`d networks take the fast CPU path when traced now."""
  if not _REWRITE_SUPPORTED:
    return False
  override = _OVERRIDE.get()
  if override is not None:
    return override and parallel.default_platform() == "cpu"
  return (parallel.default_platform() == "cpu"
          and os.environ.get("SCORE_JAX_ONEDNN", "1") != "0")


@contextlib.contextmanager
def fast_path(on: bool) -> Iterator[None]:
  """Within the block, `enabled()` is `on` (and still false off CPU), whatever the environment."""
  token = _OVERRIDE.set(bool(on))
  try:
    yield
  finally:
    _OVERRIDE.reset(token)


@dataclasses.dataclass(frozen=True)
class Accelerated:
  """A Flax module whose `apply` takes the fast CPU path where `enabled()`; every other
  attribute (`init`, `output_convention`, hyperparameters) is the module's own."""
  module: Any

  def apply(self, *args, **kwargs):
    return rewrite(self.module.apply)(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    if name == "module":  # not yet set (copy, pickle): no recursion
      raise AttributeError(name)
    return getattr(self.module, name)


def accelerate(module: Any) -> Accelerated:
  """`module` with the fast CPU path (see the module docstring); idempotent."""
  return module if isinstance(module, Accelerated) else Accelerated(module)


def unwrap(module: Any) -> Any:
  """The plain Flax module inside `accelerate(module)` (or `module` itself)."""
  return module.module if isinstance(module, Accelerated) else module


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def rewrite(fn: Callable) -> Callable:
  """`fn` evaluated with the fast CPU operations where `enabled()` when called (or traced), else
  `fn` itself. Array leaves of the arguments are traced; other leaves (flags such as `train`,
  `mutable` collections) are passed to `fn` as they are."""

  def wrapped(*args, **kwargs):
    if not enabled():
      return fn(*args, **kwargs)
    leaves, treedef = jax.tree.flatten((args, kwargs))
    traced = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def call(*arrays):
      full = list(leaves)
      for i, a in zip(traced, arrays):
        full[i] = a
      a, kw = jax.tree.unflatten(treedef, full)
      return fn(*a, **kw)

    arrays = [leaves[i] for i in traced]
    closed, out_shape = jax.make_jaxpr(call, return_shape=True)(*arrays)
    outs = _eval(closed.jaxpr, closed.consts, arrays)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped


def _eval(jaxpr: core.Jaxpr, consts, args) -> list:
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]

  for v, value in zip(jaxpr.constvars, consts):
    env[v] = value
  for v, value in zip(jaxpr.invars, args):
    env[v] = value
  for eqn in jaxpr.eqns:
    outs = _eval_eqn(eqn, [read(v) for v in eqn.invars])
    for v, value in zip(eqn.outvars, outs):
      env[v] = value
  return [read(v) for v in jaxpr.outvars]


_ACTIVATIONS = {"elu": activations.elu, "softplus": activations.softplus}


def _floating(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def _eval_eqn(eqn: core.JaxprEqn, invals: list) -> list:
  name, params = eqn.primitive.name, eqn.params
  if name in ("jit", "pjit"):
    inner = params["jaxpr"]
    # `jax.nn.elu(x)` and `jax.nn.softplus(x)` are jitted functions of one operand (an elu
    # `alpha` passed explicitly is a second operand, and stays XLA's).
    if params.get("name") in _ACTIVATIONS and len(invals) == 1 and _floating(invals[0]):
      return [_ACTIVATIONS[params["name"]](invals[0])]
    return _eval(inner.jaxpr, inner.consts, invals)
  if name in ("remat2", "checkpoint") and not params["jaxpr"].constvars:
    body = lambda *a: _eval(params["jaxpr"], (), a)
    return jax.checkpoint(body, prevent_cse=params["prevent_cse"],
                          policy=params["policy"])(*invals)
  if name == "conv_general_dilated":
    x, w = invals
    d = conv.covered(x.shape, w.shape, params)
    if d is not None and x.dtype == w.dtype and _floating(x):
      return [conv.same_conv(x, w, d)]
  if name in ("reduce_window_max", "reduce_window_sum"):
    k = _same_pool_window(invals[0], params)
    if k is not None:
      fast = pool.max_pool_same if name == "reduce_window_max" else pool.sum_pool_same
      return [fast(invals[0], k)]
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
  return out if eqn.primitive.multiple_results else [out]


def _same_pool_window(x, params: dict) -> int | None:
  """k if the pooling is k x k over NHWC height and width, stride 1, padding k // 2, else None."""
  window = tuple(params["window_dimensions"])
  if x.ndim != 4 or not _floating(x) or len(window) != 4:
    return None
  k = window[1]
  p = k // 2
  if window != (1, k, k, 1) or k % 2 == 0 or tuple(params["window_strides"]) != (1, 1, 1, 1):
    return None
  if any(tuple(params[key]) != (1, 1, 1, 1) for key in ("base_dilation", "window_dilation")):
    return None
  return k if tuple(map(tuple, params["padding"])) == ((0, 0), (p, p), (p, p), (0, 0)) else None
