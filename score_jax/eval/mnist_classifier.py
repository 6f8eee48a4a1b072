"""A small MNIST classifier: the feature space of FID-like distances on MNIST, and mode counts.

Inception features (`score_jax.eval.inception`) are the published FID protocol, but they are slow
on a CPU and were never meant for 28x28 digits; a common substitute on MNIST is the feature space
of a small digit classifier. StackedMNIST mode counts (Metz et al. 2017, "Unrolled Generative
Adversarial Networks"; Srivastava et al. 2017, VEEGAN; Lin et al. 2018, PacGAN; see
`score_jax.eval.stacked_mnist`) classify each colour channel with such a net. This is the project's
one such classifier:

  conv5x5(32, stride 2) - relu -> conv5x5(64, stride 2) - relu -> flatten (7 x 7 x 64)
    -> dense(128) - relu ("features", 128-d) -> dense(10) logits,

for inputs `[b, 28, 28, 1]` in [0, 1]. Strided convolutions replace the usual conv + 2x2
max-pool stages: on a CPU, XLA's max-pool gradient and the full-resolution convolutions make the
pooled net (conv3x3(32)-conv3x3(32)-pool-conv3x3(64)-pool-dense(128)) about 7x slower to train
(150 s against 20 s on two cores) for the same test accuracy (98.8%).

`train_classifier` trains it for three epochs with Adam, learning rate 1e-3 cosine-decayed to 0
(deterministic given the seed; 98.8-98.9% test accuracy over seeds 0-2, where a constant 1e-3 for
two epochs ends anywhere in 98.3-98.7% because the last iterate is noisy). `load_or_train` caches
the trained parameters in a flat `.npz` with the sha256 of the training images file, so every run
of the project measures in the same feature space and a changed dataset retrains. The command
below does that once (about 25 s on two cores); `main.py --mode=eval` with
`eval.features="mnist_classifier"` then reads the cached file (`load_checked`):

  python -m score_jax.eval.mnist_classifier --manual_dir=../shared/data/mnist [--cache_dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import sys
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jaxtyping import Array, Float, Int

import score_jax
from score_jax import image_data, paths

CACHE_NAME = "mnist_classifier_v1.npz"
# The command that trains and caches the classifier, named in errors where it is missing.
COMMAND = "python -m score_jax.eval.mnist_classifier --manual_dir={manual_dir}"
NUM_FEATURES = 128
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
# Rows per jitted call of the evaluation functions: bounds activation memory (25 KB per image
# for the first conv's output alone) while keeping the per-call overhead small.
EVAL_CHUNK = 500
_SHA_KEY = "__train_images_sha256__"
_TRAIN_IMAGES_FILE = "train-images-idx3-ubyte.gz"

Params = dict


class MnistClassifier(nn.Module):
  """The digit classifier; returns `(logits [b, 10], features [b, 128])`."""

  @nn.compact
  def __call__(self, x: Float[Array, "b 28 28 1"]
               ) -> tuple[Float[Array, "b 10"], Float[Array, "b 128"]]:
    x = nn.relu(nn.Conv(32, (5, 5), strides=2, padding="SAME", name="conv1")(x))
    x = nn.relu(nn.Conv(64, (5, 5), strides=2, padding="SAME", name="conv2")(x))
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(NUM_FEATURES, name="features")(x))
    logits = nn.Dense(NUM_CLASSES, name="logits")(features)
    return logits, features


def _to_input(images_uint8: np.ndarray) -> np.ndarray:
  return (np.asarray(images_uint8, np.float32) / 255.0)[..., None]


def train_classifier(images_uint8: np.ndarray, labels: np.ndarray, *, seed: int = 0,
                     epochs: int = 3, batch_size: int = 128,
                     learning_rate: float = 1e-3) -> Params:
  """Trains `MnistClassifier` with Adam on softmax cross-entropy, learning rate cosine-decayed.

  Deterministic given `seed` (the initialization key and the per-epoch shuffles derive from it).
  Each epoch drops the last partial batch, so every step has the same shape (one compilation).

  Args:
    images_uint8: `[n, 28, 28]` uint8 digits (0..255).
    labels: `[n]` integer classes 0..9.
    seed: initialization and shuffling seed.
    epochs: passes over the data.
    batch_size: examples per Adam step.
    learning_rate: initial learning rate, cosine-decayed to 0 over the run.

  Returns:
    The trained parameters (the "params" collection of `MnistClassifier`).
  """
  images_uint8 = np.asarray(images_uint8)
  labels = np.asarray(labels)
  if images_uint8.ndim != 3 or images_uint8.shape[1:] != IMAGE_SHAPE[:2]:
    raise ValueError(f"train_classifier needs images [n, 28, 28], got {images_uint8.shape}")
  if images_uint8.dtype != np.uint8:
    raise ValueError(f"train_classifier needs uint8 images, got {images_uint8.dtype}")
  if labels.shape != images_uint8.shape[:1]:
    raise ValueError(f"labels {labels.shape} do not match images {images_uint8.shape}")
  n = len(images_uint8)
  if epochs < 1:
    raise ValueError(f"epochs={epochs} must be >= 1")
  if n < batch_size:
    raise ValueError(f"{n} images are fewer than batch_size={batch_size}")
  model = MnistClassifier()
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *IMAGE_SHAPE)))["params"]
  steps_per_epoch = n // batch_size
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  x_all = _to_input(images_uint8)
  y_all = labels.astype(np.int32)
  shuffle_rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = shuffle_rng.permutation(n)
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      params, opt_state = step(params, opt_state, x_all[idx], y_all[idx])
  return jax.device_get(params)


def _check_images(images: Float[np.ndarray | Array, "b 28 28 1"], name: str) -> np.ndarray:
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f"{name} needs images [b, 28, 28, 1], got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{name} needs float images in [0, 1], got dtype {x.dtype} "
                     "(divide uint8 images by 255)")
  if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
    raise ValueError(f"{name} needs images in [0, 1], got values in [{x.min()}, {x.max()}] "
                     "(map [-1, 1] data with (x + 1) / 2, and clip samples)")
  return x.astype(np.float32)


# Module-level jits: every `features_fn`/`logits_fn` shares one compilation per input shape.
# Params are an argument, not closed over: XLA would otherwise embed them as constants.
@jax.jit
def _apply_features(params: Params, x: Float[Array, "b 28 28 1"]) -> Float[Array, "b 128"]:
  return MnistClassifier().apply({"params": params}, x)[1]


@jax.jit
def _apply_logits(params: Params, x: Float[Array, "b 28 28 1"]) -> Float[Array, "b 10"]:
  return MnistClassifier().apply({"params": params}, x)[0]


def _chunked(jitted: Callable[[Params, jax.Array], jax.Array], params: Params, name: str
             ) -> Callable[[np.ndarray], np.ndarray]:
  params = jax.device_put(params)

  def fn(images):
    x = _check_images(images, name)
    if len(x) <= EVAL_CHUNK:
      return np.asarray(jitted(params, x))
    outs = []
    for start in range(0, len(x), EVAL_CHUNK):
      chunk = x[start:start + EVAL_CHUNK]
      # Padding the last chunk to EVAL_CHUNK rows keeps one compiled shape.
      pad = EVAL_CHUNK - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *IMAGE_SHAPE), np.float32)])
      outs.append(np.asarray(jitted(params, chunk))[:EVAL_CHUNK - pad])
    return np.concatenate(outs)

  return fn


def features_fn(params: Params) -> Callable[[Float[np.ndarray | Array, "b 28 28 1"]],
                                            Float[np.ndarray, "b 128"]]:
  """The 128-d penultimate features of `MnistClassifier` as a function of images.

  The returned function checks its input (`[b, 28, 28, 1]` float in [0, 1]; anything else is a
  ValueError) and runs a jitted network on chunks of `EVAL_CHUNK` rows.

  Args:
    params: the classifier's parameters (`load_or_train` or `train_classifier`).

  Returns:
    `fn(images [b, 28, 28, 1]) -> features [b, 128]` (numpy float32).
  """
  return _chunked(_apply_features, params, "features_fn")


def logits_fn(params: Params) -> Callable[[Float[np.ndarray | Array, "b 28 28 1"]],
                                          Float[np.ndarray, "b 10"]]:
  """The class logits of `MnistClassifier` as a function of images (checked as `features_fn`).

  Args:
    params: the classifier's parameters.

  Returns:
    `fn(images [b, 28, 28, 1]) -> logits [b, 10]` (numpy float32).
  """
  return _chunked(_apply_logits, params, "logits_fn")


def predict(params: Params, images: Float[np.ndarray | Array, "b 28 28 1"]
            ) -> Int[np.ndarray, "b"]:
  """The predicted digit of each image: argmax of `logits_fn(params)(images)`."""
  return np.argmax(logits_fn(params)(images), axis=-1)


def accuracy(params: Params, images_uint8: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of `[n, 28, 28]` uint8 digits whose predicted class equals `labels [n]`."""
  return float(np.mean(predict(params, _to_input(images_uint8)) == np.asarray(labels)))


