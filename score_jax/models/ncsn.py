"""RefineNet score networks: NCSN (Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020), NHWC.

One module, `RefineNet`, realises the whole family; the paper variants are `functools.partial`
presets below. Architecture as in NCSN Appendix A and the reference code (N1
`models/cond_refinenet_dilated.py`, N2 `models/ncsnv2.py`, `models/layers.py`):

    x -> 2x - 1 (data in [0, 1]) -> conv3x3(C -> ngf)
      -> encoder: stages of 2 pre-activation residual blocks (norm, act, conv, norm, act, conv);
         a stage's first block may go down (2x2 mean pooling after the conv, or, with dilation > 1,
         dilated convs that keep the resolution)
      -> decoder: RefineBlocks, deepest first, each fusing one encoder output with the previous
         RefineBlock: residual conv units (RCU, 2 blocks x 2 stages per input), multi-resolution
         fusion (conv3x3 then bilinear upsampling, align_corners=True, summed), chained residual
         pooling (CRP, 2 stages of pool 5x5 stride 1 + conv3x3), output RCU (3 blocks at the end)
      -> norm -> act -> conv3x3(ngf -> C)

NCSN (v1): conditional instance norm++ everywhere (also inside RCU, MSF and CRP), average pooling
in CRP; the level index i of the ladder selects the norm parameters and the output is the score.
NCSNv2: unconditional instance norm++ (none inside RCU/MSF/CRP), max pooling in CRP, output divided
by sigma (here: declared `scaled_score`, and `score.make_score_fn` divides, which is the same
arithmetic as N2 `ncsnv2.py:97-99`). The level index comes from sigma: the nearest level of the
training ladder in log space, so finer CAS ladders reuse the nearest trained level.

EDM preconditioning (`preconditioning="edm"`, Karras et al. 2022; see `score_jax.score`): the
network is EDM's F, called `(c_in x, c_noise)`; its input is already normalized (no 2x - 1) and its
output is F (`output_convention` is not used). Without a noise embedding F is unconditional, as
NCSNv2 is, and the sigma dependence comes from the preconditioning's c_skip, c_out and c_in alone;
`noise_embedding=True` adds the DDPM embedding of c_noise (sinusoidal -> Dense -> swish -> Dense)
as a per-channel bias after the first conv of every encoder residual block, as in the UNet. On
MNIST the embedding learned faster per step (bench/NOTES.md, section 23), and
`configs/mnist_edm_cpu.py` uses it.

Spatial sizes at 32 px: 32 -> 16 -> 16 -> 16 (dilations 2 and 4 replace further pooling); at 28 px
(MNIST) 28 -> 14 -> 14 -> 14. The reference's `adjust_padding` for 28 px only reaches dilated
blocks, which never pool, so it changes nothing and is not needed here.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from score_jax.models.layers import (NONLINEARITIES, Conv, InstanceNormPlus, mean_pool_2x2,
                                     resize_bilinear_align_corners)
from score_jax.models.unet import sinusoidal_embedding

Level = Int[Array, "b"] | None


class ResidualBlock(nn.Module):
  """Pre-activation residual block (N2 `ResidualBlock`, N1 `ConditionalResidualBlock`)."""
  features: int
  down: bool = False
  dilation: int = 1
  num_classes: int | None = None
  nonlinearity: str = "elu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"], level: Level,
               emb: Float[Array, "b e"] | None = None) -> Float[Array, "b h2 w2 f"]:
    act = NONLINEARITIES[self.nonlinearity]
    norm = functools.partial(InstanceNormPlus, num_classes=self.num_classes)
    conv = functools.partial(Conv, dtype=self.dtype, dilation=self.dilation)
    c_in = x.shape[-1]
    h = act(norm(name="norm1")(x, level))

    def embed(h):
      if emb is None:
        return h
      return h + nn.Dense(h.shape[-1], name="emb")(emb)[:, None, None].astype(h.dtype)

    if self.down and self.dilation == 1:
      h = embed(conv(c_in, name="conv1")(h))
      h = act(norm(name="norm2")(h, level))
      h = mean_pool_2x2(conv(self.features, name="conv2")(h))
      shortcut = mean_pool_2x2(conv(self.features, kernel_size=1, name="shortcut")(x))
      return shortcut + h
    mid = c_in if self.down else self.features
    h = embed(conv(mid, name="conv1")(h))
    h = act(norm(name="norm2")(h, level))
    h = conv(self.features, name="conv2")(h)
    if self.down or c_in != self.features:
      kernel = 3 if self.dilation > 1 else 1
      x = conv(self.features, kernel_size=kernel, name="shortcut")(x)
    return x + h


class RCUBlock(nn.Module):
  """Residual conv unit: `n_blocks` x (`n_stages` x [norm], act, conv3x3 no bias) + residual."""
  n_blocks: int
  n_stages: int = 2
  num_classes: int | None = None
  conditional_norms: bool = False
  nonlinearity: str = "elu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"], level: Level) -> Float[Array, "b h w c"]:
    act = NONLINEARITIES[self.nonlinearity]
    c = x.shape[-1]
    for i in range(self.n_blocks):
      residual = x
      for j in range(self.n_stages):
        if self.conditional_norms:
          x = InstanceNormPlus(self.num_classes, name=f"norm_{i}_{j}")(x, level)
        x = Conv(c, use_bias=False, dtype=self.dtype, name=f"conv_{i}_{j}")(act(x))
      x = x + residual
    return x


class CRPBlock(nn.Module):
  """Chained residual pooling: act, then `n_stages` x ([norm], pool 5x5/1, conv3x3 no bias)."""
  n_stages: int = 2
  pool: str = "max"
  num_classes: int | None = None
  conditional_norms: bool = False
  nonlinearity: str = "elu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"], level: Level) -> Float[Array, "b h w c"]:
    x = NONLINEARITIES[self.nonlinearity](x)
    path = x
    for i in range(self.n_stages):
      if self.conditional_norms:
        path = InstanceNormPlus(self.num_classes, name=f"norm_{i}")(path, level)
      if self.pool == "max":
        path = nn.max_pool(path, (5, 5), strides=(1, 1), padding="SAME")
      else:  # the zero padding counts in the mean (torch `AvgPool2d` default)
        path = nn.avg_pool(path, (5, 5), strides=(1, 1), padding="SAME", count_include_pad=True)
      path = Conv(x.shape[-1], use_bias=False, dtype=self.dtype, name=f"conv_{i}")(path)
      x = path + x
    return x


class RefineBlock(nn.Module):
  """RefineNet block: RCU per input, multi-resolution fusion, CRP, output RCU."""
  features: int
  end: bool = False
  pool: str = "max"
  num_classes: int | None = None
  conditional_norms: bool = False
  nonlinearity: str = "elu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], level: Level,
               output_shape: tuple[int, int]) -> jax.Array:
    common = dict(num_classes=self.num_classes, conditional_norms=self.conditional_norms,
                  nonlinearity=self.nonlinearity, dtype=self.dtype)
    hs = [RCUBlock(2, 2, name=f"adapt_{i}", **common)(x, level) for i, x in enumerate(xs)]
    if len(hs) == 1:
      h = hs[0]
    else:  # multi-resolution fusion
      h = 0.0
      for i, hi in enumerate(hs):
        if self.conditional_norms:
          hi = InstanceNormPlus(self.num_classes, name=f"msf_norm_{i}")(hi, level)
        hi = Conv(self.features, dtype=self.dtype, name=f"msf_conv_{i}")(hi)
        h = h + resize_bilinear_align_corners(hi, output_shape)
    h = CRPBlock(2, pool=self.pool, name="crp", **common)(h, level)
    return RCUBlock(3 if self.end else 1, 2, name="output", **common)(h, level)


class RefineNet(nn.Module):
  """The NCSN / NCSNv2 family. Call `(x [b, h, w, c], sigma [b], train) -> score or sigma*score`.

  Attributes:
    ngf: base width.
    num_channels: image channels C.
    encoder: per stage `(width multiplier, down, dilation)`; two residual blocks per stage, the
      first of which carries `down`.
    decoder: width multiplier of each RefineBlock, deepest first (one per encoder stage).
    level_sigmas: the training ladder (descending); given, the norms are conditional on the level
      index (NCSN v1); None: unconditional (NCSNv2).
    scale_by_sigma: the network output is sigma * score (NCSNv2's division by sigma).
    preconditioning: "ncsn" (called `(x, sigma)`) or "edm" (EDM's F, called `(c_in x, c_noise)`).
    sigma_data: EDM's sigma_data (read by `score.make_score_fn`).
    noise_embedding: "edm" only: embed c_noise into the encoder blocks; False: unconditional F.
    pool: "avg" (NCSN v1) or "max" (NCSNv2) in chained residual pooling.
    centered_input: data already in [-1, 1]; otherwise inputs in [0, 1] are mapped by 2x - 1.
    dtype: compute dtype of the convolutions (params and norms stay float32).
    remat: rematerialize residual and refine blocks in the backward pass (memory for compute).
  """
  ngf: int = 128
  num_channels: int = 3
  encoder: tuple[tuple[int, bool, int], ...] = ((1, False, 1), (2, True, 1), (2, True, 2),
                                                (2, True, 4))
  decoder: tuple[int, ...] = (2, 2, 1, 1)
  level_sigmas: tuple[float, ...] | None = None
  scale_by_sigma: bool = True
  preconditioning: str = "ncsn"
  sigma_data: float = 0.5
  noise_embedding: bool = False
  pool: str = "max"
  nonlinearity: str = "elu"
  centered_input: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  @property
  def output_convention(self) -> str:
    return "scaled_score" if self.scale_by_sigma else "score"

  def _level(self, sigma: Float[Array, "b"]) -> Level:
    if self.level_sigmas is None:
      return None
    log_ladder = jnp.log(jnp.asarray(self.level_sigmas, jnp.float32))
    return jnp.argmin(jnp.abs(jnp.log(sigma)[:, None] - log_ladder[None]), axis=-1)

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"], sigma: Float[Array, "b"],
               train: bool = False) -> Float[Array, "b h w c"]:
    if len(self.decoder) != len(self.encoder):
      raise ValueError(f"decoder has {len(self.decoder)} RefineBlocks for {len(self.encoder)} "
                       "encoder stages; give one per stage")
    if self.nonlinearity not in NONLINEARITIES:
      raise ValueError(f"nonlinearity={self.nonlinearity!r}; use one of {sorted(NONLINEARITIES)}")
    edm = self.preconditioning == "edm"
    if edm and self.level_sigmas is not None:
      raise ValueError("EDM preconditioning calls the network with c_noise, not sigma: NCSN (v1)'s "
                       "level-conditional norms cannot take it; use an NCSNv2 variant")
    if self.noise_embedding and not edm:
      raise ValueError("noise_embedding embeds EDM's c_noise: it needs preconditioning='edm'")
    level = None if edm else self._level(sigma.astype(jnp.float32))
    emb = None
    if self.noise_embedding:
      emb = sinusoidal_embedding(sigma, self.ngf)
      emb = nn.Dense(4 * self.ngf, name="emb_0")(emb)
      emb = nn.Dense(4 * self.ngf, name="emb_1")(nn.swish(emb))
      emb = nn.swish(emb)
    num_classes = None if self.level_sigmas is None else len(self.level_sigmas)
    conditional = num_classes is not None
    res_cls = nn.remat(ResidualBlock) if self.remat else ResidualBlock
    refine_cls = nn.remat(RefineBlock, static_argnums=(3,)) if self.remat else RefineBlock
    common = dict(num_classes=num_classes, nonlinearity=self.nonlinearity, dtype=self.dtype)

    h = x if self.centered_input or edm else 2.0 * x - 1.0
    h = Conv(self.ngf, dtype=self.dtype, name="begin_conv")(h.astype(self.dtype))
    layers = []
    for s, (mult, down, dilation) in enumerate(self.encoder):
      for j in range(2):
        h = res_cls(mult * self.ngf, down=down and j == 0, dilation=dilation,
                    name=f"res{s + 1}_{j}", **common)(h, level, emb)
      layers.append(h)

    ref = None
    for k, mult in enumerate(self.decoder):
      skip = layers[-1 - k]
      inputs = [skip] if ref is None else [skip, ref]
      ref = refine_cls(mult * self.ngf, end=k == len(self.decoder) - 1, pool=self.pool,
                       conditional_norms=conditional, name=f"refine{k + 1}",
                       **common)(inputs, level, tuple(skip.shape[1:3]))

    h = NONLINEARITIES[self.nonlinearity](InstanceNormPlus(num_classes, name="norm_out")(ref,
                                                                                         level))
    h = Conv(self.num_channels, dtype=self.dtype, name="end_conv")(h)
    return h.astype(jnp.float32)


def check_image_size(encoder: Sequence[tuple[int, bool, int]], image_size: int) -> None:
  """Raises ValueError unless every 2x2 mean pooling of `encoder` sees an even size."""
  size = image_size
  for mult, down, dilation in encoder:
    del mult
    if down and dilation == 1:
      if size % 2:
        pools = sum(1 for _, d, dil in encoder if d and dil == 1)
        raise ValueError(f"data.image_size={image_size} cannot be pooled {pools} times by this "
                         f"network; use a multiple of {2 ** pools}")
      size //= 2


# Paper presets. `level_sigmas` must be filled in for NCSN (v1): see `models.build`.
NCSN = functools.partial(RefineNet, pool="avg", scale_by_sigma=False)
NCSNv2 = functools.partial(RefineNet, pool="max", scale_by_sigma=True)
NCSNv2Deeper = functools.partial(
    NCSNv2, encoder=((1, False, 1), (2, True, 1), (2, True, 1), (4, True, 2), (4, True, 4)),
    decoder=(4, 2, 2, 1, 1))
NCSNv2Deepest = functools.partial(
    NCSNv2, encoder=((1, False, 1), (2, True, 1), (2, True, 1), (2, True, 1), (4, True, 2),
                     (4, True, 4)),
    decoder=(4, 2, 2, 2, 1, 1))
