"""Score functions: the `ScoreFn` type, wrapping networks, and the Tweedie denoiser.

A score function `score_fn(x, sigma)` takes `x` `[b, ...]` and per-example noise levels `sigma`
`[b]` and returns the gradient of the log density of the data convolved with N(0, sigma^2 I).

Two preconditionings (a network's `preconditioning` attribute, read only here):
* "ncsn": the network takes `(x, sigma)` and outputs the score or sigma * score (its
  `output_convention`), as in NCSN, NCSNv2 and the UNet of Jolicoeur-Martineau et al. 2020.
* "edm": the network F takes `(c_in x, c_noise)` and the denoiser is
  D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with c_skip = sigma_data^2 / (sigma^2 +
  sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2), c_in = 1 /
  sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1; NVlabs/edm
  `training/networks.py`, `EDMPrecond`); the score is (D - x) / sigma^2 (Tweedie's formula).
  Inputs and training targets of F then have unit variance at every sigma when the data's
  standard deviation is sigma_data.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

ScoreFn = Callable[[Float[Array, "b ..."], Float[Array, "b"]], Float[Array, "b ..."]]

OUTPUT_CONVENTIONS = ("score", "scaled_score")
PRECONDITIONINGS = ("ncsn", "edm")


def edm_coefficients(sigma: jax.Array, sigma_data: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """EDM's `(c_skip, c_out, c_in, c_noise)` at `sigma` (Karras et al. 2022, Table 1)."""
  total = sigma ** 2 + sigma_data ** 2
  return (sigma_data ** 2 / total, sigma * sigma_data / jnp.sqrt(total), 1.0 / jnp.sqrt(total),
          jnp.log(sigma) / 4.0)


def broadcast_sigma(sigma: Float[Array, "b"] | float, x: Float[Array, "b ..."]) -> jax.Array:
  """`sigma` `[b]` (or a scalar) reshaped to broadcast against `x` `[b, ...]`."""
  sigma = jnp.asarray(sigma, x.dtype)
  if sigma.ndim == 0:
    return sigma
  return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def make_score_fn(model: nn.Module, params: Any, *, train: bool = False,
                  rngs: dict[str, jax.Array] | None = None) -> ScoreFn:
  """Wraps a network into a `ScoreFn`: the only code that knows its output convention.

  `model.preconditioning` (absent: "ncsn") chooses how the network is called (module
  docstring). With "ncsn", `model.output_convention` is "score" (the network outputs the score,
  e.g. NCSN, or NCSNv2 whose output is divided by sigma inside) or "scaled_score" (the network
  outputs sigma * score, e.g. the UNet of Jolicoeur-Martineau et al. and the toy MLP; then
  score = output / sigma). With "edm", the network is EDM's F and `model.sigma_data` its
  sigma_data.
  """
  preconditioning = getattr(model, "preconditioning", "ncsn")
  if preconditioning not in PRECONDITIONINGS:
    raise ValueError(f"{type(model).__name__}.preconditioning={preconditioning!r}; "
                     f"must be one of {PRECONDITIONINGS}")
  convention = getattr(model, "output_convention", None)
  if preconditioning == "ncsn" and convention not in OUTPUT_CONVENTIONS:
    raise ValueError(f"{type(model).__name__}.output_convention={convention!r}; "
                     f"must be one of {OUTPUT_CONVENTIONS}")

  def apply(x, noise_input):
    return model.apply({"params": params}, x, noise_input, train=train, rngs=rngs)

  def score_fn(x, sigma):
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    if preconditioning == "edm":
      _, c_out, c_in, c_noise = edm_coefficients(sigma, model.sigma_data)
      col = lambda c: broadcast_sigma(c, x)
      f = apply(col(c_in) * x, c_noise)
      # (D - x) / sigma^2 = ((c_skip - 1) x + c_out F) / sigma^2 with c_skip - 1 =
      # -sigma^2 / (sigma^2 + sigma_data^2) in closed form: D - x would cancel digits at small
      # sigma.
      return -x / col(sigma ** 2 + model.sigma_data ** 2) + col(c_out / sigma ** 2) * f
    out = apply(x, sigma)
    if convention == "scaled_score":
      out = out / broadcast_sigma(sigma, out)
    return out

  return score_fn


def denoise(score_fn: ScoreFn, x: Float[Array, "b ..."],
            sigma: Float[Array, "b"] | float) -> Float[Array, "b ..."]:
  """The expected clean sample E[x0 | x] = x + sigma^2 * score(x, sigma) (Tweedie's formula)."""
  sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
  return x + broadcast_sigma(sigma, x) ** 2 * score_fn(x, sigma)
