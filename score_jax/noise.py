"""Noise ladders, level sampling, perturbation and the schedule-design rules of NCSNv2.

Ladders are descending `sigma_1 > ... > sigma_L` (index 0 is the largest level), as in the
reference implementations: geometric `exp(linspace(log sigma_1, log sigma_L, L))`, linear, or
EDM's rho-schedule (Karras et al. 2022, Eq. 5).

Continuous training levels (`NoiseDistribution`): besides a level index per example on the ladder
(NCSN, NCSNv2), sigma may be drawn log-uniformly between sigma_min and sigma_max (the continuous
VE SDE of Song et al. 2021, score_sde `sde_lib.VESDE`: sigma(t) = sigma_min (sigma_max /
sigma_min)^t, t ~ U[0, 1]) or log-normally, ln sigma ~ N(P_mean, P_std^2) (EDM, Karras et al.
2022, Table 1 and Sec. 5). Their losses are logged per sigma bin: the bins of a ladder are the
intervals in log sigma around its levels (`sigma_bins`).

Schedule design follows Song & Ermon 2020 ("Improved Techniques for Training Score-Based
Generative Models"):
* Technique 1: sigma_1 as large as the maximum pairwise Euclidean distance of the data.
* Technique 2: a geometric ratio gamma = sigma_{i-1}/sigma_i with
  Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) ~ C (C = 0.5).
* Technique 4: the step size epsilon for which the one-Gaussian variance recursion of ALS ends
  with s_T^2 / sigma_i^2 ~ 1 (Eq. 10 of the paper, with the reference-code step convention
  alpha_i = epsilon * sigma_i^2 / sigma_L^2).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from scipy import optimize, stats

LEVEL_SAMPLING = ("uniform", "stratified", "antithetic")


def _check_ladder_args(sigma_max: float, sigma_min: float, num_scales: int) -> None:
  if not sigma_min > 0:
    raise ValueError(f"sigma_min={sigma_min} must be > 0")
  if not sigma_max > sigma_min:
    raise ValueError(f"sigma_max={sigma_max} must be > sigma_min={sigma_min}")
  if int(num_scales) < 2:
    raise ValueError(f"num_scales={num_scales} must be >= 2")


def geometric_sigmas(sigma_max: float, sigma_min: float, num_scales: int) -> Float[Array, "L"]:
  """Descending geometric ladder from `sigma_max` to `sigma_min` with `num_scales` levels."""
  _check_ladder_args(sigma_max, sigma_min, num_scales)
  return jnp.asarray(np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), int(num_scales))),
                     jnp.float32)


def karras_sigmas(sigma_max: float, sigma_min: float, num_steps: int,
                  rho: float = 7.0) -> Float[Array, "N"]:
  """EDM's rho-schedule (Karras et al. 2022, Eq. 5), descending, without the final zero.

  sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for
  i = 0..N-1: sigma_0 = sigma_max, sigma_{N-1} = sigma_min. rho = 7 is EDM's choice; rho = 1 is
  linear and rho -> inf geometric. The ODE samplers that end at sigma = 0 append the zero
  themselves.
  """
  _check_ladder_args(sigma_max, sigma_min, num_steps)
  if not rho > 0:
    raise ValueError(f"rho={rho} must be > 0")
  ramp = np.linspace(0.0, 1.0, int(num_steps))
  hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
  return jnp.asarray((hi + ramp * (lo - hi)) ** rho, jnp.float32)


def linear_sigmas(sigma_max: float, sigma_min: float, num_scales: int) -> Float[Array, "L"]:
  """Descending evenly spaced ladder (NCSNv2's `sigma_dist: uniform`)."""
  _check_ladder_args(sigma_max, sigma_min, num_scales)
  return jnp.asarray(np.linspace(sigma_max, sigma_min, int(num_scales)), jnp.float32)


SCHEDULES = ("geometric", "linear")


def ladder(schedule: str, sigma_max: float, sigma_min: float, num_scales: int
           ) -> Float[Array, "L"]:
  """The descending training ladder of a `schedule` ("geometric" or "linear")."""
  if schedule == "geometric":
    return geometric_sigmas(sigma_max, sigma_min, num_scales)
  if schedule == "linear":
    return linear_sigmas(sigma_max, sigma_min, num_scales)
  raise ValueError(f"noise.schedule={schedule!r} is unknown; use one of {SCHEDULES}")


def validate_sigmas(sigmas) -> np.ndarray:
  """Host check: a 1-D, positive, strictly descending ladder; returns it as numpy."""
  s = np.asarray(sigmas, np.float64)
  if s.ndim != 1 or s.size < 1:
    raise ValueError(f"sigmas must be a 1-D array of noise levels, got shape {s.shape}")
  if not np.all(s > 0):
    raise ValueError(f"sigmas must be > 0; got min {s.min():.4g}")
  if s.size > 1 and not np.all(np.diff(s) < 0):
    raise ValueError("sigmas must be strictly descending (sigma_1 > ... > sigma_L); "
                     f"got {s[:4].tolist()}...")
  return s


def sample_levels(rng: jax.Array, num: int, num_scales: int,
                  method: str = "uniform") -> Int[Array, "n"]:
  """Level indices in [0, num_scales) for `num` examples.

  uniform: i.i.d. uniform. stratified: one shared uniform offset u, level floor((k + u) L / n)
  for example k, then a random permutation (every level appears n/L times up to rounding).
  antithetic: the second half mirrors the first (i and L - 1 - i).
  """
  if method == "uniform":
    return jax.random.randint(rng, (num,), 0, num_scales, dtype=jnp.int32)
  if method == "stratified":
    offset_rng, perm_rng = jax.random.split(rng)
    u = jax.random.uniform(offset_rng)
    levels = jnp.floor((jnp.arange(num) + u) * num_scales / num).astype(jnp.int32)
    return jax.random.permutation(perm_rng, jnp.clip(levels, 0, num_scales - 1))
  if method == "antithetic":
    half = jax.random.randint(rng, ((num + 1) // 2,), 0, num_scales, dtype=jnp.int32)
    return jnp.concatenate([half, num_scales - 1 - half])[:num]
  raise ValueError(f"level sampling method={method!r} is unknown; use one of {LEVEL_SAMPLING}")


NOISE_DISTRIBUTIONS = ("ladder", "log_uniform", "log_normal")


@dataclasses.dataclass(frozen=True)
class NoiseDistribution:
  """How a training example's noise level is drawn.

  Attributes:
    kind: "ladder" (a level index, uniform over the ladder, as NCSN), "log_uniform" (ln sigma
      uniform on [ln sigma_min, ln sigma_max]) or "log_normal" (ln sigma ~ N(p_mean, p_std^2)).
    sigma_min, sigma_max: the ends of "log_uniform".
    p_mean, p_std: the parameters of "log_normal" (EDM: -1.2, 1.2).
  """
  kind: str = "ladder"
  sigma_min: float | None = None
  sigma_max: float | None = None
  p_mean: float = -1.2
  p_std: float = 1.2

  def __post_init__(self):
    if self.kind not in NOISE_DISTRIBUTIONS:
      raise ValueError(f"noise distribution {self.kind!r} is unknown; use one of "
                       f"{NOISE_DISTRIBUTIONS}")
    if self.kind == "log_uniform":
      if self.sigma_min is None or self.sigma_max is None:
        raise ValueError("the log_uniform noise distribution needs sigma_min and sigma_max")
      _check_ladder_args(self.sigma_max, self.sigma_min, 2)
    if self.kind == "log_normal" and not self.p_std > 0:
      raise ValueError(f"p_std={self.p_std} must be > 0")

  @property
  def continuous(self) -> bool:
    return self.kind != "ladder"

  def sample(self, rng: jax.Array, shape: tuple[int, ...] = ()) -> Float[Array, "..."]:
    """Noise levels of `shape` (continuous kinds only; a ladder draws indices, `sample_levels`)."""
    if self.kind == "log_uniform":
      lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
      return jnp.exp(jax.random.uniform(rng, shape, jnp.float32, lo, hi))
    if self.kind == "log_normal":
      return jnp.exp(self.p_mean + self.p_std * jax.random.normal(rng, shape, jnp.float32))
    raise ValueError("a ladder draws level indices (noise.sample_levels), not sigmas")


def sigma_bins(sigma: Float[Array, "b"], sigmas: Float[Array, "L"]) -> Int[Array, "b"]:
  """The index of the ladder level nearest each `sigma` in log space (bins for metrics).

  Bin i holds the sigmas between the geometric means of level i and its neighbours; sigmas above
  sigma_1 fall in bin 0 and below sigma_L in bin L - 1. A ladder's own levels are their own bins.
  """
  log_ladder = jnp.log(jnp.asarray(sigmas, jnp.float32))
  edges = 0.5 * (log_ladder[:-1] + log_ladder[1:])  # descending
  # searchsorted needs ascending edges: count the edges above log sigma.
  return jnp.sum(jnp.log(sigma)[:, None] < edges[None], axis=1).astype(jnp.int32)


def perturb(x: Float[Array, "b ..."], sigma: Float[Array, "b"],
            noise: Float[Array, "b ..."]) -> Float[Array, "b ..."]:
  """x + sigma * noise with per-example sigma."""
  return x + sigma.reshape(sigma.shape + (1,) * (x.ndim - 1)) * noise


# --------------------------------------------------------------------------------------------
# Schedule design (host-side numbers).


def sigma_max_from_data(x, chunk: int = 1024) -> float:
  """Technique 1: the maximum pairwise Euclidean distance of the rows of `x` ([n, ...])."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  if len(x) < 2:
    raise ValueError(f"x must hold at least 2 examples, got {len(x)}")
  sq = np.sum(x * x, axis=1)
  best = 0.0
  for i in range(0, len(x), chunk):
    a = x[i:i + chunk]
    d2 = sq[i:i + chunk, None] + sq[None, :] - 2.0 * a @ x.T
    best = max(best, float(d2.max()))
  return math.sqrt(max(best, 0.0))


def ratio_condition(gamma: float, dim: int) -> float:
  """Technique 2's left side: Phi(sqrt(2D)(g-1) + 3g) - Phi(sqrt(2D)(g-1) - 3g)."""
  a = math.sqrt(2.0 * dim) * (gamma - 1.0)
  return float(stats.norm.cdf(a + 3.0 * gamma) - stats.norm.cdf(a - 3.0 * gamma))


def num_scales_from_ratio(sigma_max: float, sigma_min: float, dim: int, c: float = 0.5) -> int:
  """Technique 2: the number of geometric levels whose ratio gamma meets the condition = c.

  Solves ratio_condition(gamma, D) = c for gamma > 1 (the condition decreases in gamma), then
  L = ceil(log(sigma_max / sigma_min) / log(gamma)) + 1 levels, rounded up so that the actual
  ratio is no larger than gamma.
  """
  _check_ladder_args(sigma_max, sigma_min, 2)
  if not 0.0 < c < 1.0:
    raise ValueError(f"c={c} must be in (0, 1)")
  if dim < 1:
    raise ValueError(f"dim={dim} must be >= 1")
  hi = 2.0
  while ratio_condition(hi, dim) > c:
    hi *= 2.0
  gamma = optimize.brentq(lambda g: ratio_condition(g, dim) - c, 1.0 + 1e-12, hi, xtol=1e-14)
  return int(math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma))) + 1


def als_variance_ratio(step_lr: float, sigma_min: float, gamma: float, steps_per_sigma: int,
                       sigma_i: float = 1.0) -> float:
  """s_T^2 / sigma_i^2 after T ALS steps at level i for data that are a single point.

  The reference-code step alpha_i = step_lr sigma_i^2 / sigma_L^2 applied to N(0, s^2) with the
  exact score of N(0, sigma_i^2) gives s_{t+1}^2 = (1 - alpha/sigma_i^2)^2 s_t^2 + 2 alpha,
  started from s_0^2 = sigma_{i-1}^2 = gamma^2 sigma_i^2 (NCSNv2 paper, Eq. 10). The ratio does
  not depend on i.
  """
  ratio = step_lr / sigma_min ** 2  # alpha_i / sigma_i^2
  a = (1.0 - ratio) ** 2
  t = int(steps_per_sigma)
  return a ** t * (gamma ** 2 - 2.0 * ratio / (1.0 - a)) + 2.0 * ratio / (1.0 - a) if a != 1.0 \
      else gamma ** 2 + 2.0 * ratio * t


def step_lr_from_variance_recursion(sigma_min: float, gamma: float, steps_per_sigma: int,
                                    target: float = 1.0) -> float:
  """Technique 4: the step_lr (reference convention) making s_T^2 / sigma_i^2 closest to target.

  The recursion's fixed point is 2 / (2 - step_lr / sigma_L^2) > 1, so the ratio cannot equal 1
  exactly: as in the paper, step_lr minimizes |s_T^2 / sigma_i^2 - target| (searched in log
  space over (0, sigma_L^2)).

  Args:
    sigma_min: sigma_L, the smallest level.
    gamma: the ladder's ratio sigma_{i-1} / sigma_i (> 1).
    steps_per_sigma: T, Langevin steps per level.
    target: desired s_T^2 / sigma_i^2 (1 in the paper).
  """
  if not gamma > 1.0:
    raise ValueError(f"gamma={gamma} must be > 1 (ratio of consecutive levels)")
  if steps_per_sigma < 1:
    raise ValueError(f"steps_per_sigma={steps_per_sigma} must be >= 1")
  if not sigma_min > 0:
    raise ValueError(f"sigma_min={sigma_min} must be > 0")
  objective = lambda log_lr: (als_variance_ratio(math.exp(log_lr), sigma_min, gamma,
                                                 steps_per_sigma) - target) ** 2
  lo, hi = math.log(1e-12 * sigma_min ** 2), math.log(0.999 * sigma_min ** 2)
  grid = np.linspace(lo, hi, 2001)
  k = int(np.argmin([objective(g) for g in grid]))
  res = optimize.minimize_scalar(objective, bounds=(grid[max(k - 1, 0)], grid[min(k + 1, 2000)]),
                                 method="bounded", options={"xatol": 1e-10})
  return float(math.exp(res.x))


def cas_step_lr_interval(sigmas) -> tuple[float, float]:
  """(low, high) with gamma = sigma_L / sigma_{L-1}: sigma_L^2 (1 - gamma), sigma_L^2 (1 + gamma)."""
  s = validate_sigmas(sigmas)
  if s.size < 2:
    raise ValueError("CAS needs at least 2 noise levels")
  gamma = s[-1] / s[-2]
  return float(s[-1] ** 2 * (1.0 - gamma)), float(s[-1] ** 2 * (1.0 + gamma))


def check_cas_step_lr(sigmas, step_lr: float) -> None:
  """ValueError unless sigma_L^2 (1 - gamma) < step_lr < sigma_L^2 (1 + gamma) (CAS feasibility).

  Outside the interval beta = sqrt(1 - ((1 - eta) / gamma)^2) is not real.
  """
  low, high = cas_step_lr_interval(sigmas)
  if not low < step_lr < high:
    raise ValueError(f"CAS step_lr={step_lr:.4g} is infeasible for this ladder: it must lie in "
                     f"({low:.4g}, {high:.4g}) = sigma_L^2 (1 -/+ gamma)")
