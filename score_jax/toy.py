"""Toy distributions with exact perturbed scores, sample-only 2-D datasets, and toy metrics.

Exact distributions (isotropic Gaussian, point mass, Gaussian mixtures in any dimension) offer
`sample(rng, n)`, `log_prob(x, sigma)` and `score(x, sigma)` of the data convolved with
N(0, sigma^2 I): a component N(m, s^2 I) becomes N(m, (s^2 + sigma^2) I), so every score is exact.
Named constructors: the two-mode mixture of the NCSN paper (Song & Ermon 2019, Section 3:
1/5 N((-5,-5), I) + 4/5 N((5,5), I)), a 1-D mixture, 8 and 25 Gaussians. Sample-only 2-D
benchmarks: swiss roll, two moons, checkerboard.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def _sigma_col(sigma, x):
  sigma = jnp.asarray(sigma, jnp.float32)
  return sigma[..., None] if sigma.ndim else sigma


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """sum_k w_k N(mean_k, std_k^2 I) in `dim` dimensions (std_k may be 0: point masses)."""
  weights: tuple[float, ...]
  means: tuple[tuple[float, ...], ...]
  stds: tuple[float, ...]

  def __post_init__(self):
    w = np.asarray(self.weights, np.float64)
    if w.ndim != 1 or np.any(w < 0) or not np.isclose(w.sum(), 1.0):
      raise ValueError(f"weights={self.weights} must be non-negative and sum to 1")
    if np.asarray(self.means).shape[0] != w.size or len(self.stds) != w.size:
      raise ValueError("weights, means and stds must have one entry per component")

  @property
  def dim(self) -> int:
    return int(np.asarray(self.means).shape[1])

  def _arrays(self):
    return (jnp.asarray(self.weights, jnp.float32), jnp.asarray(self.means, jnp.float32),
            jnp.asarray(self.stds, jnp.float32))

  def sample(self, rng: jax.Array, n: int) -> Float[Array, "n d"]:
    w, m, s = self._arrays()
    k_rng, z_rng = jax.random.split(rng)
    k = jax.random.categorical(k_rng, jnp.log(w), shape=(n,))
    return m[k] + s[k][:, None] * jax.random.normal(z_rng, (n, self.dim))

  def _component_logits(self, x, sigma):
    w, m, s = self._arrays()
    var = s[None, :] ** 2 + _sigma_col(sigma, x) ** 2  # [b or 1, K]
    d2 = jnp.sum((x[:, None, :] - m[None]) ** 2, axis=-1)  # [b, K]
    return (jnp.log(w)[None] - 0.5 * d2 / var - 0.5 * self.dim * jnp.log(2 * math.pi * var)), var

  def log_prob(self, x: Float[Array, "b d"], sigma) -> Float[Array, "b"]:
    logits, _ = self._component_logits(x, sigma)
    return jax.nn.logsumexp(logits, axis=-1)

  def score(self, x: Float[Array, "b d"], sigma) -> Float[Array, "b d"]:
    logits, var = self._component_logits(x, sigma)
    resp = jax.nn.softmax(logits, axis=-1)  # posterior over components
    _, m, _ = self._arrays()
    per = (m[None] - x[:, None, :]) / var[..., None]
    return jnp.sum(resp[..., None] * per, axis=1)


def Gaussian(mean, std: float) -> GaussianMixture:
  """Isotropic N(mean, std^2 I)."""
  return GaussianMixture((1.0,), (tuple(float(v) for v in np.ravel(mean)),), (float(std),))


def PointMass(loc) -> GaussianMixture:
  """A point mass at `loc` (its perturbed density is N(loc, sigma^2 I))."""
  return GaussianMixture((1.0,), (tuple(float(v) for v in np.ravel(loc)),), (0.0,))


def ncsn_mixture() -> GaussianMixture:
  """Song & Ermon 2019, Section 3: 1/5 N((-5,-5), I) + 4/5 N((5,5), I)."""
  return GaussianMixture((0.2, 0.8), ((-5.0, -5.0), (5.0, 5.0)), (1.0, 1.0))


def mixture_1d() -> GaussianMixture:
  """1-D mixture 0.7 N(-2, 0.5^2) + 0.3 N(3, 0.5^2).

  Two well separated, unequal modes: the shape of the 1-D examples of the score-matching
  tutorials (plain Langevin gets the weights wrong, annealing gets them right).
  """
  return GaussianMixture((0.7, 0.3), ((-2.0,), (3.0,)), (0.5, 0.5))


def eight_gaussians(radius: float = 2.0, std: float = 0.02 ** 0.5) -> GaussianMixture:
  angles = np.arange(8) * np.pi / 4
  means = tuple((radius * math.cos(a), radius * math.sin(a)) for a in angles)
  return GaussianMixture(tuple([1 / 8] * 8), means, tuple([std] * 8))


def twenty_five_gaussians(std: float = 0.05) -> GaussianMixture:
  means = tuple((float(i), float(j)) for i in range(-2, 3) for j in range(-2, 3))
  return GaussianMixture(tuple([1 / 25] * 25), means, tuple([std] * 25))


@dataclasses.dataclass(frozen=True)
class SampleOnly:
  """A 2-D dataset known only through samples."""
  name: str
  sampler: Callable[[jax.Array, int], jax.Array]
  dim: int = 2

  def sample(self, rng: jax.Array, n: int) -> Float[Array, "n 2"]:
    return self.sampler(rng, n)


def _swiss_roll(rng, n):
  t_rng, z_rng = jax.random.split(rng)
  t = 1.5 * jnp.pi * (1 + 2 * jax.random.uniform(t_rng, (n,)))
  x = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], axis=1) / 5.0
  return x + 0.1 * jax.random.normal(z_rng, (n, 2))


def _two_moons(rng, n):
  t_rng, side_rng, z_rng = jax.random.split(rng, 3)
  t = jnp.pi * jax.random.uniform(t_rng, (n,))
  upper = jax.random.bernoulli(side_rng, 0.5, (n,))
  x = jnp.where(upper[:, None], jnp.stack([jnp.cos(t), jnp.sin(t)], 1),
                jnp.stack([1 - jnp.cos(t), 0.5 - jnp.sin(t)], 1))
  return 2.0 * (x - jnp.array([0.5, 0.25])) + 0.1 * jax.random.normal(z_rng, (n, 2))


def _checkerboard(rng, n):
  a_rng, b_rng, c_rng = jax.random.split(rng, 3)
  x1 = 4 * jax.random.uniform(a_rng, (n,)) - 2
  x2_ = jax.random.uniform(b_rng, (n,)) - jax.random.randint(c_rng, (n,), 0, 2) * 2.0
  x2 = x2_ + (jnp.floor(x1) % 2)
  return jnp.stack([x1, x2], axis=1) * 2.0


DATASETS: dict[str, Callable[[int], object]] = {
    "ncsn_mixture": lambda dim: ncsn_mixture(),
    "mixture_1d": lambda dim: mixture_1d(),
    "gaussian": lambda dim: Gaussian(np.zeros(dim), 1.0),
    "point_mass": lambda dim: PointMass(np.zeros(dim)),
    "eight_gaussians": lambda dim: eight_gaussians(),
    "twenty_five_gaussians": lambda dim: twenty_five_gaussians(),
    "swiss_roll": lambda dim: SampleOnly("swiss_roll", _swiss_roll),
    "two_moons": lambda dim: SampleOnly("two_moons", _two_moons),
    "checkerboard": lambda dim: SampleOnly("checkerboard", _checkerboard),
}


def get_toy(name: str, dim: int = 2):
  """The toy distribution `name` (dim is used by gaussian and point_mass only)."""
  if name not in DATASETS:
    raise ValueError(f"toy dataset {name!r} is unknown; use one of {sorted(DATASETS)}")
  return DATASETS[name](dim)


# --------------------------------------------------------------------------------------------
# Sample-quality metrics.


def mode_weights(x, means) -> np.ndarray:
  """Fraction of samples nearest to each mode (non-finite samples count for none)."""
  x = np.asarray(x, np.float64)
  means = np.asarray(means, np.float64)
  x = x[np.isfinite(x).all(axis=1)]
  nearest = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
  return np.bincount(nearest, minlength=len(means)) / max(len(x), 1)


def _pairwise_sq(a, b):
  return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0.0)


def mmd_rbf(x, y, bandwidths=(0.1, 0.5, 1.0, 2.0, 5.0)) -> float:
  """Unbiased squared MMD with a sum of RBF kernels exp(-d^2 / (2 h^2))."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  x = x[np.isfinite(x).all(axis=1)]
  total = 0.0
  dxx, dyy, dxy = _pairwise_sq(x, x), _pairwise_sq(y, y), _pairwise_sq(x, y)
  n, m = len(x), len(y)
  for h in bandwidths:
    kxx, kyy, kxy = (np.exp(-d / (2 * h * h)) for d in (dxx, dyy, dxy))
    total += ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) +
              (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
  return float(total)


def energy_distance(x, y) -> float:
  """2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely), with V-statistics."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  x = x[np.isfinite(x).all(axis=1)]
  d = lambda a, b: np.sqrt(_pairwise_sq(a, b)).mean()
  return float(2 * d(x, y) - d(x, x) - d(y, y))


def gaussian_moment_errors(x, mean, std) -> dict[str, float]:
  """Largest absolute errors of the sample mean and per-dimension std against N(mean, std^2 I)."""
  x = np.asarray(x, np.float64)
  return {"mean_error": float(np.abs(x.mean(0) - np.asarray(mean)).max()),
          "std_error": float(np.abs(x.std(0) - std).max())}


def mode_moments(x, means) -> tuple[np.ndarray, np.ndarray]:
  """Per-mode mean `[K, d]` and per-coordinate variance `[K, d]` of the samples nearest each mode.

  Non-finite samples are dropped; a mode no sample is nearest to gets NaN.
  """
  x = np.asarray(x, np.float64)
  means = np.asarray(means, np.float64)
  x = x[np.isfinite(x).all(axis=1)]
  nearest = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
  mu = np.full(means.shape, np.nan)
  var = np.full(means.shape, np.nan)
  for k in range(len(means)):
    xk = x[nearest == k]
    if len(xk) > 1:
      mu[k], var[k] = xk.mean(0), xk.var(0, ddof=1)
  return mu, var


def sample_metrics(samples: np.ndarray, distribution: GaussianMixture, rng: jax.Array
                   ) -> dict[str, Any]:
  """Sample-quality metrics of a toy: MMD, energy distance, and for mixtures the mode weights.

  For mixtures also each mode's mean and per-coordinate variance (samples assigned to the nearest
  mean) beside the component's own (`true_mode_means`, `true_mode_vars` = std_k^2; the nearest-mean
  split matches the components when the modes are well separated), and the largest errors:
  `mode_weight_error` (absolute), `mode_mean_error` (absolute, any coordinate) and
  `mode_var_rel_error` (|var / std_k^2 - 1|, modes with std_k > 0 only).
  """
  reference = np.asarray(distribution.sample(rng, min(len(samples), 4000)))
  x = samples[:4000]
  out = {"mmd_rbf": float(mmd_rbf(x, reference)),
         "energy_distance": float(energy_distance(x, reference)),
         "finite_fraction": float(np.isfinite(samples).all(axis=1).mean())}
  means = getattr(distribution, "means", None)
  if means is not None:
    out["mode_weights"] = np.asarray(mode_weights(samples, np.asarray(means))).tolist()
    out["true_mode_weights"] = np.asarray(distribution.weights).tolist()
    mu, var = mode_moments(samples, means)
    true_var = np.broadcast_to((np.asarray(distribution.stds, np.float64) ** 2)[:, None], var.shape)
    out.update(mode_means=mu.tolist(), mode_vars=var.tolist(),
               true_mode_means=np.asarray(means, np.float64).tolist(),
               true_mode_vars=true_var.tolist())
    out["mode_weight_error"] = float(np.max(np.abs(np.asarray(out["mode_weights"]) -
                                                   np.asarray(distribution.weights))))
    out["mode_mean_error"] = float(np.max(np.abs(mu - np.asarray(means))))
    positive = true_var > 0
    out["mode_var_rel_error"] = (float(np.max(np.abs(var[positive] / true_var[positive] - 1.0)))
                                 if positive.any() else None)
  return out
