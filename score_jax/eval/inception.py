"""The FID Inception-v3 network in Flax (NHWC), for Frechet Inception Distance features.

Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium" define FID on the 2048-d pool3 features of the TensorFlow Inception graph of
2015-12-05 (`inception-2015-12-05.tgz`, Szegedy et al. 2016, "Rethinking the Inception
Architecture"). This is that graph as pytorch-fid (mseitzer/pytorch-fid, `inception.py`,
`fid_inception_v3` with `FIDInceptionA/C/E_1/E_2`) ports it, with the TF graph's quirks:

- every convolution is bias-free and followed by batch norm with eps 1e-3 and no learned scale
  (TF's graph has none; files that carry a BN weight, e.g. pytorch-fid's ones, are loaded as
  they are, and a missing one is 1), then ReLU;
- the 3x3 stride-1 average pools of the Inception-A/C/E_1 blocks exclude the zero padding from
  the count (TF's `AvgPool` with SAME padding; torch `count_include_pad=False`);
- the pool branch of the last mixed block (E_2, `Mixed_7c`) is a 3x3 stride-1 max pool (a bug in
  the TF graph kept for fidelity);
- inputs in [0, 1] are resized to 299x299 bilinearly (torch `F.interpolate(mode="bilinear",
  align_corners=False)`) and mapped to [-1, 1] by 2x - 1;
- features are the mean over the spatial grid of the last mixed block; the optional logits are
  the 1008-way `fc` of pytorch-fid's weights.

Variables follow pytorch-fid's `state_dict` names: `Mixed_5b/branch1x1/conv/kernel`,
`.../bn/{scale,bias}` in "params" and `.../bn/{mean,var}` in "batch_stats"; `load_params` maps a
flat `.npz` with the torch names (`Mixed_5b.branch1x1.conv.weight`, `...bn.running_mean`,
`fc.weight`, ...) onto them.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from score_jax import paths

FID_SIZE = 299
POOL_FEATURES = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3

Variables = dict[str, Any]
Padding = tuple[tuple[int, int], tuple[int, int]]


def _pad(ph: int, pw: int) -> Padding:
  return ((ph, ph), (pw, pw))


class ConvBN(nn.Module):
  """Bias-free convolution, batch norm (inference statistics, eps 1e-3), ReLU.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: stride in both spatial dims.
    padding: zero padding (ph, pw) on each side of height and width.
    precision: matmul precision of the convolution (full float32 by default, so GPU and CPU
      features agree).
  """
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 f"]:
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=_pad(*self.padding), use_bias=False, precision=self.precision,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
  # TF SAME average pooling divides by the number of in-image taps (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1), count_include_pad=False)


def _max_pool_3x3_s2(x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 c"]:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """`Mixed_5b/5c/5d`: 1x1, 5x5, double 3x3 and avg-pool branches (FIDInceptionA)."""
  pool_features: int

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w f"]:
    b1 = ConvBN(64, name="branch1x1")(x)
    b5 = ConvBN(48, name="branch5x5_1")(x)
    b5 = ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = ConvBN(64, name="branch3x3dbl_1")(x)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = ConvBN(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """`Mixed_6a`: grid reduction 35 -> 17 (torchvision InceptionB)."""

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 f"]:
    b3 = ConvBN(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = ConvBN(64, name="branch3x3dbl_1")(x)
    bd = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = ConvBN(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """`Mixed_6b..6e`: factorized 7x7 branches (FIDInceptionC)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w f"]:
    c7 = self.channels_7x7
    b1 = ConvBN(192, name="branch1x1")(x)
    b7 = ConvBN(c7, name="branch7x7_1")(x)
    b7 = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = ConvBN(c7, name="branch7x7dbl_1")(x)
    bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = ConvBN(192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """`Mixed_7a`: grid reduction 17 -> 8 (torchvision InceptionD)."""

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 f"]:
    b3 = ConvBN(192, name="branch3x3_1")(x)
    b3 = ConvBN(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = ConvBN(192, name="branch7x7x3_1")(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = ConvBN(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """`Mixed_7b` (avg-pool branch, FIDInceptionE_1) and `Mixed_7c` (max-pool, FIDInceptionE_2).

  Attributes:
    max_pool: use the 3x3 stride-1 max pool of the TF graph's last block in the pool branch.
  """
  max_pool: bool = False

  @nn.compact
  def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w f"]:
    b1 = ConvBN(320, name="branch1x1")(x)
    b3 = ConvBN(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = ConvBN(448, name="branch3x3dbl_1")(x)
    bd = ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1))
    else:
      pooled = _avg_pool_3x3(x)
    bp = ConvBN(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(x: Float[Array, "b h w c"], size: int = FID_SIZE) -> Float[Array, "b s s c"]:
  """Bilinear resize to `size x size` with half-pixel centers and no antialiasing.

  Equals torch `F.interpolate(x, (size, size), mode="bilinear", align_corners=False)` (what
  pytorch-fid applies), for up- and downsampling: both sample at (i + 0.5) * in / out - 0.5 with
  a tent of radius one input pixel and clamp at the borders.
  """
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, size, size, c), method="bilinear", antialias=False)


class InceptionV3FID(nn.Module):
  """FID Inception-v3 on images in [0, 1], NHWC.

  Attributes:
    resize: resize the input to 299x299 first (pytorch-fid's default); without it the network
      runs on the given size (at least 75x75) and pools over whatever grid results.
    with_logits: also return the 1008-way logits (needs weights with `fc`).
  """
  resize: bool = True
  with_logits: bool = False

  @nn.compact
  def __call__(self, x: Float[Array, "b h w 3"]) -> dict[str, Float[Array, "b n"]]:
    """Features (and logits) of a batch.

    Args:
      x: images `[b, h, w, 3]` in [0, 1].

    Returns:
      `{"pool": [b, 2048]}` (the spatial mean of `Mixed_7c`), plus `"logits"` `[b, 1008]` when
      `with_logits`.
    """
    if x.shape[-1] != 3:
      raise ValueError(f"expected RGB images [b, h, w, 3], got shape {x.shape}")
    x = x.astype(jnp.float32)
    if self.resize:
      x = resize_bilinear(x)
    x = 2.0 * x - 1.0
    x = ConvBN(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = ConvBN(80, name="Conv2d_3b_1x1")(x)
    x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    out = {"pool": pool}
    if self.with_logits:
      out["logits"] = nn.Dense(NUM_LOGITS, precision=jax.lax.Precision.HIGHEST, name="fc")(pool)
    return out


def _expected_shapes(with_logits: bool) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat (collection, module path..., leaf) -> shape of the model's variables."""
  model = InceptionV3FID(resize=False, with_logits=with_logits)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, FID_SIZE, FID_SIZE, 3), jnp.float32))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


