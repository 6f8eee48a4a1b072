"""Noise-conditional MLP score network for low-dimensional data (toys).

Input: x / sqrt(1 + sigma^2) (so the input stays O(1) for sigma from 0.01 to 50, since the perturbed
data have variance ~ var(data) + sigma^2) concatenated with log sigma. Output: sigma * score
(`output_convention = "scaled_score"`), which is O(1) at every level (it estimates -E[z | x~]),
so one network serves the whole ladder with no per-level rescaling.

With EDM preconditioning (`preconditioning="edm"`, see `score_jax.score`) it is EDM's F: called
`(c_in x, c_noise)`, the already normalized input is concatenated with c_noise as given.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

ACTIVATIONS = {"softplus": nn.softplus, "elu": nn.elu, "swish": nn.swish, "relu": nn.relu}


class NoiseConditionalMLP(nn.Module):
  """MLP `(x [b, d], sigma [b]) -> sigma * score [b, d]`."""
  hidden: int = 128
  num_layers: int = 3
  activation: str = "softplus"
  preconditioning: str = "ncsn"  # "edm": EDM's F, called (c_in x, c_noise) (module docstring)
  sigma_data: float = 0.5  # EDM's sigma_data (read by score.make_score_fn)
  output_convention = "scaled_score"

  @nn.compact
  def __call__(self, x: Float[Array, "b d"], sigma: Float[Array, "b"],
               train: bool = False) -> Float[Array, "b d"]:
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}; use one of {sorted(ACTIVATIONS)}")
    act = ACTIVATIONS[self.activation]
    s = sigma.astype(jnp.float32)[:, None]
    if self.preconditioning == "edm":
      h = jnp.concatenate([x, s], axis=-1)
    else:
      h = jnp.concatenate([x / jnp.sqrt(1.0 + s ** 2), jnp.log(s)], axis=-1)
    for _ in range(self.num_layers):
      h = act(nn.Dense(self.hidden)(h))
    return nn.Dense(x.shape[-1])(h)
