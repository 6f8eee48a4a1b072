"""Building blocks of the RefineNet score networks (NCSN, NCSNv2), NHWC.

Numerics follow the PyTorch reference implementations (ermongroup/ncsn "N1", ermongroup/ncsnv2
"N2"), because that is where published samples and FIDs come from:
- Convolutions use PyTorch's default initialization: kernel and bias ~ U(-1/sqrt(fan_in),
  1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)).
- Instance norm++ uses the biased spatial variance with eps 1e-5 (torch `InstanceNorm2d`) and the
  *unbiased* variance of the channel means (torch `var` default) for the alpha term.
- Multi-resolution fusion resizes bilinearly with `align_corners=True` (torch `F.interpolate`),
  which `jax.image.resize` (half-pixel centers) does not do, so it is written here.
- Average pooling in chained residual pooling counts the zero padding (torch `AvgPool2d`
  default), max pooling pads with -inf.
Statistics of the norms are computed in float32 even when the convolutions run in bfloat16.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

NONLINEARITIES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "elu": nn.elu, "relu": nn.relu, "lrelu": lambda x: nn.leaky_relu(x, 0.2),
    "swish": nn.swish}

_TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int) -> Callable:
  bound = 1.0 / np.sqrt(fan_in)

  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, dtype, -bound, bound)

  return init


class Conv(nn.Module):
  """k x k convolution, stride 1, 'same' (dilated) padding, PyTorch default initialization."""
  features: int
  kernel_size: int = 3
  dilation: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w f"]:
    fan_in = x.shape[-1] * self.kernel_size ** 2
    return nn.Conv(self.features, (self.kernel_size,) * 2, padding="SAME",
                   kernel_dilation=self.dilation, use_bias=self.use_bias, dtype=self.dtype,
                   kernel_init=_TORCH_KERNEL_INIT, bias_init=_torch_bias_init(fan_in))(x)


def mean_pool_2x2(x: Float[Array, "b h w c"]) -> Float[Array, "b h/2 w/2 c"]:
  """The reference `ConvMeanPool` pooling: mean of the four 2x2-strided sub-grids."""
  return (x[:, ::2, ::2] + x[:, 1::2, ::2] + x[:, ::2, 1::2] + x[:, 1::2, 1::2]) / 4.0


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] linear-interpolation weights with align_corners=True."""
  if n_out == 1 or n_in == 1:
    w = np.zeros((n_out, n_in), np.float32)
    w[:, 0] = 1.0
    return w
  pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)
  lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
  frac = pos - lo
  w = np.zeros((n_out, n_in), np.float32)
  w[np.arange(n_out), lo] += 1.0 - frac
  w[np.arange(n_out), lo + 1] += frac
  return w


def resize_bilinear_align_corners(x: Float[Array, "b h w c"],
                                  size: tuple[int, int]) -> Float[Array, "b H W c"]:
  """Bilinear resize matching torch `F.interpolate(mode='bilinear', align_corners=True)`."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  wh = jnp.asarray(_align_corners_matrix(h, size[0]), x.dtype)
  ww = jnp.asarray(_align_corners_matrix(w, size[1]), x.dtype)
  return jnp.einsum("Hh,bhwc,Ww->bHWc", wh, x, ww)


def _torch_normal_init(mean: float, std: float) -> Callable:
  def init(rng, shape, dtype=jnp.float32):
    return mean + std * jax.random.normal(rng, shape, dtype)
  return init


class InstanceNormPlus(nn.Module):
  """Instance normalization++ (NCSNv2 paper Eq. 4 in Appendix; N2 `InstanceNorm2dPlus`).

  h_k = (x_k - mu_k) / sqrt(s_k^2 + 1e-5) + alpha_k (mu_k - m) / sqrt(v + 1e-5), out = gamma h + beta,
  where mu_k, s_k^2 are channel k's spatial mean and variance, m and v the mean and (unbiased)
  variance of the mu_k over channels. With `num_classes`, (gamma, alpha, beta) are looked up per
  noise level (conditional instance norm++ of NCSN, N1 `ConditionalInstanceNorm2dPlus`);
  gamma, alpha ~ N(1, 0.02), beta = 0 as in the reference.
  """
  num_classes: int | None = None

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"],
               level: Int[Array, "b"] | None = None) -> Float[Array, "b h w c"]:
    c = x.shape[-1]
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=(1, 2))  # [b, c]
    var = jnp.var(xf, axis=(1, 2))
    m = jnp.mean(mu, axis=-1, keepdims=True)
    v = jnp.var(mu, axis=-1, keepdims=True, ddof=1) if c > 1 else jnp.zeros_like(m)
    h = (xf - mu[:, None, None]) * jax.lax.rsqrt(var[:, None, None] + 1e-5)
    if self.num_classes is None:
      gamma = self.param("gamma", _torch_normal_init(1.0, 0.02), (c,))
      alpha = self.param("alpha", _torch_normal_init(1.0, 0.02), (c,))
      beta = self.param("beta", nn.initializers.zeros, (c,))
      gamma, alpha, beta = gamma[None], alpha[None], beta[None]
    else:
      if level is None:
        raise ValueError("a conditional InstanceNormPlus needs the per-example noise level")
      embed = self.param("embedding", _cond_embedding_init, (self.num_classes, 3 * c))
      gamma, alpha, beta = jnp.split(embed[level], 3, axis=-1)
    means_term = (mu - m) * jax.lax.rsqrt(v + 1e-5) * alpha
    out = gamma[:, None, None] * (h + means_term[:, None, None]) + beta[:, None, None]
    return out.astype(x.dtype)


def _cond_embedding_init(rng, shape, dtype=jnp.float32):
  """[gamma | alpha | beta] per level: gamma, alpha ~ N(1, 0.02), beta = 0 (N1 init)."""
  n, three_c = shape
  c = three_c // 3
  ga = 1.0 + 0.02 * jax.random.normal(rng, (n, 2 * c), dtype)
  return jnp.concatenate([ga, jnp.zeros((n, c), dtype)], axis=-1)
