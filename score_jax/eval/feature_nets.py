"""Feature networks over every device: images -> Inception or MNIST-classifier features.

Samples are mapped as images saved to PNG are (clipped to [0, 1], quantized to 8 bits; the
protocol of the NCSN/NCSNv2 FID numbers, and pytorch-fid's input convention), then go through the
FID Inception network (`score_jax.eval.inception`; grayscale repeated to three channels) or the
project's digit classifier (`score_jax.eval.mnist_classifier`), split over all devices of all
hosts (`parallel.batch_map`). A features dict holds per-example arrays: `pool` (the penultimate
features), `finite` (whether the sample had only finite pixels) and, for Inception weights with
the 1008-way `fc`, `logits`.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import jax
import numpy as np

from score_jax import parallel
from score_jax.eval import inception, mnist_classifier

Features = dict[str, np.ndarray]


def to_unit_images(x: np.ndarray, *, centered: bool) -> tuple[np.ndarray, np.ndarray]:
  """Images as if saved to PNG: in [0, 1], 8-bit levels, channels kept.

  Args:
    x: images `[b, h, w, c]` in [0, 1] (or [-1, 1] when `centered`).
    centered: whether `x` is in [-1, 1].

  Returns:
    `(images [b, h, w, c] float32, finite [b])`: non-finite pixels become 0 (and the example is
    flagged), values are clipped to [0, 1] and rounded to multiples of 1/255.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 4:
    raise ValueError(f"image features need images [b, h, w, c], got shape {x.shape}")
  finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
  if centered:
    x = (x + 1.0) / 2.0
  x = np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
  return (np.round(x * 255.0) / 255.0).astype(np.float32), finite


def to_inception_input(x: np.ndarray, *, centered: bool) -> tuple[np.ndarray, np.ndarray]:
  """Images as the FID network takes them: RGB in [0, 1], 8-bit levels (see `to_unit_images`).

  Args:
    x: images `[b, h, w, c]`, c in (1, 3), in [0, 1] (or [-1, 1] when `centered`).
    centered: whether `x` is in [-1, 1].

  Returns:
    `(images [b, h, w, 3], finite [b])`; grayscale is repeated to three channels.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"Inception features need images [b, h, w, 1 or 3], got shape {x.shape}")
  x, finite = to_unit_images(x, centered=centered)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x, finite


def make_inception_fn(variables: inception.Variables, mesh: jax.sharding.Mesh | None = None
                      ) -> Callable[[np.ndarray], Features]:
  """A map from images `[b, h, w, 3]` in [0, 1] to `{"pool": [b, 2048]}` (+ `"logits"` `[b, 1008]`).

  Runs over every device of `mesh` (all devices of all hosts by default). Logits are returned
  when the weights hold the `fc` layer (`inception.has_logits`).
  """
  with_logits = inception.has_logits(variables)
  model = inception.InceptionV3FID(with_logits=with_logits)
  if not with_logits:
    variables = {"params": {k: v for k, v in variables["params"].items() if k != "fc"},
                 "batch_stats": variables["batch_stats"]}
  return device_features(lambda v, x: dict(model.apply(v, x)), variables, mesh)


def device_features(apply: Callable[[Any, jax.Array], Any], params: Any,
                    mesh: jax.sharding.Mesh | None = None) -> Callable[[np.ndarray], Any]:
  """`apply(params, x)` over the rows of host batches split across every device of `mesh`.

  The parameters are placed on the devices once; a batch of any size (padded to the device
  count, see `parallel.batch_map`) returns host arrays.
  """
  mesh = mesh or parallel.make_mesh()
  params = parallel.replicate(params, mesh)
  p_apply = parallel.batch_map(apply, mesh)
  return lambda x: p_apply(params, np.asarray(x, np.float32))


def image_features(net: Callable[[np.ndarray], Features], x: np.ndarray, *,
                   centered: bool) -> Features:
  """Inception features of one batch of images (see `to_inception_input`).

  Returns:
    `{"pool": [b, 2048], "finite": [b]}`, plus `"logits"` `[b, 1008]` when `net` gives them.
  """
  images, finite = to_inception_input(x, centered=centered)
  return {**net(images), "finite": finite}


def params_digest(params: Any) -> str:
  """sha256 of a parameter tree's paths, dtypes, shapes and values: names one feature space."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    a = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
    digest.update(a.tobytes())
  return digest.hexdigest()


def classifier_features_fn(params: Any, mesh: jax.sharding.Mesh | None = None
                           ) -> Callable[[np.ndarray], np.ndarray]:
  """The classifier's 128-d features of digits `[b, 28, 28, 1]` in [0, 1], over all devices."""
  model = mnist_classifier.MnistClassifier()
  return device_features(lambda p, x: model.apply({"params": p}, x)[1], params, mesh)


def classifier_features(net: Callable[[np.ndarray], np.ndarray], x: np.ndarray, *,
                        centered: bool) -> Features:
  """Classifier features of one batch of digits (mapped as in `to_unit_images`).

  Args:
    net: `classifier_features_fn(params)`: `[b, 28, 28, 1]` in [0, 1] -> `[b, 128]`.
    x: digits `[b, 28, 28, 1]` in the data's range.
    centered: whether `x` is in [-1, 1].

  Returns:
    `{"pool": [b, 128], "finite": [b]}` (`pool` names the penultimate features, as for Inception).
  """
  images, finite = to_unit_images(x, centered=centered)
  return {"pool": np.asarray(net(images)), "finite": finite}
