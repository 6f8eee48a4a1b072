"""Score networks and the one factory that reads their config: `build(config)`.

Every network is called `model.apply({"params": p}, x, sigma, train=False)` with `x` `[b, ...]` and
per-example `sigma` `[b]`, and declares `output_convention` ("score" or "scaled_score"), which only
`score_jax.score.make_score_fn` interprets.
"""

from __future__ import annotations

import flax.linen as nn

from score_jax.models.mlp import NoiseConditionalMLP

MODEL_NAMES = ("mlp", "ncsn", "ncsnv2", "ncsnv2_deeper", "ncsnv2_deepest", "unet")


def build(config) -> nn.Module:
  """The flax module that `config.model` (with `config.data` and `config.noise`) describes."""
  m = config.model
  if m.name not in MODEL_NAMES:
    raise ValueError(f"model.name={m.name!r} is unknown; use one of {MODEL_NAMES}")
  if m.name == "mlp":
    return NoiseConditionalMLP(hidden=m.hidden, num_layers=m.num_layers, activation=m.activation)
  from score_jax.models import image
  return image.build_image_model(config)