# --------------------------------------------------------------------------------------------
# Cache.


def default_cache_dir() -> pathlib.Path:
  """`$SCORE_JAX_CACHE`, else `~/.cache/score_jax`."""
  return score_jax.cache_dir()


def default_params_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """`load_or_train`'s cache file: `<cache_dir or default_cache_dir()>/<CACHE_NAME>`."""
  return pathlib.Path(cache_dir if cache_dir is not None else default_cache_dir()) / CACHE_NAME


def _file_sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with paths.open_file(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def save_params(path: str | os.PathLike, params: Params, train_images_sha256: str) -> None:
  """Writes params to a flat `.npz` ('/'-joined keys) with the data's sha256, atomically."""
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  flat[_SHA_KEY] = np.array(train_images_sha256)
  # All-or-nothing (a local temporary file renamed into place): a concurrent reader never sees
  # half a file.
  paths.save_npz(path, **flat)


def load_params(path: str | os.PathLike) -> tuple[Params, str]:
  """Reads `save_params`'s file: `(params, train_images_sha256)`."""
  flat = paths.load_npz(path)
  sha = str(flat.pop(_SHA_KEY, ""))
  params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  return params, sha


def _matches_model(params: Params) -> bool:
  expected = jax.eval_shape(MnistClassifier().init, jax.random.PRNGKey(0),
                            jnp.zeros((1, *IMAGE_SHAPE)))["params"]
  exp_flat = traverse_util.flatten_dict(expected)
  got_flat = traverse_util.flatten_dict(params)
  return (exp_flat.keys() == got_flat.keys()
          and all(exp_flat[k].shape == np.shape(got_flat[k]) for k in exp_flat))


def load_checked(path: str | os.PathLike) -> Params:
  """`save_params`'s file, checked to hold parameters of this architecture; ValueError if not."""
  try:
    params, _ = load_params(path)
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"cannot read MNIST classifier weights {path}: {e}") from e
  if not _matches_model(params):
    raise ValueError(f"{path} does not hold MnistClassifier parameters of this version "
                     "(retrain: python -m score_jax.eval.mnist_classifier --manual_dir=...)")
  return params


