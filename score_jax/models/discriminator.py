"""Discriminators for adversarial score matching, NHWC, spectrally normalized.

Jolicoeur-Martineau, Piche-Taillefer, Tachet des Combes & Mitliagkas 2020, "Adversarial score
matching and improved sampling for image generation" (Sec. 4): a discriminator D compares real
images with the score network's denoised outputs. D is not noise-conditioned and sees images in
[0, 1] as they are (the reference feeds `X` and the clamped denoised `X` with no rescaling).
Architectures follow the reference AlexiaJM/AdversarialConsistentScoreMatching:

- `BigGANDiscriminator`: `models/models_biggan.py` (adversarial `arch: 2`), itself BigGAN-PyTorch
  (Brock et al. 2019) unconditional D: SN residual DBlocks, optional SA-GAN non-local attention,
  ReLU, global sum pooling, SN linear. Defaults of the reference `biggan` config: wide blocks,
  3x3 kernels, `attn: '64'`, xavier init.
- `DCGANDiscriminator`: `models/GAN_D.py` `DCGAN_D0` (4x4 stride-2 convs and LeakyReLU down to
  4x4, then a 4x4 valid conv to one logit), batch-norm free, spectral norm optional.
- `MLPDiscriminator`: the same recipe for 2-D toy data (not in the reference).

Spectral normalization (Miyato et al. 2018) divides each kernel, viewed as a matrix
`[fan_in, out]` (conv kernels `[kh, kw, in, out]` -> `[kh*kw*in, out]`), by its largest singular
value, estimated with one power-iteration step per call from a vector `u` `[out]` kept in the
`"spectral_stats"` variable collection. The step is the reference's (BigGAN `power_iteration`,
one singular value, eps 1e-12): v = normalize(W u), u' = normalize(W^T v), sigma = v^T W u', with
u and v treated as constants for the gradient. It runs on every call; `u'` is written back only in
training, so train and eval outputs agree for the same variables. Training calls therefore need
`mutable=["spectral_stats"]`, and the collection is state to checkpoint with the parameters:

  variables = model.init(rng, x)                       # {"params", "spectral_stats"}
  logits, upd = model.apply(variables, x, train=True, mutable=["spectral_stats"])
  logits = model.apply(variables, x)                   # eval: stats untouched

Deviations from the reference, all deliberate:
- Biases start at zero (the reference keeps PyTorch's uniform default for biases; only weights are
  re-initialized).
- DCGAN's LeakyReLU slope is 0.2; the reference's `Activation` uses 0.02 for `DCGAN_D0`.
- Attention placement: the reference attaches attention after a block whose *listed* resolution
  matches `attn`; here it is after a block whose *actual* output resolution matches
  `attention_resolution`. With the default 64 both put it after the block that halves 128 px to
  64 px (the first block at 128 px input, the second at 256 px), and both leave it out at 28, 32
  and 64 px (at 64 px the first block already outputs 32x32, so no block outputs 64x64).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from score_jax import cpu

SPECTRAL_STATS = "spectral_stats"
DISCRIMINATOR_ARCHS = ("biggan", "dcgan", "mlp")

_SN_EPS = 1e-12
_XAVIER = nn.initializers.glorot_uniform()
# DCGAN weights ~ N(0, 0.02) as in the reference `weights_init`.
_DCGAN_INIT = nn.initializers.normal(0.02)

# Input resolution -> (output channel multipliers of the DBlocks, downsample flags); the
# reference `D_arch` table (input channels are the previous block's output, first is the image).
_BIGGAN_ARCH: dict[int, tuple[tuple[int, ...], tuple[bool, ...]]] = {
    28: ((4, 4, 4, 4), (True, True, False, False)),
    32: ((4, 4, 4, 4), (True, True, False, False)),
    64: ((1, 2, 4, 8, 16), (True, True, True, True, False)),
    128: ((1, 2, 4, 8, 16, 16), (True, True, True, True, True, False)),
    256: ((1, 2, 4, 8, 8, 16, 16), (True, True, True, True, True, True, False)),
}


def _l2_normalize(v: Float[Array, "n"], eps: float) -> Float[Array, "n"]:
  """v / max(|v|, eps), as torch `F.normalize`."""
  return v / jnp.maximum(jnp.linalg.norm(v), eps)


def _unit_normal(rng: jax.Array, shape: tuple[int, ...]) -> Float[Array, "n"]:
  return _l2_normalize(jax.random.normal(rng, shape, jnp.float32), _SN_EPS)


def spectral_normalize(kernel: Float[Array, "... out"], u: Float[Array, "out"],
                       eps: float = _SN_EPS
                       ) -> tuple[Float[Array, "... out"], Float[Array, "out"], Float[Array, ""]]:
  """One power-iteration step on `kernel` viewed as `[fan_in, out]`, then `kernel / sigma`.

  Args:
    kernel: weight whose last axis is the output axis (dense `[in, out]`, conv `[kh, kw, in, out]`).
    u: current estimate of the top right-singular vector `[out]`, unit norm.
    eps: floor on the norms in the normalizations.

  Returns:
    `(kernel / sigma, u_new, sigma)`: the normalized kernel (same shape), the updated vector
    `[out]`, and the estimated largest singular value (scalar). Gradients flow through `kernel`
    in `sigma`, not through the power-iteration vectors.
  """
  w_mat = kernel.reshape(-1, kernel.shape[-1]).astype(jnp.float32)
  w_const = jax.lax.stop_gradient(w_mat)
  u = jax.lax.stop_gradient(u)
  v = _l2_normalize(w_const @ u, eps)
  u_new = _l2_normalize(w_const.T @ v, eps)
  sigma = v @ (w_mat @ u_new)
  return (kernel / sigma).astype(kernel.dtype), u_new, sigma


def _normalized_kernel(module: nn.Module, kernel: jax.Array, update_stats: bool,
                       eps: float) -> jax.Array:
  """Spectrally normalizes `kernel`, keeping `u` in `module`'s "spectral_stats" collection."""
  u = module.variable(SPECTRAL_STATS, "u",
                      lambda: _unit_normal(module.make_rng("params"), (kernel.shape[-1],)))
  w, u_new, _ = spectral_normalize(kernel, u.value, eps)
  # Init leaves u at its random draw whatever `update_stats` says, so init is train-agnostic.
  if update_stats and not module.is_initializing():
    u.value = u_new
  return w