# torch leaf name -> (collection, flax leaf name, numpy transform).
_LEAF_MAP: dict[str, tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = {
    "conv.weight": ("params", "kernel", lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
    "bn.weight": ("params", "scale", lambda w: w),
    "bn.bias": ("params", "bias", lambda w: w),
    "bn.running_mean": ("batch_stats", "mean", lambda w: w),
    "bn.running_var": ("batch_stats", "var", lambda w: w),
}


def variables_from_state_dict(state_dict: dict[str, np.ndarray]) -> Variables:
  """Maps pytorch-fid `state_dict` names onto the variables of `InceptionV3FID`.

  Args:
    state_dict: torch-named arrays (`Conv2d_1a_3x3.conv.weight` `[O, I, kh, kw]`,
      `....bn.{weight,bias,running_mean,running_var}` `[O]`, optionally `fc.weight`
      `[1008, 2048]` and `fc.bias` `[1008]`); `num_batches_tracked` entries are ignored and a
      missing `bn.weight` means no scale (ones), as in the TF graph.

  Returns:
    `{"params": ..., "batch_stats": ...}` for `InceptionV3FID(with_logits=...)`, float32.

  Raises:
    ValueError: names missing, unexpected, or of the wrong shape.
  """
  with_logits = "fc.weight" in state_dict
  expected = _expected_shapes(with_logits)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  unexpected = []
  for name, value in state_dict.items():
    value = np.asarray(value, np.float32)
    if name.endswith("num_batches_tracked"):
      continue
    if name in ("fc.weight", "fc.bias"):
      leaf = "kernel" if name == "fc.weight" else "bias"
      flat[("params", "fc", leaf)] = value.T if leaf == "kernel" else value
      continue
    parts = name.split(".")
    leaf_key = ".".join(parts[-2:])
    if len(parts) < 3 or leaf_key not in _LEAF_MAP:
      unexpected.append(name)
      continue
    collection, leaf, transform = _LEAF_MAP[leaf_key]
    flat[(collection, *parts[:-1], leaf)] = transform(value)
  for key in expected:
    if key[-1] == "scale" and key not in flat:
      flat[key] = np.ones(expected[key], np.float32)
  unexpected += [".".join(k[1:]) for k in flat if k not in expected]
  missing = [".".join(k[1:]) for k in expected if k not in flat]
  if unexpected or missing:
    raise ValueError(f"weights do not fit InceptionV3FID: missing {missing[:5]} "
                     f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
  wrong = [f"{'.'.join(k[1:])}: {flat[k].shape} != {s}" for k, s in expected.items()
           if flat[k].shape != s]
  if wrong:
    raise ValueError(f"weights of the wrong shape for InceptionV3FID: {wrong[:5]}")
  variables: Variables = {}
  for key, value in flat.items():
    node = variables
    for part in key[:-1]:
      node = node.setdefault(part, {})
    node[key[-1]] = jnp.asarray(value)
  return variables


def load_params(npz_path: str | os.PathLike) -> Variables:
  """Loads a flat torch-named `.npz` (see `variables_from_state_dict`) as Flax variables.

  Returns:
    `{"params", "batch_stats"}` for `InceptionV3FID`; "params" holds `fc` when the file has
    logits (see `has_logits`).
  """
  return variables_from_state_dict(paths.load_npz(npz_path))


def has_logits(variables: Variables) -> bool:
  """Whether `variables` include the 1008-way `fc` layer."""
  return "fc" in variables["params"]


def features_fn(variables: Variables, *, resize: bool = True
                ) -> Callable[[Float[Array, "b h w 3"]], Float[Array, "b 2048"]]:
  """A jitted map from images `[b, h, w, 3]` in [0, 1] to FID pool features `[b, 2048]`.

  Args:
    variables: from `load_params`.
    resize: resize to 299x299 first (the FID protocol).
  """
  model = InceptionV3FID(resize=resize, with_logits=False)
  params = {"params": {k: v for k, v in variables["params"].items() if k != "fc"},
            "batch_stats": variables["batch_stats"]}
  # Weights are an argument, not closed-over constants, so XLA does not fold ~95 MB into the
  # compiled program.
  apply = jax.jit(lambda p, images: model.apply(p, images)["pool"])

  def features(images: Float[Array, "b h w 3"]) -> Float[Array, "b 2048"]:
    return apply(params, images)

  return features
