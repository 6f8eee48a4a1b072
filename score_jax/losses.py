"""Score-matching objectives over a ladder of noise levels: DSM, sliced SM, explicit SM.

Every loss takes a score function (never params or configs) and returns `(loss, metrics)`:
`metrics["loss"]` is the scalar, `metrics["level_loss_sum"]` `[L]` the sum of the per-example
losses at each level (or sigma bin) and `metrics["level_count"]` `[L]` how many examples drew it,
so that a logging interval's per-level mean is an exact sum/count.

Randomness: `rng` is one key (the batch's draws come from it) or a batch of per-example keys `[b]`
(each example draws its level and noise from its own key only). The trainer passes keys folded
from each example's global index, which makes the loss independent of how the batch is split
over devices. Levels may be given (`sigma_idx`) for batch-coupled (stratified) sampling.

DSM (Vincent 2011; Song & Ermon 2019, Eq. 5-6): per example
  l = 0.5 * w(sigma) * sum_d (s(x + sigma z, sigma) + z / sigma)_d^2,
the loss is the batch mean (reduction of the reference implementations N1/N2, `anneal_power` 2).
The weighting w is NCSN's sigma^power ("ncsn") or EDM's ("edm", Karras et al. 2022, Eq. 8 and
Table 1): EDM weights the denoiser's error ||D(x~) - x||^2 by lambda(sigma) = (sigma^2 +
sigma_data^2) / (sigma sigma_data)^2, and D - x = sigma^2 (s + z / sigma), so in the score's
terms w = sigma^4 lambda(sigma) = sigma^2 (sigma^2 + sigma_data^2) / sigma_data^2. (With EDM's
preconditioning that makes the loss 0.5 ||F - F_target||^2, unit weight on the network's output.)

Noise levels: a level index per example on the ladder `sigmas` (NCSN, NCSNv2), or, with a
continuous `noise.NoiseDistribution`, a sigma per example drawn from it (score_sde's log-uniform,
EDM's log-normal); then the per-level metrics are per sigma bin, bin i the sigmas nearest level i
of `sigmas` in log space (`noise.sigma_bins`).
SSM (Song et al. 2019) and explicit SM (Hyvarinen 2005) on the perturbed data equal DSM up to a
constant independent of the model (they estimate the same Fisher divergence), with the same
sigma^power weighting and reduction.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from score_jax import noise as noise_lib
from score_jax.score import ScoreFn, broadcast_sigma

Metrics = dict[str, jax.Array]


def _is_key_batch(rng: jax.Array, b: int) -> bool:
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.ndim == 1 and rng.shape[0] == b
  return rng.ndim == 2 and rng.shape == (b, 2)


WEIGHTINGS = ("ncsn", "edm")


def loss_weight(sigma: Float[Array, "b"], *, weighting: str = "ncsn", weight_power: float = 2.0,
                sigma_data: float = 0.5) -> Float[Array, "b"]:
  """w(sigma) of `0.5 w ||s - target||^2`: NCSN's sigma^power or EDM's (module docstring)."""
  if weighting == "ncsn":
    return sigma ** weight_power
  if weighting == "edm":
    return sigma ** 2 * (sigma ** 2 + sigma_data ** 2) / sigma_data ** 2
  raise ValueError(f"loss weighting {weighting!r} is unknown; use one of {WEIGHTINGS}")


def _draw(rng: jax.Array, x: jax.Array, sigmas: jax.Array, sigma_idx,
          distribution: noise_lib.NoiseDistribution | None, extra_shapes=()):
  """Per-example sigma `[b]` and its level or bin `[b]`, Gaussian noise like x, and extra
  standard draws, from one or per-example keys. A ladder draws level indices, a continuous
  `distribution` the sigmas themselves, from the same key."""
  b = x.shape[0]
  num_scales = sigmas.shape[0]
  continuous = distribution is not None and distribution.continuous
  if continuous and sigma_idx is not None:
    raise ValueError("sigma_idx gives ladder levels; a continuous noise distribution draws sigma")

  def level_or_sigma(key, shape):
    if continuous:
      return distribution.sample(key, shape)
    return jax.random.randint(key, shape, 0, num_scales, dtype=jnp.int32)

  if _is_key_batch(rng, b):
    def one(key):
      lk, nk, ek = jax.random.split(key, 3)
      level = level_or_sigma(lk, ())
      z = jax.random.normal(nk, x.shape[1:], x.dtype)
      extras = [jax.random.normal(k, s, x.dtype)
                for k, s in zip(jax.random.split(ek, max(len(extra_shapes), 1)), extra_shapes)]
      return level, z, extras
    levels, z, extras = jax.vmap(one)(rng)
  else:
    lk, nk, ek = jax.random.split(rng, 3)
    levels = level_or_sigma(lk, (b,))
    z = jax.random.normal(nk, x.shape, x.dtype)
    extras = [jax.random.normal(k, (b, *s), x.dtype)
              for k, s in zip(jax.random.split(ek, max(len(extra_shapes), 1)), extra_shapes)]
  if continuous:
    return levels, noise_lib.sigma_bins(levels, sigmas), z, extras
  if sigma_idx is not None:
    levels = jnp.asarray(sigma_idx, jnp.int32)
  return sigmas[levels], levels, z, extras


def _level_metrics(per_example: jax.Array, sigma_idx: jax.Array, num_scales: int) -> Metrics:
  return {
      "level_loss_sum": jax.ops.segment_sum(per_example, sigma_idx, num_segments=num_scales),
      "level_count": jax.ops.segment_sum(jnp.ones_like(per_example), sigma_idx,
                                         num_segments=num_scales),
  }


def _check_levels(x, sigmas):
  if sigmas.ndim != 1:
    raise ValueError(f"sigmas must be 1-D [L], got shape {sigmas.shape}")
  if x.ndim < 2:
    raise ValueError(f"x must be batched [b, ...], got shape {x.shape}")


def dsm_loss_from_noise(score_fn: ScoreFn, x: Float[Array, "b ..."], sigmas: Float[Array, "L"],
                        sigma_idx: Int[Array, "b"], noise: Float[Array, "b ..."], *,
                        weight_power: float = 2.0, sigma: Float[Array, "b"] | None = None,
                        weighting: str = "ncsn", sigma_data: float = 0.5
                        ) -> tuple[jax.Array, Metrics]:
  """Deterministic DSM core for given levels and noise; also returns the perturbed input.

  `sigma` `[b]`, if given, is each example's noise level and `sigma_idx` its bin in `sigmas`
  (continuous noise); otherwise sigma = sigmas[sigma_idx].
  """
  sigmas = jnp.asarray(sigmas)
  _check_levels(x, sigmas)
  if sigma is None:
    sigma = sigmas[sigma_idx]
  x_tilde = noise_lib.perturb(x, sigma, noise)
  score = score_fn(x_tilde, sigma)
  target = -noise / broadcast_sigma(sigma, noise)
  sq = jnp.sum(((score - target) ** 2).reshape(x.shape[0], -1), axis=1)
  per_example = 0.5 * sq * loss_weight(sigma, weighting=weighting, weight_power=weight_power,
                                       sigma_data=sigma_data)
  loss = jnp.mean(per_example)
  metrics = {"loss": loss, **_level_metrics(per_example, sigma_idx, sigmas.shape[0]),
             "x_tilde": x_tilde, "score": score, "sigma": sigma}
  return loss, metrics


def dsm_loss(score_fn: ScoreFn, x: Float[Array, "b ..."], sigmas: Float[Array, "L"],
             rng: jax.Array, *, sigma_idx: Int[Array, "b"] | None = None,
             level_sampling: str = "uniform", weight_power: float = 2.0,
             distribution: noise_lib.NoiseDistribution | None = None, weighting: str = "ncsn",
             sigma_data: float = 0.5, internals: bool = False) -> tuple[jax.Array, Metrics]:
  """Denoising score matching over the ladder or a continuous noise distribution.

  Args:
    score_fn: `(x, sigma) -> score`.
    x: clean data `[b, ...]`.
    sigmas: descending ladder `[L]` (the levels drawn, or the metric bins of continuous noise).
    rng: one key, or per-example keys `[b]`.
    sigma_idx: optional given levels `[b]` (then `level_sampling` is not used).
    level_sampling: uniform | stratified | antithetic (batch-coupled methods need a single key).
    weight_power: the "ncsn" weighting's lambda(sigma) = sigma^weight_power.
    distribution: how sigma is drawn; None or kind "ladder": a level of `sigmas`.
    weighting: "ncsn" or "edm" (module docstring).
    sigma_data: the data's standard deviation in EDM's weighting.
    internals: also return "x_tilde", "score" (like x), "sigma" and "sigma_idx" `[b]` in the
      metrics (the adversarial step denoises from the same forward pass).

  Returns:
    `(loss, metrics)` with "loss", "level_loss_sum" `[L]`, "level_count" `[L]`.
  """
  sigmas = jnp.asarray(sigmas)
  _check_levels(x, sigmas)
  continuous = distribution is not None and distribution.continuous
  if continuous and level_sampling != "uniform":
    raise ValueError(f"level_sampling={level_sampling!r} draws ladder levels; a continuous noise "
                     "distribution needs 'uniform'")
  if sigma_idx is None and level_sampling != "uniform":
    if _is_key_batch(rng, x.shape[0]):
      raise ValueError(f"level_sampling={level_sampling!r} couples the batch: pass one key, or "
                       "compute sigma_idx with noise.sample_levels and pass it")
    level_rng, rng = jax.random.split(rng)
    sigma_idx = noise_lib.sample_levels(level_rng, x.shape[0], sigmas.shape[0], level_sampling)
  sigma, levels, z, _ = _draw(rng, x, sigmas, sigma_idx, distribution)
  loss, metrics = dsm_loss_from_noise(score_fn, x, sigmas, levels, z, weight_power=weight_power,
                                      sigma=sigma, weighting=weighting, sigma_data=sigma_data)
  if internals:
    return loss, dict(metrics, sigma_idx=levels)
  return loss, _public(metrics)


def _public(metrics: Metrics) -> Metrics:
  return {k: v for k, v in metrics.items() if k in ("loss", "level_loss_sum", "level_count")}


def ssm_loss(score_fn: ScoreFn, x: Float[Array, "b ..."], sigmas: Float[Array, "L"],
             rng: jax.Array, *, projection: str = "gaussian", num_projections: int = 1,
             weight_power: float = 2.0, sigma_idx: Int[Array, "b"] | None = None,
             distribution: noise_lib.NoiseDistribution | None = None, weighting: str = "ncsn",
             sigma_data: float = 0.5) -> tuple[jax.Array, Metrics]:
  """Sliced score matching (variance-reduced form) on perturbed data.

  Per example: sigma^power * [0.5 ||s||^2 + mean_v v^T (ds/dx~) v], projections v Gaussian or
  Rademacher. v^T J v is computed in reverse mode as v . (J^T v), one vjp per projection after
  a single forward pass, as the reference implementation does (autograd.grad of v . s w.r.t.
  x~). It also works through the fast CPU convolutions and pooling (score_jax/cpu/), which have
  both reverse- and forward-mode rules.
  """
  if projection not in ("gaussian", "rademacher"):
    raise ValueError(f"projection={projection!r} must be 'gaussian' or 'rademacher'")
  if num_projections < 1:
    raise ValueError(f"num_projections={num_projections} must be >= 1")
  sigmas = jnp.asarray(sigmas)
  _check_levels(x, sigmas)
  sigma, levels, z, (v,) = _draw(rng, x, sigmas, sigma_idx, distribution,
                                 extra_shapes=((num_projections, *x.shape[1:]),))
  if projection == "rademacher":
    v = jnp.sign(v)
  x_tilde = noise_lib.perturb(x, sigma, z)
  f = lambda y: score_fn(y, sigma)
  score, vjp_fn = jax.vjp(f, x_tilde)
  b = x.shape[0]
  trace_est = sum(jnp.sum((v[:, k] * vjp_fn(v[:, k])[0]).reshape(b, -1), axis=1)
                  for k in range(num_projections)) / num_projections
  per_example = (0.5 * jnp.sum((score ** 2).reshape(b, -1), axis=1) + trace_est) * \
      loss_weight(sigma, weighting=weighting, weight_power=weight_power, sigma_data=sigma_data)
  loss = jnp.mean(per_example)
  return loss, {"loss": loss, **_level_metrics(per_example, levels, sigmas.shape[0])}


def explicit_score_matching_loss(score_fn: ScoreFn, x: Float[Array, "b d"],
                                 sigmas: Float[Array, "L"], rng: jax.Array, *,
                                 weight_power: float = 2.0,
                                 sigma_idx: Int[Array, "b"] | None = None,
                                 distribution: noise_lib.NoiseDistribution | None = None,
                                 weighting: str = "ncsn", sigma_data: float = 0.5
                                 ) -> tuple[jax.Array, Metrics]:
  """Hyvarinen's objective with the exact Jacobian trace (jacfwd), for low-dimensional data.

  Per example: sigma^power * [0.5 ||s(x~)||^2 + tr(d s / d x~)].
  """
  sigmas = jnp.asarray(sigmas)
  _check_levels(x, sigmas)
  if x.ndim != 2:
    raise ValueError(f"explicit score matching needs flat data [b, d], got shape {x.shape}")
  sigma, levels, z, _ = _draw(rng, x, sigmas, sigma_idx, distribution)
  x_tilde = noise_lib.perturb(x, sigma, z)

  def one(xi, si):
    f = lambda y: score_fn(y[None], si[None])[0]
    return f(xi), jnp.trace(jax.jacfwd(f)(xi))

  score, trace = jax.vmap(one)(x_tilde, sigma)
  per_example = (0.5 * jnp.sum(score ** 2, axis=1) + trace) * loss_weight(
      sigma, weighting=weighting, weight_power=weight_power, sigma_data=sigma_data)
  loss = jnp.mean(per_example)
  return loss, {"loss": loss, **_level_metrics(per_example, levels, sigmas.shape[0])}

