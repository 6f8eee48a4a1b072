"""The DDPM UNet (Ho et al. 2020) as used by Jolicoeur-Martineau et al. 2020, NHWC.

Layout (Ho et al. Appendix B; AC `models/UNet.py`): conv3x3 -> per resolution `num_res_blocks`
residual blocks (GroupNorm(32, eps 1e-6), swish, conv3x3, [+ noise embedding], GroupNorm, swish,
channel dropout, conv3x3) with self-attention at `attn_resolutions`, stride-2 conv downsampling
-> middle (res, attention, res) -> the mirror path with `num_res_blocks + 1` blocks per resolution
fed by the skip connections, nearest-neighbour upsampling + conv3x3 -> GroupNorm, swish, conv3x3.

The adversarial/CAS paper trains it *without* a noise-level input (`conditional=False`): the
network outputs sigma * score (`scaled_score`) and must infer the level from the image.
`conditional=True` adds the DDPM embedding, here of log(sigma) instead of the timestep
(sinusoidal, 128 channels -> Dense(4 ch) -> swish -> Dense(4 ch)); with it the CIFAR-10 layout
(ch 128, ch_mult (1, 2, 2, 2), 2 blocks, attention at 16 px) has the DDPM paper's 35.7M parameters.

With EDM preconditioning (`preconditioning="edm"`, Karras et al. 2022; see `score_jax.score`) the
network is EDM's F: called `(c_in x, c_noise)`, it embeds c_noise = ln(sigma) / 4 as given, takes
its input as it comes (c_in x is already normalized) and its output is F.

Initialization follows DDPM: variance_scaling(1, fan_avg, uniform), zero biases, and zero
initialization of the last conv of each residual block, the attention output and the final conv,
so every block starts as the identity and the initial output is 0.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_ZERO = nn.initializers.zeros


def _conv(features: int, *, dtype: Any, zero: bool = False, kernel: int = 3, stride: int = 1,
          name: str | None = None) -> nn.Conv:
  """A convolution with DDPM initialization: 'SAME' at stride 1; stride 2 pads 1 on both sides.

  The stride-2 downsampling follows the AC code (`models/UNet.py`, torch `padding=1`), not DDPM's
  TF 'SAME' (0 before, 1 after), so converted AC checkpoints give the reference's outputs.
  """
  padding = "SAME" if stride == 1 else ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 kernel_init=_ZERO if zero else _INIT, dtype=dtype, name=name)


def _norm(name: str | None = None) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=jnp.float32, name=name)


def sinusoidal_embedding(t: Float[Array, "b"], dim: int) -> Float[Array, "b dim"]:
  """The Transformer/DDPM sinusoidal embedding of a scalar per example."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ResnetBlock(nn.Module):
  features: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array | None, train: bool) -> jax.Array:
    h = _conv(self.features, dtype=self.dtype, name="conv1")(nn.swish(_norm("norm1")(x)))
    if emb is not None:
      h = h + nn.Dense(self.features, kernel_init=_INIT, name="emb")(nn.swish(emb))[:, None, None]
    h = nn.swish(_norm("norm2")(h))
    # Dropout2d of the reference: whole channels are dropped.
    h = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(h)
    h = _conv(self.features, dtype=self.dtype, zero=True, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, dtype=self.dtype, kernel=1, name="shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions (DDPM `AttnBlock`), residual."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = _norm("norm")(x)
    dense = lambda name, zero=False: nn.Dense(c, kernel_init=_ZERO if zero else _INIT,
                                              dtype=self.dtype, name=name)
    q, k, v = (dense(n)(h).reshape(b, hgt * wid, c) for n in ("q", "k", "v"))
    w = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) / math.sqrt(c), -1)
    h = jnp.einsum("bij,bjc->bic", w.astype(v.dtype), v).reshape(b, hgt, wid, c)
    return x + dense("proj_out", zero=True)(h)


class UNet(nn.Module):
  """`(x [b, h, w, c], sigma [b], train) -> sigma * score`."""
  ch: int = 128
  num_channels: int = 3
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.0
  conditional: bool = False
  centered_input: bool = False
  # What the first conv sees: "centered" ([-1, 1], DDPM) or "unit" ([0, 1]: the AC UNet, which
  # takes its [0, 1] data unrescaled, AC `models/UNet.py` forward with `rescaled: false`).
  input_range: str = "centered"
  dtype: Any = jnp.float32
  remat: bool = False
  preconditioning: str = "ncsn"  # "edm": EDM's F, called (c_in x, c_noise) (module docstring)
  sigma_data: float = 0.5  # EDM's sigma_data (read by score.make_score_fn)
  output_convention = "scaled_score"

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"], sigma: Float[Array, "b"],
               train: bool = False) -> Float[Array, "b h w c"]:
    res_cls = nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock
    edm = self.preconditioning == "edm"
    emb = None
    if self.conditional:
      emb = sinusoidal_embedding(sigma if edm else jnp.log(sigma), self.ch)
      emb = nn.Dense(4 * self.ch, kernel_init=_INIT, name="emb_0")(emb)
      emb = nn.Dense(4 * self.ch, kernel_init=_INIT, name="emb_1")(nn.swish(emb))
    if self.input_range not in ("centered", "unit"):
      raise ValueError(f"input_range={self.input_range!r} must be 'centered' or 'unit'")
    if edm:  # EDM's F takes c_in x as it is (Karras et al. 2022, Table 1)
      h = x
    elif self.input_range == "centered":
      h = x if self.centered_input else 2.0 * x - 1.0
    else:
      h = 0.5 * (x + 1.0) if self.centered_input else x
    hs = [_conv(self.ch, dtype=self.dtype, name="conv_in")(h.astype(self.dtype))]
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = res_cls(mult * self.ch, self.dropout, self.dtype,
                    name=f"down{level}_res{i}")(hs[-1], emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(self.dtype, name=f"down{level}_attn{i}")(h)
        hs.append(h)
      if level != len(self.ch_mult) - 1:
        hs.append(_conv(h.shape[-1], dtype=self.dtype, stride=2, name=f"down{level}_pool")(h))
    h = hs[-1]
    h = res_cls(h.shape[-1], self.dropout, self.dtype, name="mid_res0")(h, emb, train)
    h = AttnBlock(self.dtype, name="mid_attn")(h)
    h = res_cls(h.shape[-1], self.dropout, self.dtype, name="mid_res1")(h, emb, train)
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = res_cls(self.ch_mult[level] * self.ch, self.dropout, self.dtype,
                    name=f"up{level}_res{i}")(jnp.concatenate([h, hs.pop()], -1), emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(self.dtype, name=f"up{level}_attn{i}")(h)
      if level != 0:
        b, hgt, wid, c = h.shape
        h = jax.image.resize(h, (b, 2 * hgt, 2 * wid, c), "nearest")
        h = _conv(c, dtype=self.dtype, name=f"up{level}_upsample")(h)
    h = nn.swish(_norm("norm_out")(h))
    return _conv(self.num_channels, dtype=self.dtype, zero=True,
                 name="conv_out")(h).astype(jnp.float32)
