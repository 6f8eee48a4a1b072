"""Log-density, bits per dimension, encoding and decoding through the probability-flow ODE.

For the variance-exploding perturbation x_sigma = x + sigma z the probability-flow ODE in sigma is
dx/dsigma = -sigma s(x, sigma) (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", Eq. 13 with g^2 = d sigma^2 / dt; Karras et al. 2022, Eq. 1),
and along a solution d log p_sigma(x(sigma)) / dsigma = -div(dx/dsigma) = sigma div s (the
instantaneous change of variables, Chen et al. 2018, Theorem 1), so

  log p_{sigma_min}(x) = log N(x(sigma_max); 0, sigma_max^2 I)
                         - integral_{sigma_min}^{sigma_max} sigma div s(x(sigma), sigma) dsigma,

with the prior N(0, sigma_max^2 I) standing in for p_{sigma_max} (the convention of k-diffusion's
`sampling.log_likelihood`). What is measured is therefore the density of the data convolved with
N(0, sigma_min^2 I), with a prior error that vanishes as sigma_max grows.

The span sigma_min..sigma_max is geometric (often four or more decades), so the ODE is solved in
t = log sigma: dx/dt = -sigma^2 s(x, sigma) and d(integral)/dt = sigma^2 div s, with the
adaptive Dormand-Prince solver of `score_jax.ode` and per-example step control (a batch gives the
values of its examples solved one by one). The divergence is exact (`trace="exact"`, one JVP per
dimension per evaluation: small dimensions only) or the Hutchinson-Skilling estimate v^T (ds/dx) v
with Rademacher or Gaussian probes v (Hutchinson 1989; Skilling 1989; Grathwohl et al. 2019,
FFJORD), one VJP per probe per evaluation, each probe held fixed along the solve.

Bits per dimension follow score_sde's `likelihood.py` and its conversion: 8-bit images in [0, 1]
are dequantized as y = (255 x + u) / 256 with u ~ U[0, 1)^D, and bpd = (-log p(y) / D + log 256) /
log 2, averaged over dequantization repeats.

Examples must not interact inside `score_fn` (no batch statistics): the divergence of a batch is
computed with batched JVPs/VJPs that rely on it.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from score_jax import ode
from score_jax.score import ScoreFn, broadcast_sigma

TRACES = ("exact", "rademacher", "gaussian")

PriorLogp = Callable[[Float[Array, "b ..."]], Float[Array, "b"]]


def _concrete(v) -> float | None:
  try:
    return float(v)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
    return None


def _check_sigmas(sigma_min, sigma_max) -> None:
  lo, hi = _concrete(sigma_min), _concrete(sigma_max)
  if lo is not None and not lo > 0:
    raise ValueError(f"sigma_min={lo} must be > 0 (the ODE runs in log sigma)")
  if lo is not None and hi is not None and not hi > lo:
    raise ValueError(f"sigma_max={hi} must be > sigma_min={lo}")


def _check_tols(rtol, atol) -> None:
  for name, v in (("rtol", rtol), ("atol", atol)):
    c = _concrete(v)
    if c is not None and not c > 0:
      raise ValueError(f"{name}={c} must be > 0")


def _check_x(x) -> None:
  if x.ndim < 2:
    raise ValueError(f"x must be a batch [b, ...] with at least one data axis; got shape "
                     f"{tuple(x.shape)} (add a leading batch axis: x[None])")


def _is_key_batch(rng, b: int) -> bool:
  """True if `rng` holds one key per example, False if it is a single key."""
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  single_ndim = 0 if typed else 1
  if rng.ndim == single_ndim:
    return False
  if rng.ndim == single_ndim + 1 and rng.shape[0] == b:
    return True
  raise ValueError(f"rng must be one key or one key per example ({b}); got shape "
                   f"{tuple(rng.shape)}")


def example_keys(rng: PRNGKeyArray, b: int) -> PRNGKeyArray:
  """One key per example: `rng` itself if it already holds `b` keys, else `split(rng, b)`.

  Pass per-example keys (e.g. `jax.random.fold_in(seed_key, global_index)` for each example)
  to make results independent of how a caller batches or shards the examples.
  """
  return rng if _is_key_batch(rng, b) else jax.random.split(rng, b)


def gaussian_prior_logp(z: Float[Array, "b ..."], sigma_max) -> Float[Array, "b"]:
  """log N(z; 0, sigma_max^2 I) per example."""
  d = math.prod(z.shape[1:])
  sq = jnp.sum(z.reshape(z.shape[0], -1).astype(jnp.float32) ** 2, axis=1)
  return -0.5 * sq / sigma_max ** 2 - 0.5 * d * jnp.log(2 * math.pi * sigma_max ** 2)


def _drift(score_fn: ScoreFn, t, x):
  sigma = jnp.exp(t)
  return -broadcast_sigma(sigma, x) ** 2 * score_fn(x, sigma)


@functools.partial(jax.jit, static_argnames=("score_fn", "max_steps"))
def _solve_x(score_fn, x, t0, t1, rtol, atol, max_steps):
  return ode.dopri5(lambda t, y: _drift(score_fn, t, y), x, t0, t1, rtol=rtol, atol=atol,
                    max_steps=max_steps)


def encode(score_fn: ScoreFn, x: Float[Array, "b ..."], *, sigma_min: float, sigma_max: float,
           rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096,
           return_stats: bool = False):
  """Maps x (data at noise sigma_min) to its latent at sigma_max along the probability-flow ODE.

  Args:
    score_fn: `(x [b, ...], sigma [b]) -> score`.
    x: `[b, ...]` data, read as a sample of the data convolved with N(0, sigma_min^2 I).
    sigma_min: noise level of `x`.
    sigma_max: noise level of the latent.
    rtol: relative tolerance of the solver (in x; the solver's time is log sigma).
    atol: absolute tolerance of the solver.
    max_steps: attempted solver steps allowed per example.
    return_stats: also return the solver's `ode.SolveStats`.

  Returns:
    The latent `z` `[b, ...]` (and the stats if `return_stats`).
  """
  _check_x(x)
  _check_sigmas(sigma_min, sigma_max)
  _check_tols(rtol, atol)
  z, stats = _solve_x(score_fn, x, jnp.log(sigma_min), jnp.log(sigma_max), rtol, atol, max_steps)
  return (z, stats) if return_stats else z


def decode(score_fn: ScoreFn, z: Float[Array, "b ..."], *, sigma_min: float, sigma_max: float,
           rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096,
           return_stats: bool = False):
  """Maps a latent at sigma_max back to data at sigma_min (the inverse of `encode`).

  With `z ~ N(0, sigma_max^2 I)` this is the deterministic probability-flow sampler; between two
  encoded latents it gives interpolations.

  Args:
    score_fn: `(x [b, ...], sigma [b]) -> score`.
    z: `[b, ...]` latents at noise sigma_max.
    sigma_min: noise level of the output.
    sigma_max: noise level of `z`.
    rtol: relative tolerance of the solver.
    atol: absolute tolerance of the solver.
    max_steps: attempted solver steps allowed per example.
    return_stats: also return the solver's `ode.SolveStats`.

  Returns:
    `x` `[b, ...]` (and the stats if `return_stats`).
  """
  _check_x(z)
  _check_sigmas(sigma_min, sigma_max)
  _check_tols(rtol, atol)
  x, stats = _solve_x(score_fn, z, jnp.log(sigma_max), jnp.log(sigma_min), rtol, atol, max_steps)
  return (x, stats) if return_stats else x


def _exact_divergence(score_fn, x, sigma):
  """Score and its exact divergence `[b, 1]`: one JVP per data dimension, batched over examples."""
  score, jvp_fn = jax.linearize(lambda y: score_fn(y, sigma), x)
  d = math.prod(x.shape[1:])
  basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
  basis = jnp.broadcast_to(basis, (d,) + x.shape)
  cols = jax.vmap(jvp_fn)(basis).reshape(d, x.shape[0], d)  # [i, b, :] = J e_i
  return score, jnp.trace(cols, axis1=0, axis2=2)[:, None]


def _hutchinson_divergence(score_fn, x, sigma, probes):
  """Score and the per-probe estimates v^T (ds/dx) v `[b, P]` (one VJP per probe)."""
  score, vjp_fn = jax.vjp(lambda y: score_fn(y, sigma), x)
  (vjps,) = jax.vmap(vjp_fn)(probes)  # [P, b, ...]
  est = jnp.sum((vjps * probes).reshape(probes.shape[0], x.shape[0], -1), axis=-1)
  return score, est.T


def _draw_probes(keys, shape, trace: str, num_probes: int, dtype):
  def one(key):
    if trace == "rademacher":
      return jax.random.rademacher(key, (num_probes,) + shape, dtype)
    return jax.random.normal(key, (num_probes,) + shape, dtype)
  return jnp.swapaxes(jax.vmap(one)(keys), 0, 1)  # [P, b, ...]


def log_prob(score_fn: ScoreFn, x: Float[Array, "b ..."], rng: PRNGKeyArray | None = None, *,
             sigma_min: float, sigma_max: float, trace: str = "exact", num_probes: int = 1,
             rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096,
             prior_logp: PriorLogp | None = None) -> tuple[Float[Array, "b"], dict[str, Any]]:
  """log p_{sigma_min}(x): the log-density of the data convolved with N(0, sigma_min^2 I).

  Solves the probability-flow ODE from sigma_min to sigma_max (in t = log sigma) together with
  the integral of sigma div s, and adds the prior's log-density of the latent (module docstring).

  Args:
    score_fn: `(x [b, ...], sigma [b]) -> score`; examples must not interact.
    x: `[b, ...]` points at which to evaluate the density.
    rng: a key, or one key per example `[b]` (results then do not depend on the batching); used
      for the Hutchinson probes only (may be None for `trace="exact"`).
    sigma_min: the noise level whose density is measured (> 0).
    sigma_max: the noise level of the latent and the prior.
    trace: "exact" (D JVPs per evaluation; small D), "rademacher" or "gaussian" (Hutchinson).
    num_probes: Hutchinson probes per example, each integrated separately along the same
      trajectory; with 2 or more the spread of their estimates gives a standard error.
    rtol: relative tolerance of the solver (on x and on the integral).
    atol: absolute tolerance of the solver.
    max_steps: attempted solver steps allowed per example.
    prior_logp: `z [b, ...] -> [b]`, the log-density at sigma_max; default N(0, sigma_max^2 I).
      A toy with a known marginal can pass it to remove the prior error.

  Returns:
    `(logp, info)`: `logp` `[b]` in nats, and `info` with (all per example, `[b]` unless noted)
    "z" `[b, ...]` the latent at sigma_max; "prior_logp"; "delta_logp" (= -integral, so logp =
    prior_logp + delta_logp); "logp_probes" `[b, P]` one estimate per probe (P = 1 for exact);
    "logp_se" the standard error of `logp` over probes (0 for "exact", NaN for one probe);
    "nfe" score evaluations while the example was integrating (each evaluation also costs
    num_probes VJPs, or D JVPs for "exact"); "num_steps" accepted steps; "success" False where
    the step budget ran out.
  """
  _check_x(x)
  _check_sigmas(sigma_min, sigma_max)
  _check_tols(rtol, atol)
  if trace not in TRACES:
    raise ValueError(f"trace={trace!r} is unknown; use one of {TRACES}")
  if int(num_probes) < 1:
    raise ValueError(f"num_probes={num_probes} must be >= 1")
  b = x.shape[0]
  if trace == "exact":
    num_probes = 1
    probes = None
  else:
    if rng is None:
      raise ValueError(f"trace={trace!r} draws random probes: pass rng (or use trace='exact')")
    probes = _draw_probes(example_keys(rng, b), x.shape[1:], trace, int(num_probes), x.dtype)
  return _log_prob(score_fn, x, probes, sigma_min, sigma_max, rtol, atol, max_steps=max_steps,
                   prior_logp=prior_logp)


@functools.partial(jax.jit, static_argnames=("score_fn", "max_steps", "prior_logp"))
def _log_prob(score_fn, x, probes, sigma_min, sigma_max, rtol, atol, *, max_steps, prior_logp):
  b = x.shape[0]
  num_probes = 1 if probes is None else probes.shape[0]

  def field(t, state):
    y, _ = state
    sigma = jnp.exp(t)
    if probes is None:
      score, div = _exact_divergence(score_fn, y, sigma)
    else:
      score, div = _hutchinson_divergence(score_fn, y, sigma, probes)
    s2 = broadcast_sigma(sigma, y) ** 2
    return -s2 * score, (sigma ** 2)[:, None] * div

  state0 = (x, jnp.zeros((b, num_probes), jnp.float32))
  (z, integral), stats = ode.dopri5(field, state0, jnp.log(sigma_min), jnp.log(sigma_max),
                                    rtol=rtol, atol=atol, max_steps=max_steps)
  prior = (gaussian_prior_logp(z, sigma_max) if prior_logp is None else prior_logp(z))
  logp_probes = prior[:, None] - integral
  logp = jnp.mean(logp_probes, axis=1)
  if probes is None:
    se = jnp.zeros((b,), jnp.float32)
  elif num_probes == 1:
    se = jnp.full((b,), jnp.nan, jnp.float32)
  else:
    se = jnp.std(logp_probes, axis=1, ddof=1) / math.sqrt(num_probes)
  info = {"z": z, "prior_logp": prior, "delta_logp": -jnp.mean(integral, axis=1),
          "logp_probes": logp_probes, "logp_se": se, "nfe": stats.nfe,
          "num_steps": stats.num_accepted, "success": stats.success}
  return logp, info


def dequantize(x: Float[Array, "b ..."], rng: PRNGKeyArray) -> Float[Array, "b ..."]:
  """Uniform dequantization of 8-bit data: (255 x + u) / 256 with u ~ U[0, 1) per element.

  Args:
    x: `[b, ...]` uint8 values, or floats in [0, 1] on the grid k / 255.
    rng: a key, or one key per example `[b]`.

  Returns:
    `[b, ...]` float32 in [0, 1).
  """
  k = x.astype(jnp.float32) if x.dtype == jnp.uint8 else jnp.round(x.astype(jnp.float32) * 255)
  keys = example_keys(rng, x.shape[0])
  u = jax.vmap(lambda key: jax.random.uniform(key, x.shape[1:], jnp.float32))(keys)
  return (k + u) / 256.0


def _check_images(x) -> None:
  if x.dtype == jnp.uint8:
    return
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be uint8 or float in [0, 1]; got dtype {x.dtype}")
  try:
    v = np.asarray(x)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return
  if v.size and (v.min() < 0 or v.max() > 1):
    raise ValueError(f"float x must lie in [0, 1] (8-bit images / 255); got range "
                     f"[{v.min():.4g}, {v.max():.4g}] (pass uint8, or rescale)")


def bits_per_dim(score_fn: ScoreFn, x: Float[Array, "b ..."], rng: PRNGKeyArray, *,
                 sigma_min: float, sigma_max: float, num_repeats: int = 1,
                 centered: bool = False, trace: str = "rademacher", num_probes: int = 1,
                 rtol: float = 1e-5, atol: float = 1e-5,
                 max_steps: int = 4096) -> tuple[Float[Array, "b"], dict[str, Any]]:
  """Bits per dimension of 8-bit images under the model at sigma_min, dequantized uniformly.

  For each repeat r the images are dequantized, y = (255 x + u_r) / 256, and
  bpd_r = (-log p_{sigma_min}(y) / D + log 256) / log 2 (score_sde's `likelihood.py` and its
  bits/dim conversion); the result is the mean over repeats. The density is that of the model's
  data convolved with N(0, sigma_min^2 I), which cannot read below `bpd_lower_bound`. A model of data in [-1, 1] (`centered`) sees 2y - 1,
  and log p(y) = log p(2y - 1) + D log 2.

  Pure and per example: jit- and vmap-able, and with per-example keys a caller may shard the
  batch axis over devices without changing any value (`jax.shard_map` with `check_vma=False`,
  as `parallel.batch_map` runs samplers: the solver's loop carries start from constants).

  Args:
    score_fn: `(x [b, ...], sigma [b]) -> score` of the model's data space.
    x: `[b, h, w, c]` (any data shape) uint8 images, or floats in [0, 1] on the grid k / 255.
    rng: a key, or one key per example `[b]`; repeat r of example i uses
      `fold_in(key_i, r)`, split into its dequantization and probe keys.
    sigma_min: the noise level whose density is measured.
    sigma_max: the noise level of the prior N(0, sigma_max^2 I).
    num_repeats: dequantization repeats averaged.
    centered: the model's data live in [-1, 1] instead of [0, 1].
    trace: divergence estimator of `log_prob`.
    num_probes: Hutchinson probes of `log_prob`.
    rtol: relative tolerance of the solver.
    atol: absolute tolerance of the solver.
    max_steps: attempted solver steps allowed per example and repeat.

  Returns:
    `(bpd, info)`: `bpd` `[b]`, and `info` with "bpd_repeats" `[r, b]`, "logp" `[r, b]`
    (nats, of the dequantized images in [0, 1]), "logp_se" `[r, b]`, "nfe" `[r, b]` and
    "success" `[r, b]`.
  """
  _check_x(x)
  _check_images(x)
  if int(num_repeats) < 1:
    raise ValueError(f"num_repeats={num_repeats} must be >= 1")
  if trace not in TRACES:
    raise ValueError(f"trace={trace!r} is unknown; use one of {TRACES}")
  _check_sigmas(sigma_min, sigma_max)
  _check_tols(rtol, atol)
  keys = example_keys(rng, x.shape[0])
  return _bits_per_dim(score_fn, x, keys, sigma_min, sigma_max, rtol, atol,
                       num_repeats=int(num_repeats), centered=bool(centered), trace=trace,
                       num_probes=int(num_probes), max_steps=int(max_steps))


def bpd_lower_bound(sigma_min: float, *, centered: bool = False) -> float:
  """The least bits/dim any density of the form q * N(0, sigma_min^2 I) can give (`bits_per_dim`).

  A Gaussian convolution is at most the Gaussian's peak, p(y) <= (2 pi sigma_min^2)^(-D/2), so
  bpd = -log2 p(y) / D + 8 >= 8 + log2(2 pi sigma_min^2) / 2 (8 bits: 256 bins on [0, 1]). A
  model of data in [-1, 1] (`centered`) smooths by sigma_min there, i.e. by sigma_min / 2 on
  [0, 1]: one bit less. The probability-flow density of a learned score need not be of this
  form and can read lower; a number below the bound is not the likelihood of the data smoothed
  at sigma_min.
  """
  scale = 2.0 if centered else 1.0
  return 8.0 + 0.5 * math.log2(2.0 * math.pi * (float(sigma_min) / scale) ** 2)


@functools.partial(jax.jit, static_argnames=("score_fn", "num_repeats", "centered", "trace",
                                             "num_probes", "max_steps"))
def _bits_per_dim(score_fn, x, keys, sigma_min, sigma_max, rtol, atol, *, num_repeats, centered,
                  trace, num_probes, max_steps):
  d = math.prod(x.shape[1:])

  def one_repeat(r):
    rep_keys = jax.vmap(lambda k: jax.random.fold_in(k, r))(keys)
    pair = jax.vmap(jax.random.split)(rep_keys)
    y = dequantize(x, pair[:, 0])
    y_model = 2.0 * y - 1.0 if centered else y
    logp, info = log_prob(score_fn, y_model, pair[:, 1], sigma_min=sigma_min,
                          sigma_max=sigma_max, trace=trace, num_probes=num_probes, rtol=rtol,
                          atol=atol, max_steps=max_steps)
    if centered:
      logp = logp + d * math.log(2.0)
    bpd = (-logp / d + math.log(256.0)) / math.log(2.0)
    return bpd, logp, info["logp_se"], info["nfe"], info["success"]

  bpd_r, logp_r, se_r, nfe_r, ok_r = jax.lax.map(one_repeat, jnp.arange(num_repeats))
  info = {"bpd_repeats": bpd_r, "logp": logp_r, "logp_se": se_r, "nfe": nfe_r,
          "success": ok_r}
  return jnp.mean(bpd_r, axis=0), info


__all__ = ["TRACES", "log_prob", "encode", "decode", "bits_per_dim", "bpd_lower_bound", "dequantize",
           "example_keys", "gaussian_prior_logp"]