class SpectralNormConv(nn.Module):
  """Square-kernel 2-D convolution with a spectrally normalized kernel (torch-style padding).

  Attributes:
    features: output channels.
    kernel_size: k of the k x k kernel.
    strides: stride in both spatial dims.
    padding: zero padding on every side.
    use_bias: add a bias (not normalized).
    kernel_init: initializer of the raw kernel `[k, k, in, features]`.
    eps: norm floor of the power iteration.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: int = 1
  use_bias: bool = True
  kernel_init: jax.nn.initializers.Initializer = _XAVIER
  eps: float = _SN_EPS

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"], *,
               update_stats: bool) -> Float[Array, "b h2 w2 features"]:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
    w = _normalized_kernel(self, kernel, update_stats, self.eps)
    pad = ((self.padding, self.padding),) * 2
    y = jax.lax.conv_general_dilated(x, w.astype(x.dtype), (self.strides,) * 2, pad,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)
    return y


class SpectralNormDense(nn.Module):
  """Dense layer with a spectrally normalized kernel `[in, features]`.

  Attributes:
    features: output features.
    use_bias: add a bias (not normalized).
    kernel_init: initializer of the raw kernel.
    eps: norm floor of the power iteration.
  """
  features: int
  use_bias: bool = True
  kernel_init: jax.nn.initializers.Initializer = _XAVIER
  eps: float = _SN_EPS

  @nn.compact
  def __call__(self, x: Float[Array, "b d"], *, update_stats: bool) -> Float[Array, "b features"]:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    w = _normalized_kernel(self, kernel, update_stats, self.eps)
    y = x @ w.astype(x.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)
    return y


def _avg_pool_2x2(x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 c"]:
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _max_pool_2x2(x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 c"]:
  return nn.max_pool(x, (2, 2), strides=(2, 2))


class DBlock(nn.Module):
  """BigGAN residual discriminator block (wide: the hidden width is `features`).

  preactivation:     relu -> conv3 -> relu -> conv3 -> [pool]  +  [conv1] -> [pool]
  not preactivation:         conv3 -> relu -> conv3 -> [pool]  +  [pool] -> [conv1]
  The 1x1 shortcut conv exists when the channel count changes or the block downsamples
  (BigGAN's `learnable_sc`); the first block of D is the one without preactivation, so the raw
  image is neither rectified nor convolved before pooling in its shortcut.

  Attributes:
    features: output channels.
    downsample: 2x2 average pooling at the end of both paths.
    preactivation: ReLU on the input of the residual path.
  """
  features: int
  downsample: bool
  preactivation: bool

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b h2 w2 f"]:
    h = nn.relu(x) if self.preactivation else x
    h = SpectralNormConv(self.features, name="conv1")(h, update_stats=train)
    h = SpectralNormConv(self.features, name="conv2")(nn.relu(h), update_stats=train)
    if self.downsample:
      h = _avg_pool_2x2(h)
    shortcut = x
    if x.shape[-1] != self.features or self.downsample:
      conv_sc = SpectralNormConv(self.features, kernel_size=1, padding=0, name="conv_sc")
      if self.preactivation:
        shortcut = conv_sc(shortcut, update_stats=train)
        shortcut = _avg_pool_2x2(shortcut) if self.downsample else shortcut
      else:
        shortcut = _avg_pool_2x2(shortcut) if self.downsample else shortcut
        shortcut = conv_sc(shortcut, update_stats=train)
    return h + shortcut


class Attention(nn.Module):
  """SA-GAN non-local block as released in BigGAN: x + gamma * o(softmax(theta phi^T) g).

  theta, phi: 1x1 SN convs to c/8 channels; g: 1x1 SN conv to c/2 channels; phi and g are 2x2
  max-pooled (keys and values on a quarter of the positions); o: 1x1 SN conv back to c; no
  biases; the gain gamma starts at 0 so the block starts as the identity.
  """

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b h w c"]:
    b, hgt, wid, c = x.shape
    if c < 8 or hgt % 2 or wid % 2:
      raise ValueError(f"attention needs >= 8 channels and even h, w; got input shape {x.shape}")

    def conv(features: int, name: str):
      return SpectralNormConv(features, kernel_size=1, padding=0, use_bias=False, name=name)

    theta = conv(c // 8, "theta")(x, update_stats=train).reshape(b, hgt * wid, c // 8)
    phi = _max_pool_2x2(conv(c // 8, "phi")(x, update_stats=train)).reshape(b, -1, c // 8)
    g = _max_pool_2x2(conv(c // 2, "g")(x, update_stats=train)).reshape(b, -1, c // 2)
    logits = jnp.einsum("bqd,bkd->bqk", theta, phi).astype(jnp.float32)
    beta = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    attended = jnp.einsum("bqk,bkd->bqd", beta, g).reshape(b, hgt, wid, c // 2)
    o = conv(c, "o")(attended, update_stats=train)
    gamma = self.param("gamma", nn.initializers.zeros, ())
    return x + gamma.astype(x.dtype) * o


def _check_resolution(x: jax.Array, resolution: int, name: str) -> None:
  if x.shape[1:3] != (resolution, resolution):
    raise ValueError(f"{name} was built for {resolution}x{resolution} images, got input shape "
                     f"{x.shape}")


class BigGANDiscriminator(nn.Module):
  """Unconditional BigGAN discriminator, `x [b, res, res, c] -> logits [b]`.

  At 32 px: 4 DBlocks of 4ch channels, downsampling (True, True, False, False), 32 -> 8 px.
  At 64 px: 5 DBlocks of ch * (1, 2, 4, 8, 16) channels, downsampling (True x 4, False), 64 -> 4
  px (the reference table; BigGAN's last block keeps the 4x4 resolution). Then ReLU, a sum over
  positions and an SN dense layer to one logit. All kernels are spectrally normalized and
  xavier-uniform initialized, biases start at zero.

  Attributes:
    ch: width multiplier (the reference `biggan.ch`, 64 in the paper).
    resolution: input height = width; one of 28, 32, 64, 128, 256.
    attention_resolution: add a non-local block after every DBlock whose output has this height;
      None for none. The default 64 is the reference's `attn: '64'` (inactive below 128 px, see
      the module docstring).
  """
  ch: int = 64
  resolution: int = 32
  attention_resolution: int | None = 64

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b"]:
    if self.resolution not in _BIGGAN_ARCH:
      raise ValueError(f"BigGANDiscriminator has no architecture for resolution "
                       f"{self.resolution}; use one of {sorted(_BIGGAN_ARCH)}")
    _check_resolution(x, self.resolution, "BigGANDiscriminator")
    multipliers, downsample = _BIGGAN_ARCH[self.resolution]
    h = x
    for i, (mult, down) in enumerate(zip(multipliers, downsample)):
      h = DBlock(self.ch * mult, downsample=down, preactivation=i > 0, name=f"block{i}")(h, train)
      if h.shape[1] == self.attention_resolution:
        h = Attention(name=f"attention{i}")(h, train)
    # Sum (not mean) pooling as in SN-GAN / BigGAN: the logit scale grows with the area.
    h = jnp.sum(nn.relu(h), axis=(1, 2))
    return SpectralNormDense(1, name="linear")(h, update_stats=train)[:, 0]


class DCGANDiscriminator(nn.Module):
  """DCGAN discriminator without batch norm (reference `DCGAN_D0`), `x -> logits [b]`.

  4x4 stride-2 convs (padding 1, no bias) with LeakyReLU: the image to ch channels, then doubling
  the channels while halving the size down to 4x4, then a 4x4 valid conv to one logit. At 32 px:
  ch, 2ch, 4ch channels at 16, 8, 4 px. Kernels ~ N(0, 0.02) (reference `weights_init`).

  Attributes:
    ch: channels of the first conv (reference `D_h_size`).
    resolution: input height = width, 4 * 2^k with k >= 1.
    spectral_norm: spectrally normalize every conv (reference `spectral`).
    negative_slope: LeakyReLU slope.
  """
  ch: int = 64
  resolution: int = 32
  spectral_norm: bool = True
  negative_slope: float = 0.2

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b"]:
    r = self.resolution
    if r < 8 or r & (r - 1):
      raise ValueError(f"DCGANDiscriminator needs a power-of-two resolution >= 8, got {r}")
    _check_resolution(x, r, "DCGANDiscriminator")

    def conv(h: jax.Array, features: int, strides: int, padding: int, name: str) -> jax.Array:
      if self.spectral_norm:
        return SpectralNormConv(features, kernel_size=4, strides=strides, padding=padding,
                                use_bias=False, kernel_init=_DCGAN_INIT,
                                name=name)(h, update_stats=train)
      return nn.Conv(features, (4, 4), strides=strides, padding=((padding, padding),) * 2,
                     use_bias=False, kernel_init=_DCGAN_INIT, name=name)(h)

    h = nn.leaky_relu(conv(x, self.ch, 2, 1, "conv0"), self.negative_slope)
    features, i = self.ch, 1
    while h.shape[1] > 4:
      features *= 2
      h = nn.leaky_relu(conv(h, features, 2, 1, f"conv{i}"), self.negative_slope)
      i += 1
    return conv(h, 1, 1, 0, "conv_out").reshape(x.shape[0])


class MLPDiscriminator(nn.Module):
  """MLP discriminator for low-dimensional (toy) data, `x [b, d] -> logits [b]`.

  `num_layers` hidden Dense layers of width `hidden` with LeakyReLU(0.2), then Dense to one
  logit; xavier-uniform kernels, zero biases.

  Attributes:
    hidden: hidden width.
    num_layers: number of hidden layers.
    spectral_norm: spectrally normalize every Dense kernel.
  """
  hidden: int = 128
  num_layers: int = 3
  spectral_norm: bool = True

  @nn.compact
  def __call__(self, x: Float[Array, "b d"], train: bool = False) -> Float[Array, "b"]:

    def dense(h: jax.Array, features: int, name: str) -> jax.Array:
      if self.spectral_norm:
        return SpectralNormDense(features, name=name)(h, update_stats=train)
      return nn.Dense(features, kernel_init=_XAVIER, name=name)(h)

    h = x
    for i in range(self.num_layers):
      h = nn.leaky_relu(dense(h, self.hidden, f"dense{i}"), 0.2)
    return dense(h, 1, "dense_out")[:, 0]


def build_discriminator(arch: str, *, ch: int, resolution: int) -> cpu.Accelerated:
  """The discriminator named `arch`, with its reference defaults otherwise.

  Args:
    arch: one of `DISCRIMINATOR_ARCHS`.
    ch: width: BigGAN `ch`, DCGAN first-layer channels, MLP hidden width.
    resolution: image height = width (unused by "mlp").

  Returns:
    The flax module through `cpu.accelerate` (the fast CPU path where it is on); call it as
    `model.apply(variables, x, train=...)`.

  Raises:
    ValueError: unknown `arch`.
  """
  if arch == "biggan":
    return cpu.accelerate(BigGANDiscriminator(ch=ch, resolution=resolution))
  if arch == "dcgan":
    return cpu.accelerate(DCGANDiscriminator(ch=ch, resolution=resolution))
  if arch == "mlp":
    return cpu.accelerate(MLPDiscriminator(hidden=ch))
  raise ValueError(f"unknown discriminator arch {arch!r}; expected one of "
                   f"{', '.join(DISCRIMINATOR_ARCHS)}")