def load_or_train(manual_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None
                  ) -> Params:
  """The project's MNIST classifier: loaded from the cache, else trained and cached.

  The cache is `<cache_dir or $SCORE_JAX_CACHE or ~/.cache/score_jax>/mnist_classifier_v1.npz`.
  It is reused only when it holds the sha256 of `manual_dir`'s training images file and
  parameters of the current architecture; otherwise the classifier is retrained (seed 0,
  `train_classifier`'s defaults) from the official files in `manual_dir` and the cache rewritten.

  Args:
    manual_dir: folder with the official MNIST idx `.gz` files.
    cache_dir: where the cache file lives (default above).

  Returns:
    The classifier's parameters.
  """
  train_file = paths.as_path(manual_dir) / _TRAIN_IMAGES_FILE
  if not train_file.is_file():
    raise ValueError(f"manual_dir={manual_dir} lacks {_TRAIN_IMAGES_FILE} (the official MNIST "
                     "files train the classifier)")
  sha = _file_sha256(train_file)
  path = default_params_path(cache_dir)
  if path.is_file():
    try:
      params, cached_sha = load_params(path)
    except (OSError, ValueError, KeyError):
      params, cached_sha = None, ""
    if cached_sha == sha and params is not None and _matches_model(params):
      return params
  images, labels = image_data.load_mnist_raw(manual_dir, "train")
  params = train_classifier(images, labels)
  save_params(path, params, sha)
  return params


def main(argv: list[str] | None = None) -> int:
  """CLI: trains (or finds cached) the classifier, prints its file and test accuracy."""
  parser = argparse.ArgumentParser(prog="python -m score_jax.eval.mnist_classifier",
                                   description="Train the MNIST classifier of the eval features "
                                   "and cache its weights.")
  parser.add_argument("--helpfull", action="help", help="the same as --help")
  parser.add_argument("--manual_dir", required=True,
                      help="folder with the official MNIST idx .gz files")
  parser.add_argument("--cache_dir", default=None,
                      help="where to write mnist_classifier_v1.npz (default: $SCORE_JAX_CACHE, "
                      "else ~/.cache/score_jax)")
  args = parser.parse_args(argv)
  try:
    params = load_or_train(args.manual_dir, cache_dir=args.cache_dir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"MNIST classifier weights: {default_params_path(args.cache_dir)}")
  try:
    images, labels = image_data.load_mnist_raw(args.manual_dir, "test")
  except (OSError, ValueError):
    return 0
  print(f"test accuracy: {accuracy(params, images, labels):.4f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
