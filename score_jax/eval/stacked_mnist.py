"""StackedMNIST: three MNIST digits as the R, G, B channels of one image, 1000 modes.

Metz et al. 2017, "Unrolled Generative Adversarial Networks", stack three random MNIST digits into
the colour channels of a 28x28x3 image; the triple of digits is one of 10^3 = 1000 modes.
Srivastava et al. 2017 (VEEGAN) and Lin et al. 2018 (PacGAN) measure mode collapse on it by
classifying each channel of generated samples with a pretrained MNIST classifier and reporting

* the number of modes covered (modes with at least one sample), and
* KL(p_hat || uniform), the KL divergence between the generated mode distribution p_hat (mode
  counts / number of samples) and the uniform distribution over the 1000 modes,
  sum_{m : p_hat(m) > 0} p_hat(m) log(1000 p_hat(m)); 0 log 0 = 0, so a sample set collapsed on
  one mode scores log(1000) = 6.91, the largest value.

Jolicoeur-Martineau et al. 2020 ("Adversarial score matching and improved sampling for image
generation"; AC `runners/stackedmnist_runner.py`, `compute_score`) evaluate score-based models
with this recipe. Two differences from AC: the dataset draws its digits independently and
uniformly with replacement (AC/IVGAN zip three shuffled copies of the MNIST training set, so each
digit appears once per channel), and the classifier is this project's
`score_jax.eval.mnist_classifier` (AC uses the PyTorch MNIST example net, as PacGAN).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Array, Float, Int, UInt8

from score_jax.eval import mnist_classifier

NUM_MODES = 1000
_CHANNEL_WEIGHTS = np.array([100, 10, 1])


def make_stacked_mnist(images_uint8: UInt8[np.ndarray, "n 28 28"], labels: Int[np.ndarray, "n"],
                       num: int, seed: int
                       ) -> tuple[UInt8[np.ndarray, "num 28 28 3"], Int[np.ndarray, "num"]]:
  """Draws `num` StackedMNIST images, each channel an independent uniformly drawn digit.

  Args:
    images_uint8: `[n, 28, 28]` uint8 MNIST digits.
    labels: `[n]` their classes 0..9.
    num: number of stacked images.
    seed: numpy seed of the draws.

  Returns:
    `(x [num, 28, 28, 3] uint8, mode [num] int64)`, with channels (R, G, B) and
    mode = 100 * d_r + 10 * d_g + d_b.
  """
  images_uint8 = np.asarray(images_uint8)
  labels = np.asarray(labels)
  if images_uint8.ndim != 3 or labels.shape != images_uint8.shape[:1]:
    raise ValueError(f"make_stacked_mnist needs images [n, h, w] and labels [n], got "
                     f"{images_uint8.shape} and {labels.shape}")
  if images_uint8.dtype != np.uint8:
    raise ValueError(f"make_stacked_mnist needs uint8 digits, got {images_uint8.dtype}")
  if len(labels) == 0 or num < 0:
    raise ValueError(f"make_stacked_mnist needs digits to draw from and num >= 0 (got "
                     f"{len(labels)} digits, num={num})")
  if labels.min() < 0 or labels.max() > 9:
    raise ValueError(f"labels must be digits 0..9, got values in [{labels.min()}, {labels.max()}]")
  idx = np.random.default_rng(seed).integers(0, len(labels), size=(num, 3))
  x = np.moveaxis(images_uint8[idx], 1, -1)
  mode = labels[idx].astype(np.int64) @ _CHANNEL_WEIGHTS
  return np.ascontiguousarray(x), mode


def classify_modes(samples: Float[np.ndarray | Array, "n 28 28 3"],
                   classifier_params: mnist_classifier.Params) -> Int[np.ndarray, "n"]:
  """The mode 100 c_r + 10 c_g + c_b of each sample, c the classifier's digit per channel.

  Args:
    samples: `[n, 28, 28, 3]` float images in [0, 1].
    classifier_params: `score_jax.eval.mnist_classifier` parameters.

  Returns:
    `[n]` int64 modes in 0..999.
  """
  samples = np.asarray(samples)
  if samples.ndim != 4 or samples.shape[1:] != (28, 28, 3):
    raise ValueError(f"StackedMNIST samples must be [n, 28, 28, 3], got {samples.shape}")
  n = len(samples)
  # Channels become separate grayscale digits: [n, 28, 28, 3] -> [n * 3, 28, 28, 1], R G B per
  # sample in order.
  digits = np.moveaxis(samples, -1, 1).reshape(n * 3, 28, 28, 1)
  classes = mnist_classifier.predict(classifier_params, digits).reshape(n, 3)
  return classes.astype(np.int64) @ _CHANNEL_WEIGHTS


def mode_statistics(modes: Int[np.ndarray, "n"]) -> dict:
  """Modes covered and KL(p_hat || uniform over 1000) of a set of modes (see module docstring).

  Args:
    modes: `[n]` modes in 0..999, n >= 1.

  Returns:
    `{"modes_covered": int, "kl_to_uniform": float, "mode_histogram": int64 [1000]}`.
  """
  modes = np.asarray(modes)
  if modes.ndim != 1 or len(modes) == 0:
    raise ValueError(f"mode_statistics needs modes [n >= 1], got shape {modes.shape}")
  if modes.min() < 0 or modes.max() >= NUM_MODES:
    raise ValueError(f"modes must lie in 0..{NUM_MODES - 1}, got [{modes.min()}, {modes.max()}]")
  histogram = np.bincount(modes, minlength=NUM_MODES).astype(np.int64)
  p = histogram[histogram > 0] / len(modes)
  kl = float(np.sum(p * np.log(p * NUM_MODES)))
  return {"modes_covered": int(np.count_nonzero(histogram)), "kl_to_uniform": kl,
          "mode_histogram": histogram}


def count_modes(samples: Float[np.ndarray | Array, "n 28 28 3"],
                classifier_params: mnist_classifier.Params) -> dict:
  """StackedMNIST mode coverage of samples: `mode_statistics(classify_modes(samples, params))`.

  Args:
    samples: `[n, 28, 28, 3]` float images in [0, 1] (uint8 data: divide by 255).
    classifier_params: `score_jax.eval.mnist_classifier` parameters (`load_or_train`).

  Returns:
    `{"modes_covered": int, "kl_to_uniform": float, "mode_histogram": int64 [1000]}`.
  """
  return mode_statistics(classify_modes(samples, classifier_params))
