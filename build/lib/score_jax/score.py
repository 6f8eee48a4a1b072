"""Score functions: the `ScoreFn` type, wrapping networks, and the Tweedie denoiser.

A score function `score_fn(x, sigma)` takes `x` `[b, ...]` and per-example noise levels `sigma`
`[b]` and returns the gradient of the log density of the data convolved with N(0, sigma^2 I).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

ScoreFn = Callable[[Float[Array, "b ..."], Float[Array, "b"]], Float[Array, "b ..."]]

OUTPUT_CONVENTIONS = ("score", "scaled_score")


def broadcast_sigma(sigma: Float[Array, "b"] | float, x: Float[Array, "b ..."]) -> jax.Array:
  """`sigma` `[b]` (or a scalar) reshaped to broadcast against `x` `[b, ...]`."""
  sigma = jnp.asarray(sigma, x.dtype)
  if sigma.ndim == 0:
    return sigma
  return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def make_score_fn(model: nn.Module, params: Any, *, train: bool = False,
                  rngs: dict[str, jax.Array] | None = None) -> ScoreFn:
  """Wraps a network into a `ScoreFn`: the only code that knows its output convention.

  `model.output_convention` is "score" (the network outputs the score, e.g. NCSN, or NCSNv2 whose
  output is divided by sigma inside) or "scaled_score" (the network outputs sigma * score, e.g. the
  UNet of Jolicoeur-Martineau et al. and the toy MLP; then score = output / sigma).
  """
  convention = getattr(model, "output_convention", None)
  if convention not in OUTPUT_CONVENTIONS:
    raise ValueError(f"{type(model).__name__}.output_convention={convention!r}; "
                     f"must be one of {OUTPUT_CONVENTIONS}")

  def score_fn(x, sigma):
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    out = model.apply({"params": params}, x, sigma, train=train, rngs=rngs)
    if convention == "scaled_score":
      out = out / broadcast_sigma(sigma, out)
    return out

  return score_fn


def denoise(score_fn: ScoreFn, x: Float[Array, "b ..."],
            sigma: Float[Array, "b"] | float) -> Float[Array, "b ..."]:
  """The expected clean sample E[x0 | x] = x + sigma^2 * score(x, sigma) (Tweedie's formula)."""
  sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
  return x + broadcast_sigma(sigma, x) ** 2 * score_fn(x, sigma)
