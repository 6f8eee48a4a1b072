"""Sample-quality metrics on feature arrays: FID, KID and Inception Score.

Pure functions of feature (or logit) arrays; which network makes the features is not their
business (see `score_jax.eval.feature_nets` and `score_jax.eval.evaluators`).

* Frechet distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to
  a Local Nash Equilibrium", Eq. 6): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), computed as
  pytorch-fid (mseitzer/pytorch-fid, `fid_score.calculate_frechet_distance`) does: float64 stats
  with the unbiased covariance of `np.cov`, `scipy.linalg.sqrtm(S1 @ S2)`, eps I added to both
  covariances when that square root is not finite, and a negligible imaginary part dropped.
* Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", Section 4): the
  unbiased MMD^2 estimate with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged
  over random subsets of equal size, as torch-fidelity (`metric_kid.py`) computes it.
* Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs", Section 4):
  exp(E_x KL(p(y|x) || p(y))) over `splits` consecutive parts, as the original TensorFlow code
  (openai/improved-gan, `inception_score/model.py`) computes it, with a softmax over all 1008
  outputs of the Inception graph (its 1000 ImageNet classes plus 8 unused ones), not 1000.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import scipy.linalg
from jaxtyping import Array, Float


def feature_stats(features: Float[np.ndarray, "n d"]) -> tuple[np.ndarray, np.ndarray]:
  """Mean and unbiased covariance of features, in float64 (pytorch-fid's statistics).

  Args:
    features: `[n, d]` feature vectors, n >= 2.

  Returns:
    `(mu [d], sigma [d, d])`.
  """
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"feature_stats needs features [n >= 2, d], got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
  # scipy >= 1.16 deprecates `disp` and warns on singular input; pytorch-fid checks finiteness.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return scipy.linalg.sqrtm(a)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Frechet distance: sqrtm(sigma1 @ sigma2) has an imaginary component of "
                       f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are too degenerate "
                       "(use more samples)")
    covmean = covmean.real
  return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  # S1 S2 is similar to S1^{1/2} S2 S1^{1/2}, which is symmetric PSD: same eigenvalues, so
  # tr (S1 S2)^{1/2} = sum sqrt(eig(S1^{1/2} S2 S1^{1/2})), with no complex arithmetic.
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  inner = root1 @ sigma2 @ root1
  eig = np.linalg.eigvalsh((inner + inner.T) / 2)
  return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     *, eps: float = 1e-6, method: str = "sqrtm") -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID on Inception stats).

  Args:
    mu1, mu2: means `[d]`.
    sigma1, sigma2: covariances `[d, d]`.
    eps: added to both diagonals when sqrtm(sigma1 @ sigma2) is not finite ("sqrtm" only).
    method: "sqrtm": pytorch-fid's `scipy.linalg.sqrtm(sigma1 @ sigma2)` (the published FID
      protocol); "eigh": the same trace through the symmetric matrix
      sigma1^{1/2} sigma2 sigma1^{1/2}, about 10x faster for d = 2048 and free of complex parts.

  Returns:
    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}).

  Raises:
    ValueError: shapes disagree, or (sqrtm) the square root has a non-negligible imaginary part.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"Frechet distance: mismatched stats mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}")
  if method == "sqrtm":
    tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
  elif method == "eigh":
    tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
  else:
    raise ValueError(f"Frechet distance: method={method!r} is unknown; use 'sqrtm' or 'eigh'")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of equal-size sets with k(a, b) = (a.b / d + 1)^3 (torch-fidelity's mmd2)."""
  m, d = x.shape
  k_xx = (x @ x.T / d + 1.0) ** 3
  k_yy = (y @ y.T / d + 1.0) ** 3
  k_xy = (x @ y.T / d + 1.0) ** 3
  sum_xx = k_xx.sum() - np.trace(k_xx)
  sum_yy = k_yy.sum() - np.trace(k_yy)
  return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


# Examples per KID subset (Binkowski et al. 2018 and torch-fidelity use 1000).
KID_SUBSET_SIZE = 1000


def kernel_inception_distance(features1: Float[np.ndarray, "n d"],
                              features2: Float[np.ndarray, "m d"], *, rng: jax.Array,
                              num_subsets: int = 100, subset_size: int = KID_SUBSET_SIZE
                              ) -> tuple[float, float]:
  """KID: mean and std over random subsets of the unbiased polynomial-kernel MMD^2.

  Args:
    features1, features2: `[n, d]` and `[m, d]` features (e.g. Inception pool3).
    rng: key choosing the subsets (each drawn without replacement, independently per subset).
    num_subsets: number of subset pairs.
    subset_size: examples per subset; clipped to min(n, m) (torch-fidelity raises instead).

  Returns:
    `(mean, std)` of the `num_subsets` MMD^2 estimates (std with ddof 0, as torch-fidelity).
  """
  f1 = np.asarray(features1, np.float64)
  f2 = np.asarray(features2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f"KID needs features [n, d] and [m, d], got {f1.shape} and {f2.shape}")
  size = min(subset_size, len(f1), len(f2))
  if size < 2:
    raise ValueError(f"KID needs at least 2 examples per set, got {len(f1)} and {len(f2)}")
  rng1, rng2 = jax.random.split(rng)
  pick = lambda key, n: jax.random.permutation(key, n)[:size]
  idx1 = np.asarray(jax.vmap(pick, in_axes=(0, None))(jax.random.split(rng1, num_subsets),
                                                       len(f1)))
  idx2 = np.asarray(jax.vmap(pick, in_axes=(0, None))(jax.random.split(rng2, num_subsets),
                                                       len(f2)))
  mmds = np.array([_polynomial_mmd2(f1[i], f2[j]) for i, j in zip(idx1, idx2)])
  return float(mmds.mean()), float(mmds.std())


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(logits: Float[np.ndarray | Array, "n k"], *, splits: int = 10
                    ) -> tuple[float, float]:
  """Inception Score: mean and std over `splits` parts of exp(E_x KL(p(y|x) || p(y))).

  Args:
    logits: `[n, k]` classifier logits; for the FID Inception graph k = 1008 and the softmax runs
      over all of them, as the original TF code did.
    splits: consecutive parts of (about) n / splits examples, each with its own marginal p(y).

  Returns:
    `(mean, std)` of the per-split scores (std with ddof 0, as the original code).
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) < splits:
    raise ValueError(f"inception_score needs logits [n >= splits={splits}, k], got "
                     f"{logits.shape}")
  log_p = _log_softmax(logits)
  p = np.exp(log_p)
  n = len(logits)
  scores = []
  for i in range(splits):
    part = slice(i * n // splits, (i + 1) * n // splits)
    part_p, part_log_p = p[part], log_p[part]
    # 0 log 0 = 0: classes whose probability underflowed contribute nothing (and no nan).
    with np.errstate(divide="ignore", invalid="ignore"):
      log_marginal = np.log(part_p.mean(axis=0, keepdims=True))
      kl = np.where(part_p > 0, part_p * (part_log_p - log_marginal), 0.0).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))
