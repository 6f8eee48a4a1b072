"""Score networks and the one factory that reads their config: `build(config)`.

Every network is called `model.apply({"params": p}, x, sigma, train=False)` with `x` `[b, ...]` and
per-example `sigma` `[b]`, and declares `output_convention` ("score" or "scaled_score"), which only
`score_jax.score.make_score_fn` interprets. With `model.preconditioning="edm"` a network is EDM's
F instead (called with `(c_in x, c_noise)`, Karras et al. 2022; `score_jax.score`), with
`noise.sigma_data` as its `sigma_data`.

The networks are plain Flax. `build` hands them out through `score_jax.cpu.accelerate`, whose
`apply` takes the fast CPU path where it is on (CPU only); `cpu.unwrap` gives the plain module.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from score_jax import cpu, noise
from score_jax.models import ncsn, unet
from score_jax.models.mlp import NoiseConditionalMLP

MODEL_NAMES = ("mlp", "ncsn", "ncsnv2", "ncsnv2_deeper", "ncsnv2_deepest", "unet")


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build(config) -> cpu.Accelerated:
  """The flax module that `config.model` (with `config.data` and `config.noise`) describes,
  through `cpu.accelerate` (`init` and attributes are the module's own).

  The network's hyperparameters come from its own sub-group: `model.mlp` for the MLP,
  `model.ncsn` for the RefineNet family (ncsn, ncsnv2, ncsnv2_deeper, ncsnv2_deepest),
  `model.unet` for the UNet; `model.dtype` and `model.remat` are shared by the image networks.
  """
  return cpu.accelerate(_build(config))


def _build(config) -> nn.Module:
  m = config.model
  if m.name not in MODEL_NAMES:
    raise ValueError(f"model.name={m.name!r} is unknown; use one of {MODEL_NAMES}")
  precond = dict(preconditioning=m.preconditioning, sigma_data=config.noise.sigma_data)
  if m.name == "mlp":
    g = m.mlp
    return NoiseConditionalMLP(hidden=g.hidden, num_layers=g.num_layers, activation=g.activation,
                               **precond)
  if m.dtype not in _DTYPES:
    raise ValueError(f"model.dtype={m.dtype!r} is unknown; use one of {sorted(_DTYPES)}")
  common = dict(num_channels=config.data.num_channels, dtype=_DTYPES[m.dtype], remat=m.remat)
  if m.name == "unet":
    g = m.unet
    return unet.UNet(ch=g.ch, ch_mult=tuple(g.ch_mult), num_res_blocks=g.num_res_blocks,
                     attn_resolutions=tuple(g.attn_resolutions), dropout=g.dropout,
                     conditional=g.conditional, centered_input=config.data.centered,
                     input_range=g.input_range, **common, **precond)
  if config.data.image_size < 8:
    raise ValueError(f"data.image_size={config.data.image_size}: image networks need >= 8 px")
  common.update(ngf=m.ncsn.ngf, nonlinearity=m.ncsn.nonlinearity,
                centered_input=config.data.centered)
  if m.name == "ncsn":
    n = config.noise
    ladder = noise.ladder(n.schedule, n.sigma_max, n.sigma_min, n.num_scales)
    model = ncsn.NCSN(level_sigmas=tuple(float(s) for s in ladder), **common)
    ncsn.check_image_size(model.encoder, config.data.image_size)
    return model
  preset = {"ncsnv2": ncsn.NCSNv2, "ncsnv2_deeper": ncsn.NCSNv2Deeper,
            "ncsnv2_deepest": ncsn.NCSNv2Deepest}[m.name]
  model = preset(noise_embedding=m.ncsn.noise_embedding, **common, **precond)
  ncsn.check_image_size(model.encoder, config.data.image_size)
  return model
