"""Samplers as pure `lax` programs: Langevin, ALS, CAS, the VE predictor-corrector, the
probability-flow ODE samplers Euler, Heun (EDM) and DPM-Solver++(2M), and the adaptive reverse-SDE
solver of "Gotta Go Fast".

All take a score function and an explicit `rng`, are jit- and vmap-able (step sizes may be traced,
e.g. vmapped over a grid), and compile into one XLA program whose size does not depend on the
number of levels or steps (scan, not unrolling). Host-side argument checks run when the values are
concrete.

Keys. `rng` is either one key (shape `()`): the noise of the whole batch is drawn at once at every
step (the fastest path), or one key per example (shape `[b]`): example i's noise at every step
comes only from `rng[i]` (the step counter is folded into it), so sample i's trajectory depends
only on `x_init[i]` and `rng[i]`, not on the batch size or the device count (the per-image seeds
of EDM, Karras et al. 2022). A sampler whose update couples examples (the predictor-corrector's
batch-mean step size) keeps that coupling in either mode.

Options shared by the annealed samplers:
* `denoise`: finish with the expected denoised sample x + sigma_L^2 s(x, sigma_L) (Tweedie).
* `mask`, `x_known`: inpainting. `mask` is 1 on known entries. Before every update the known
  entries are replaced by `x_known + sigma_i z` with fresh z (the NCSNv2 convention,
  ermongroup/ncsnv2 `models/__init__.py` `anneal_Langevin_dynamics_inpainting`; any mask, not
  only a half image); the output carries `x_known` exactly on known entries.
* `return_info` (every sampler): also return an info dict with "nfe", the number of score
  (network) evaluations per sample: an int for the fixed-step samplers (a 0-d array when
  returned from a jitted function), `[b]` for
  `adaptive`.
* `return_trajectory`: the info dict also holds per-level statistics `[L']` of the state entering
  each level: "sigma", "x_mean", "x_std", "score_norm" (batch mean of ||s||), "snr"
  (sqrt(alpha/2)||s||/||z||, as logged by NCSNv2), and "noise_std" = rms(sigma_i^2 s(x, sigma_i))
  = rms(x - denoised(x)), the noise level of x as seen by the score (exact for a point mass).
  Memory is O(L') scalars.
* `save_every=k`: the info dict also holds "samples" `[L' // k, b, ...]`, x after every k-th
  level, held in a preallocated buffer (memory does not grow with steps).
With any of the three the return value is `(x, info)`, else `x`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from score_jax import noise as noise_lib
from score_jax.score import ScoreFn, denoise

__all__ = ["langevin", "annealed_langevin", "consistent_annealed", "predictor_corrector",
           "denoise", "cas_ladder", "euler", "heun", "dpm_solver_pp_2m", "adaptive"]


def _concrete(v) -> float | None:
  try:
    return float(v)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
    return None


def _concrete_array(v) -> np.ndarray | None:
  try:
    return np.asarray(v)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def _check_common(x_init, sigmas, step_lr, name: str, mask, x_known) -> None:
  s = _concrete_array(sigmas)
  if s is not None:
    noise_lib.validate_sigmas(s)
  lr = _concrete(step_lr) if step_lr is not None else None
  if lr is not None and not lr > 0:
    raise ValueError(f"{name}={lr} must be > 0")
  if (mask is None) != (x_known is None):
    raise ValueError("inpainting needs both mask and x_known (or neither)")
  if mask is not None:
    if tuple(x_known.shape) != tuple(x_init.shape):
      raise ValueError(f"x_known shape {tuple(x_known.shape)} must equal x_init shape "
                       f"{tuple(x_init.shape)}")
    try:
      np.broadcast_shapes(tuple(mask.shape), tuple(x_init.shape))
      ok = len(mask.shape) <= len(x_init.shape)
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"mask shape {tuple(mask.shape)} does not broadcast to x shape "
                       f"{tuple(x_init.shape)}")


def _as_keys(rng, batch: int) -> jax.Array:
  """`rng` as typed keys: one key `()` or per-example keys `[b]` (raw uint32 keys are wrapped)."""
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    if rng.dtype != jnp.uint32 or rng.ndim not in (1, 2):
      raise ValueError(f"rng must be a key from jax.random.key (shape () or [b]); got dtype "
                       f"{rng.dtype}, shape {tuple(rng.shape)}")
    rng = jax.random.wrap_key_data(rng)
  if rng.ndim == 1 and rng.shape[0] != batch:
    raise ValueError(f"per-example rng has {rng.shape[0]} keys but x_init has {batch} examples; "
                     "pass one key or one key per example")
  if rng.ndim > 1:
    raise ValueError(f"rng must be one key (shape ()) or one key per example (shape [b]); got "
                     f"shape {tuple(rng.shape)}")
  return rng


def _step_inputs(rng: jax.Array, num_steps: int) -> jax.Array:
  """What a scan over `num_steps` noisy steps consumes: split keys for one key, else counters."""
  if rng.ndim == 0:
    return jax.random.split(rng, num_steps)
  return jnp.arange(num_steps, dtype=jnp.uint32)


def _normal(rng: jax.Array, step: jax.Array, like: jax.Array, stream: int = 0) -> jax.Array:
  """Standard normal noise shaped like `like` for one step (see the module docstring on keys).

  `step` is an element of `_step_inputs(rng, n)` (with per-example keys it may also be a `[b]`
  array of per-example counters); `stream` > 0 derives further independent draws at the same
  step (e.g. the inpainting noise).
  """
  if rng.ndim == 0:
    key = step if stream == 0 else jax.random.fold_in(step, stream)
    return jax.random.normal(key, like.shape, like.dtype)

  def one(key, step):
    key = jax.random.fold_in(key, step)
    if stream:
      key = jax.random.fold_in(key, stream)
    return jax.random.normal(key, like.shape[1:], like.dtype)

  return jax.vmap(one, in_axes=(0, 0 if jnp.ndim(step) else None))(rng, step)


def _rms(v: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(v.astype(jnp.float32) ** 2))


def _norms(v: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1).astype(jnp.float32) ** 2, axis=1))


def _level_stats(x, s, sigma, alpha, z) -> dict[str, jax.Array]:
  return {"sigma": sigma, "x_mean": jnp.mean(x), "x_std": jnp.std(x),
          "score_norm": jnp.mean(_norms(s)),
          "snr": jnp.mean(jnp.sqrt(alpha / 2.0) * _norms(s) / _norms(z)),
          "noise_std": _rms(sigma ** 2 * s)}


def _impose(x, mask, x_known, sigma, rng, step):
  if mask is None:
    return x
  noisy = x_known + sigma * _normal(rng, step, x, stream=1)
  return jnp.where(mask > 0, noisy, x)


def _finish(x, mask, x_known):
  return x if mask is None else jnp.where(mask > 0, x_known, x)


def _run_levels(level_fn: Callable, x: jax.Array, per_level: tuple, num_levels: int, *,
                return_trajectory: bool, save_every: int | None):
  """Scans `level_fn(x, inputs_i) -> (x, stats_i)` over levels; collects stats and snapshots."""
  if save_every is not None and not 1 <= int(save_every) <= num_levels:
    raise ValueError(f"save_every={save_every} must be in [1, {num_levels}] (levels)")
  n_saved = 0 if save_every is None else num_levels // int(save_every)
  if not (return_trajectory or n_saved):
    x, _ = jax.lax.scan(lambda x, inp: (level_fn(x, inp)[0], None), x, per_level)
    return x, {}
  buffer = jnp.zeros((n_saved, *x.shape), x.dtype) if n_saved else None
  index = jnp.arange(num_levels)

  def body(carry, inp):
    x, buf = carry
    i, rest = inp
    x, stats = level_fn(x, rest)
    if buf is not None:
      slot = (i + 1) // save_every - 1
      save = ((i + 1) % save_every == 0) & (slot < n_saved)
      updated = jax.lax.dynamic_update_index_in_dim(buf, x, jnp.clip(slot, 0, n_saved - 1), 0)
      buf = jnp.where(save, updated, buf)
    return (x, buf), (stats if return_trajectory else None)

  (x, buffer), stats = jax.lax.scan(body, (x, buffer), (index, per_level))
  aux = {}
  if return_trajectory:
    aux.update(stats)
  if n_saved:
    aux["samples"] = buffer
  return x, aux


def _output(x, info: dict, nfe, *, return_info: bool, return_trajectory: bool = False,
            save_every: int | None = None):
  """`x`, or `(x, info)` with info["nfe"] when any of the info options is on."""
  if return_info or return_trajectory or save_every is not None:
    return x, {**info, "nfe": nfe}
  return x


# --------------------------------------------------------------------------------------------


def langevin(score_fn: ScoreFn, x_init: Float[Array, "b ..."], rng: jax.Array, *,
             sigma: float | jax.Array, n_steps: int, step_size: float | jax.Array,
             return_info: bool = False) -> Any:
  """Plain (unadjusted) Langevin dynamics at one noise level: x <- x + a s + sqrt(2a) z.

  `score_fn` may ignore sigma (e.g. `jax.grad` of an unnormalized log posterior). NFE = n_steps.
  """
  a = _concrete(step_size)
  if a is not None and not a > 0:
    raise ValueError(f"step_size={a} must be > 0")
  if int(n_steps) < 1:
    raise ValueError(f"n_steps={n_steps} must be >= 1")
  rng = _as_keys(rng, x_init.shape[0])
  sig = jnp.full((x_init.shape[0],), sigma, jnp.float32)
  noise_scale = jnp.sqrt(2.0 * step_size)

  def step(x, step_in):
    z = _normal(rng, step_in, x)
    return x + step_size * score_fn(x, sig) + noise_scale * z, None

  x, _ = jax.lax.scan(step, x_init, _step_inputs(rng, int(n_steps)))
  return _output(x, {}, int(n_steps), return_info=return_info)


def annealed_langevin(score_fn: ScoreFn, x_init: Float[Array, "b ..."],
                      sigmas: Float[Array, "L"], rng: jax.Array, *,
                      step_lr: float | jax.Array, steps_per_sigma: int, denoise: bool = False,
                      mask: jax.Array | None = None, x_known: jax.Array | None = None,
                      return_info: bool = False, return_trajectory: bool = False,
                      save_every: int | None = None) -> Any:
  """Annealed Langevin sampling (Song & Ermon 2019, Algorithm 1), reference-code convention.

  For each level i (largest first), `steps_per_sigma` steps of
  x <- x + alpha_i s(x, sigma_i) + sqrt(2 alpha_i) z with alpha_i = step_lr (sigma_i / sigma_L)^2.
  This is the convention of the reference implementations (NCSN `anneal_runner.py`, NCSNv2
  `models/__init__.py`). Algorithm 1 of the NCSN paper writes a_i = epsilon sigma_i^2 / sigma_L^2
  and x <- x + (a_i / 2) s + sqrt(a_i) z, which is the same update with epsilon = 2 * step_lr.
  `denoise=True` ends with x + sigma_L^2 s(x, sigma_L) (NCSNv2).
  NFE = L * steps_per_sigma, plus 1 with `denoise`.
  """
  _check_common(x_init, sigmas, step_lr, "step_lr", mask, x_known)
  if int(steps_per_sigma) < 1:
    raise ValueError(f"steps_per_sigma={steps_per_sigma} must be >= 1")
  b = x_init.shape[0]
  rng = _as_keys(rng, b)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  num_levels, t = sigmas.shape[0], int(steps_per_sigma)
  sigma_min = sigmas[-1]
  steps = _step_inputs(rng, num_levels * t + 1)
  level_steps = steps[:-1].reshape(num_levels, t, *steps.shape[1:])

  def level_fn(x, inp):
    sigma, step_ins = inp
    alpha = step_lr * (sigma / sigma_min) ** 2
    noise_scale = jnp.sqrt(2.0 * alpha)
    sig_b = jnp.full((b,), sigma)

    def step(x, step_in):
      x = _impose(x, mask, x_known, sigma, rng, step_in)
      s = score_fn(x, sig_b)
      z = _normal(rng, step_in, x)
      stats = _level_stats(x, s, sigma, alpha, z) if return_trajectory else None
      return x + alpha * s + noise_scale * z, stats

    x, stats = jax.lax.scan(step, x, step_ins)
    first = jax.tree.map(lambda v: v[0], stats) if return_trajectory else None
    return x, first

  x, aux = _run_levels(level_fn, x_init, (sigmas, level_steps), num_levels,
                       return_trajectory=return_trajectory, save_every=save_every)
  if denoise:
    x = _impose(x, mask, x_known, sigma_min, rng, steps[-1])
    x = _denoise_fn(score_fn, x, sigma_min)
  return _output(_finish(x, mask, x_known), aux, num_levels * t + int(denoise),
                 return_info=return_info, return_trajectory=return_trajectory,
                 save_every=save_every)


def _denoise_fn(score_fn, x, sigma):
  return denoise(score_fn, x, jnp.full((x.shape[0],), sigma))


def cas_ladder(sigmas, n_sigma: int = 1) -> jax.Array:
  """The CAS sampling ladder: `sigmas`, or a geometric ladder with n_sigma levels per interval."""
  if int(n_sigma) < 1:
    raise ValueError(f"n_sigma={n_sigma} must be >= 1")
  sigmas = jnp.asarray(sigmas, jnp.float32)
  if int(n_sigma) == 1:
    return sigmas
  n = (sigmas.shape[0] - 1) * int(n_sigma) + 1
  return jnp.exp(jnp.linspace(jnp.log(sigmas[0]), jnp.log(sigmas[-1]), n))


_BETA2_FLOOR = 1e-6


def check_cas_eta(ladder: np.ndarray, eta: np.ndarray, source: str) -> None:
  """Host check that beta_i is real wherever noise follows: 1 - gamma_i <= eta_i <= 1 + gamma_i."""
  if eta.ndim not in (0, 1) or (eta.ndim == 1 and eta.shape[0] != ladder.shape[0]):
    raise ValueError(f"CAS eta must be a scalar or have one value per level ({ladder.shape[0]}); "
                     f"got shape {eta.shape}")
  eta = np.broadcast_to(eta, ladder.shape)[:-1].astype(np.float64)
  gamma = ladder[1:].astype(np.float64) / ladder[:-1]
  slack = 1e-6 * np.maximum(1.0, np.abs(eta))
  bad = np.flatnonzero((eta < 1.0 - gamma - slack) | (eta > 1.0 + gamma + slack))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"CAS {source} is infeasible at level {i}: eta={eta[i]:.4g} must lie in "
                     f"[1 - gamma, 1 + gamma] = [{1 - gamma[i]:.4g}, {1 + gamma[i]:.4g}] "
                     f"(gamma = sigma_{{i+1}} / sigma_i); eta = 1 - gamma is the ODE's Euler step")


def consistent_annealed(score_fn: ScoreFn, x_init: Float[Array, "b ..."],
                        sigmas: Float[Array, "L"], rng: jax.Array, *,
                        step_lr: float | jax.Array | None = None,
                        eta: float | Float[Array, "L"] | None = None, denoise: bool = False,
                        n_sigma: int = 1, mask: jax.Array | None = None,
                        x_known: jax.Array | None = None, return_info: bool = False,
                        return_trajectory: bool = False, save_every: int | None = None) -> Any:
  """Consistent annealed sampling (Jolicoeur-Martineau et al. 2020, Algorithm 2; AC code).

  At level i: x <- x + eta_i sigma_i^2 s(x, sigma_i); then, except after the last level,
  x <- x + beta_i sigma_{i+1} z with gamma_i = sigma_{i+1} / sigma_i and
  beta_i = sqrt(1 - ((1 - eta_i) / gamma_i)^2), so that x carries noise of std exactly
  sigma_{i+1} when the score is exact. Give either `step_lr` (the paper's epsilon:
  eta = step_lr / sigma_L^2 at every level) or `eta` directly, a scalar or one value per level of
  the sampling ladder `[L']`. `n_sigma > 1` samples a finer geometric ladder ((L-1) n_sigma + 1
  levels) for score functions that accept any sigma. With `denoise`, the output is the last
  level's expected denoised sample x + sigma_L^2 s(x, sigma_L) from the same score evaluation
  (no extra network call, as in the AC code). Feasibility (checked when concrete): beta_i real,
  1 - gamma_i <= eta_i <= 1 + gamma_i at every level but the last; for a geometric ladder and
  step_lr, sigma_L^2 (1 - gamma) <= step_lr <= sigma_L^2 (1 + gamma).

  eta is a stochasticity knob (like the churn of Karras et al. 2022) that contains two known
  samplers: eta_i = 1 - gamma_i gives beta_i = 0 and x' = x + sigma_i (sigma_i - sigma_{i+1}) s,
  one Euler step of the probability-flow ODE dx/dsigma = -sigma s (with `denoise`, the whole run
  equals `euler` on the same ladder); eta_i = 1 - gamma_i^2 gives
  x' = x + (sigma_i^2 - sigma_{i+1}^2) s + sigma_{i+1} sqrt(1 - gamma_i^2) z, the VE ancestral
  step (Song et al. 2021, Appendix F).
  NFE = L' (the ladder's length), with or without `denoise`.
  """
  if (step_lr is None) == (eta is None):
    raise ValueError("consistent_annealed needs exactly one of step_lr and eta")
  _check_common(x_init, sigmas, step_lr, "step_lr", mask, x_known)
  ladder = cas_ladder(sigmas, n_sigma)
  num_levels, b = ladder.shape[0], x_init.shape[0]
  sigma_min = ladder[-1]
  if eta is None:
    eta, source = step_lr / sigma_min ** 2, f"step_lr={_concrete(step_lr)}"
  else:
    source = "eta"
  eta_host, ladder_host = _concrete_array(eta), _concrete_array(ladder)
  if eta_host is not None and ladder_host is not None and num_levels > 1:
    check_cas_eta(ladder_host, eta_host, source)
  eta = jnp.broadcast_to(jnp.asarray(eta, jnp.float32), (num_levels,))
  rng = _as_keys(rng, b)
  next_sigmas = jnp.concatenate([ladder[1:], ladder[-1:]])
  is_last = jnp.arange(num_levels) == num_levels - 1

  def level_fn(carry_x, inp):
    x = carry_x
    sigma, next_sigma, eta_i, last, step_in = inp
    x = _impose(x, mask, x_known, sigma, rng, step_in)
    s = score_fn(x, jnp.full((b,), sigma))
    z = _normal(rng, step_in, x)
    gamma = next_sigma / sigma
    beta2 = 1.0 - ((1.0 - eta_i) / gamma) ** 2
    # eta within rounding of the Euler end 1 - gamma leaves beta^2 of the order of float32's
    # epsilon, whose square root would add noise of relative size 1e-3 to an ODE step.
    beta = jnp.sqrt(jnp.where(beta2 > _BETA2_FLOOR, beta2, 0.0))
    stats = _level_stats(x, s, sigma, eta_i * sigma ** 2, z) if return_trajectory else None
    moved = x + eta_i * sigma ** 2 * s
    if denoise:
      final = x + sigma ** 2 * s
    else:
      final = moved
    x_new = jnp.where(last, final, moved + beta * next_sigma * z)
    return x_new, stats

  x, aux = _run_levels(level_fn, x_init,
                       (ladder, next_sigmas, eta, is_last, _step_inputs(rng, num_levels)),
                       num_levels, return_trajectory=return_trajectory, save_every=save_every)
  return _output(_finish(x, mask, x_known), aux, num_levels, return_info=return_info,
                 return_trajectory=return_trajectory, save_every=save_every)


def predictor_corrector(score_fn: ScoreFn, x_init: Float[Array, "b ..."],
                        sigmas: Float[Array, "L"], rng: jax.Array, *,
                        snr: float | jax.Array, corrector_steps: int = 1, denoise: bool = False,
                        mask: jax.Array | None = None, x_known: jax.Array | None = None,
                        return_info: bool = False, return_trajectory: bool = False,
                        save_every: int | None = None) -> Any:
  """VE predictor-corrector sampling (Song et al. 2021, Algorithm 2 on the SMLD ladder).

  At level i: `corrector_steps` Langevin corrector steps with
  eps = 2 (snr ||z|| / ||s||)^2 (batch-mean norms, as the reference code: the step size couples
  the examples of a batch, also with per-example keys), then the reverse diffusion predictor to
  the next level: x_mean = x + (sigma_i^2 - sigma_{i+1}^2) s(x, sigma_i),
  x = x_mean + sqrt(sigma_i^2 - sigma_{i+1}^2) z, with sigma_{L+1} = 0. With `denoise` the last
  predictor's mean is returned (no noise added after the last level).
  NFE = L * (corrector_steps + 1), with or without `denoise`.
  """
  _check_common(x_init, sigmas, snr, "snr", mask, x_known)
  if int(corrector_steps) < 0:
    raise ValueError(f"corrector_steps={corrector_steps} must be >= 0")
  b = x_init.shape[0]
  rng = _as_keys(rng, b)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  num_levels, c = sigmas.shape[0], int(corrector_steps)
  next_sigmas = jnp.concatenate([sigmas[1:], jnp.zeros((1,), sigmas.dtype)])
  is_last = jnp.arange(num_levels) == num_levels - 1
  steps = _step_inputs(rng, num_levels * (c + 1))
  level_steps = steps.reshape(num_levels, c + 1, *steps.shape[1:])

  def level_fn(x, inp):
    sigma, next_sigma, last, step_ins = inp
    sig_b = jnp.full((b,), sigma)

    def corrector(x, step_in):
      x = _impose(x, mask, x_known, sigma, rng, step_in)
      s = score_fn(x, sig_b)
      z = _normal(rng, step_in, x)
      eps = 2.0 * (snr * jnp.mean(_norms(z)) / jnp.mean(_norms(s))) ** 2
      return x + eps * s + jnp.sqrt(2.0 * eps) * z, None

    if c:
      x, _ = jax.lax.scan(corrector, x, step_ins[:c])
    pred_in = step_ins[c]
    x = _impose(x, mask, x_known, sigma, rng, pred_in)
    s = score_fn(x, sig_b)
    g2 = sigma ** 2 - next_sigma ** 2
    z = _normal(rng, pred_in, x)
    stats = _level_stats(x, s, sigma, g2, z) if return_trajectory else None
    x_mean = x + g2 * s
    x_next = x_mean + jnp.sqrt(g2) * z
    if denoise:
      x_next = jnp.where(last, x_mean, x_next)
    return x_next, stats

  x, aux = _run_levels(level_fn, x_init, (sigmas, next_sigmas, is_last, level_steps),
                       num_levels, return_trajectory=return_trajectory, save_every=save_every)
  return _output(_finish(x, mask, x_known), aux, num_levels * (c + 1), return_info=return_info,
                 return_trajectory=return_trajectory, save_every=save_every)


# --------------------------------------------------------------------------------------------
# Probability-flow ODE samplers on a ladder ending at sigma = 0 (Karras et al. 2022; Lu et al.
# 2022). They drive the denoiser D(x, sigma) = x + sigma^2 s(x, sigma) through the ODE
# dx/dsigma = (x - D(x, sigma)) / sigma = -sigma s(x, sigma).


def _check_ode(x_init, sigmas, rng, s_churn, s_tmin, s_tmax, s_noise):
  s = _concrete_array(sigmas)
  if s is not None:
    noise_lib.validate_sigmas(s)
  if not float(s_churn) >= 0:
    raise ValueError(f"s_churn={s_churn} must be >= 0 (0: deterministic)")
  if not float(s_noise) >= 0:
    raise ValueError(f"s_noise={s_noise} must be >= 0")
  if not float(s_tmin) <= float(s_tmax):
    raise ValueError(f"s_tmin={s_tmin} must be <= s_tmax={s_tmax}")
  if float(s_churn) > 0 and rng is None:
    raise ValueError("s_churn > 0 adds noise: pass an rng")
  return None if rng is None else _as_keys(rng, x_init.shape[0])


def _churn(x, sigma, step_in, rng, *, gamma_max, s_tmin, s_tmax, s_noise):
  """EDM Algorithm 2, lines 5-6: raise sigma by gamma and add the matching noise."""
  if gamma_max == 0.0:
    return x, sigma
  churned = (sigma >= s_tmin) & (sigma <= s_tmax)
  sigma_hat = jnp.where(churned, sigma * (1.0 + gamma_max), sigma)
  # Noise only where gamma > 0 (as k-diffusion's `sample_heun`): at gamma = 0, XLA may evaluate
  # sigma_hat^2 - sigma^2 as a tiny negative number, whose square root is NaN.
  std = jnp.where(churned, jnp.sqrt(jnp.maximum(sigma_hat ** 2 - sigma ** 2, 0.0)), 0.0)
  z = _normal(rng, step_in, x)
  return x + std * s_noise * z, sigma_hat


def _ode_sampler(score_fn, x_init, sigmas, rng, *, heun, s_churn, s_tmin, s_tmax, s_noise,
                 return_info):
  rng = _check_ode(x_init, sigmas, rng, s_churn, s_tmin, s_tmax, s_noise)
  b = x_init.shape[0]
  sigmas = jnp.asarray(sigmas, jnp.float32)
  n = sigmas.shape[0]
  gamma_max = min(float(s_churn) / n, math.sqrt(2.0) - 1.0)
  churn = dict(gamma_max=gamma_max, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
  steps = _step_inputs(rng, n) if gamma_max > 0 else jnp.arange(n, dtype=jnp.uint32)
  slope = lambda x, sigma: -sigma * score_fn(x, jnp.full((b,), sigma))  # dx/dsigma

  def step(x, inp):
    sigma, sigma_next, step_in = inp
    x_hat, sigma_hat = _churn(x, sigma, step_in, rng, **churn)
    d = slope(x_hat, sigma_hat)
    x_next = x_hat + (sigma_next - sigma_hat) * d
    if heun:
      d_next = slope(x_next, sigma_next)
      x_next = x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
    return x_next, None

  # All steps but the last go between positive sigmas (Heun-corrected); the last, to sigma = 0,
  # is a plain Euler step (EDM Algorithm 2, line 9).
  x, _ = jax.lax.scan(step, x_init, (sigmas[:-1], sigmas[1:], steps[:-1]))
  x_hat, sigma_hat = _churn(x, sigmas[-1], steps[-1], rng, **churn)
  x = x_hat - sigma_hat * slope(x_hat, sigma_hat)
  return _output(x, {}, (2 * n - 1) if heun else n, return_info=return_info)


def euler(score_fn: ScoreFn, x_init: Float[Array, "b ..."], sigmas: Float[Array, "N"],
          rng: jax.Array | None = None, *, s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = math.inf, s_noise: float = 1.0, return_info: bool = False) -> Any:
  """Euler steps of the probability-flow ODE from sigmas[0] through sigmas[-1] to sigma = 0.

  x' = x + (sigma_{i+1} - sigma_i) d with d = (x - D(x, sigma_i)) / sigma_i = -sigma_i s(x, sigma_i)
  (Karras et al. 2022, Algorithm 2 without the second-order correction); the last step, to the
  appended sigma_N = 0, returns D(x, sigma_{N-1}). `sigmas` `[N]` is descending and positive (the
  zero is appended here), e.g. `noise.karras_sigmas`. With `s_churn > 0`, each step first raises
  sigma_i in [s_tmin, s_tmax] to sigma_hat = sigma_i (1 + gamma), gamma = min(s_churn / N,
  sqrt(2) - 1), adding noise of std sqrt(sigma_hat^2 - sigma_i^2) s_noise (needs `rng`, one key or
  per-example keys); without churn `rng` is unused and may be None. NFE = N.
  """
  return _ode_sampler(score_fn, x_init, sigmas, rng, heun=False, s_churn=s_churn, s_tmin=s_tmin,
                      s_tmax=s_tmax, s_noise=s_noise, return_info=return_info)


def heun(score_fn: ScoreFn, x_init: Float[Array, "b ..."], sigmas: Float[Array, "N"],
         rng: jax.Array | None = None, *, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = math.inf, s_noise: float = 1.0, return_info: bool = False) -> Any:
  """EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2) from sigmas[0] to 0.

  Per step i: optional churn (as in `euler`) to (x_hat, sigma_hat); Euler step
  x' = x_hat + (sigma_{i+1} - sigma_hat) d with d = -sigma_hat s(x_hat, sigma_hat); then, unless
  sigma_{i+1} = 0 (the last step), the trapezoidal correction
  x' = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2 with d' = -sigma_{i+1} s(x', sigma_{i+1}).
  Second order in the step size. `sigmas` `[N]` is descending and positive (the zero is appended
  here). NFE = 2N - 1 (EDM's CIFAR-10 setting: N = 18, 35 NFE).
  """
  return _ode_sampler(score_fn, x_init, sigmas, rng, heun=True, s_churn=s_churn, s_tmin=s_tmin,
                      s_tmax=s_tmax, s_noise=s_noise, return_info=return_info)


def dpm_solver_pp_2m(score_fn: ScoreFn, x_init: Float[Array, "b ..."], sigmas: Float[Array, "N"],
                     rng: jax.Array | None = None, *, return_info: bool = False) -> Any:
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) for the VE ODE in sigma, from sigmas[0] to 0.

  With t = -log sigma, D_i = D(x, sigma_i) and h_i = t_{i+1} - t_i: the first step is first order,
  x' = (sigma_{i+1} / sigma_i) x - expm1(-h_i) D_i; later steps use the multistep estimate
  D'_i = (1 + 1/(2 r)) D_i - (1/(2 r)) D_{i-1} with r = h_{i-1} / h_i in its place (as
  k-diffusion's `sample_dpmpp_2m`, `k_diffusion/sampling.py`). The last step, to the appended
  sigma_N = 0, returns D_{N-1}. Deterministic: `rng` is unused and may be None. NFE = N.
  """
  s = _concrete_array(sigmas)
  if s is not None:
    noise_lib.validate_sigmas(s)
  if rng is not None:
    _as_keys(rng, x_init.shape[0])
  b = x_init.shape[0]
  sigmas = jnp.asarray(sigmas, jnp.float32)
  n = sigmas.shape[0]
  dn = lambda x, sigma: denoise(score_fn, x, jnp.full((b,), sigma))
  t = -jnp.log(sigmas)
  h = t[1:] - t[:-1]
  h_prev = jnp.concatenate([h[:1], h[:-1]])

  def step(carry, inp):
    x, d_prev = carry
    sigma, sigma_next, h_i, h_last, first = inp
    d = dn(x, sigma)
    half_inv_r = 0.5 * h_i / h_last
    d_mix = jnp.where(first, d, (1.0 + half_inv_r) * d - half_inv_r * d_prev)
    return ((sigma_next / sigma) * x - jnp.expm1(-h_i) * d_mix, d), None

  first = jnp.arange(n - 1) == 0
  (x, _), _ = jax.lax.scan(step, (x_init, jnp.zeros_like(x_init)),
                           (sigmas[:-1], sigmas[1:], h, h_prev, first))
  return _output(dn(x, sigmas[-1]), {}, n, return_info=return_info)


# --------------------------------------------------------------------------------------------
# Adaptive reverse-SDE solver.


_TREE_DEPTH = 24  # dyadic resolution 2^-24 of t in [0, 1], float32's spacing just below 1


def _brownian_tree(keys: jax.Array, t: Float[Array, "b"], like: jax.Array) -> jax.Array:
  """W(t) of one standard Brownian motion per example on [0, 1], W(0) = 0, at per-example t.

  A virtual Brownian tree (Levy's construction, as torchsde's `BrownianTree` behind k-diffusion's
  `BrownianTreeNoiseSampler`): W(1) and the midpoint of every dyadic interval, drawn from the
  Brownian bridge between its ends, come from keys folded from the node's heap index, so every
  query of a path sees the same path whatever the order of queries. Below the depth's dyadic
  resolution W is interpolated linearly.

  Args:
    keys: `[b]` typed keys, one path per example.
    t: `[b]` times in [0, 1].
    like: `[b, ...]`, the shape and dtype of one W(t) per example.

  Returns:
    `[b, ...]` W(t).
  """

  def one(key, t):
    draw = lambda node: jax.random.normal(jax.random.fold_in(key, node), like.shape[1:],
                                          like.dtype)

    def level(_, carry):
      lo, hi, w_lo, w_hi, node = carry
      mid = 0.5 * (lo + hi)
      w_mid = 0.5 * (w_lo + w_hi) + jnp.sqrt(0.25 * (hi - lo)) * draw(node)
      left = t < mid
      return (jnp.where(left, lo, mid), jnp.where(left, mid, hi), jnp.where(left, w_lo, w_mid),
              jnp.where(left, w_mid, w_hi), 2 * node + jnp.where(left, 0, 1).astype(jnp.uint32))

    zero = jnp.zeros((), jnp.float32)
    carry = (zero, zero + 1.0, jnp.zeros(like.shape[1:], like.dtype), draw(jnp.uint32(0)),
             jnp.uint32(1))
    lo, hi, w_lo, w_hi, _ = jax.lax.fori_loop(0, _TREE_DEPTH, level, carry)
    return w_lo + ((t - lo) / (hi - lo)).astype(like.dtype) * (w_hi - w_lo)

  return jax.vmap(one)(keys, t)


def adaptive(score_fn: ScoreFn, x_init: Float[Array, "b ..."], rng: jax.Array, *,
             sigma_max: float, sigma_min: float, abs_tol: float = 0.0039, rel_tol: float = 0.05,
             h_init: float = 0.01, safety: float = 0.9, exponent: float = 0.9,
             h_max_factor: float = math.inf, max_iters: int = 10_000, denoise: bool = True,
             noise: str = "brownian_tree", return_info: bool = False) -> Any:
  """The "Gotta Go Fast" reverse VE SDE solver (Jolicoeur-Martineau et al. 2021, Algorithm 1).

  Time t in [0, 1] with sigma(t) = sigma_min (sigma_max / sigma_min)^t and
  g(t)^2 = d sigma^2 / dt = 2 sigma(t)^2 log(sigma_max / sigma_min); every sample runs from t = 1
  to t = 0 with its own step h (first h_init). One attempt from (x, t), with one Gaussian draw z
  (the Brownian increment over [t - h, t] divided by sqrt(h)):
  K1 = h g(t)^2 s(x, sigma(t)) + sqrt(h) g(t) z (Euler-Maruyama, x'_1 = x + K1),
  K2 = h g(t-h)^2 s(x'_1, sigma(t-h)) + sqrt(h) g(t-h) z, and the improved-Euler value
  x'_2 = x + (K1 + K2) / 2. With the mixed tolerance delta = max(abs_tol, rel_tol max(|x'_2|, |x|))
  per element, the scaled error is E = ||(x'_2 - x'_1) / delta||_2 / sqrt(n) per sample; the
  attempt is accepted (x <- x'_2, t <- t - h) when E <= 1, and in either case
  h <- min(t, h min(h_max_factor, safety E^-exponent)), so the last step lands on t = 0. The loop
  (one `lax.while_loop`) runs until every sample has reached
  sigma_min; finished samples stay put. With `denoise` (default, as the paper) the output is
  x + sigma_min^2 s(x, sigma_min).

  The paper's settings: abs_tol = 0.0039 (one 8-bit level for data in [0, 1]; 0.0078 for
  [-1, 1]), rel_tol in {0.01, 0.02, 0.05, 0.1}, h_init = 0.01, safety 0.9, exponent 0.9, no cap
  on the growth of h (h_max_factor = inf).

  Noise. The error estimate is nearly proportional to z, so if a rejected attempt redraws z (the
  paper's Algorithm 1, `noise="redraw"`), the accept/reject test selects the noise that accepted
  steps carry: their increments are no longer Gaussian with variance h. Averaged over an image's
  pixels the selection is weak; in low dimension it biases the output (the NCSN two-mode mixture
  in 2-D with exact scores, abs_tol = 0.0078, rel_tol = 0.05: small-mode weight 0.24 to 0.25 for
  0.20, variance 1.2 to 1.4 for 1.0). The default `noise="brownian_tree"` keeps each sample's Brownian path W fixed
  across rejections, the remedy of adaptive SDE solvers (Rackauckas & Nie 2017, rejection sampling
  with memory; k-diffusion's adaptive sampler draws through a Brownian tree for the same reason):
  an attempt takes sqrt(h) z = W(t) - W(t - h) from a virtual Brownian tree, so a retry with a
  smaller step sees the Brownian bridge of the rejected increment, and acceptance no longer
  selects the noise. On the same mixture: weight 0.19 to 0.21, variance 0.95 at 150 mean NFE;
  what remains is the solver's error, which shrinks as the tolerance tightens.

  Keys: with `noise="brownian_tree"`, example i's path comes from rng[i] (per-example keys) or
  from split(rng, b)[i] (one key); with `noise="redraw"`, one key draws the batch's noise of
  iteration k from fold_in(rng, k) and per-example keys draw example i's noise of its own k-th
  attempt from fold_in(rng[i], k). With per-example keys a sample does not depend on the rest of
  the batch.

  Args:
    score_fn: the score s(x, sigma) with per-example sigma `[b]`.
    x_init: `[b, ...]` samples at sigma_max (e.g. the prior N(0, sigma_max^2 I)).
    rng: one key or `[b]` per-example keys.
    sigma_max, sigma_min: the noise levels of t = 1 and t = 0.
    abs_tol, rel_tol: the mixed tolerance, both > 0 (rel_tol = 0 would hold every coordinate to
      abs_tol alone, at sigma_max too, for many times the network evaluations).
    h_init, safety, exponent, h_max_factor: step-size control.
    max_iters: a bound on loop iterations (a sample not finished by then is returned as it is;
      info["done"] tells).
    denoise: finish with Tweedie's denoising at sigma_min (one more evaluation).
    noise: "brownian_tree" (default: a path fixed across rejections) or "redraw" (the paper: a
      fresh draw per attempt, biased in low dimension).
    return_info: also return info with per-sample "nfe" `[b]` (2 per attempt, plus 1 with
      `denoise`), "accepted" and "rejected" `[b]` and "done" `[b]`.

  Returns:
    `[b, ...]` samples, or `(samples, info)` with `return_info`.
  """
  checks = (("sigma_min", sigma_min, sigma_min > 0, "> 0"),
            ("sigma_max", sigma_max, sigma_max > sigma_min, f"> sigma_min={sigma_min}"),
            ("abs_tol", abs_tol, abs_tol > 0, "> 0"), ("rel_tol", rel_tol, rel_tol > 0, "> 0"),
            ("h_init", h_init, 0 < h_init <= 1, "in (0, 1]"),
            ("safety", safety, 0 < safety <= 1, "in (0, 1]"),
            ("exponent", exponent, exponent > 0, "> 0"),
            ("h_max_factor", h_max_factor, h_max_factor > 1, "> 1"),
            ("max_iters", max_iters, int(max_iters) >= 1, ">= 1"))
  for name, value, ok, rule in checks:
    if not ok:
      raise ValueError(f"adaptive: {name}={value} must be {rule}")
  if noise not in ("brownian_tree", "redraw"):
    raise ValueError(f"adaptive: noise={noise!r} must be 'brownian_tree' or 'redraw'")
  b = x_init.shape[0]
  rng = _as_keys(rng, b)
  tree = noise == "brownian_tree"
  path_keys = (jax.random.split(rng, b) if rng.ndim == 0 else rng) if tree else None
  log_ratio = math.log(sigma_max / sigma_min)
  sigma_of = lambda t: sigma_min * jnp.exp(t * log_ratio)
  col = lambda v: v.reshape((b,) + (1,) * (x_init.ndim - 1))
  n_elems = math.prod(x_init.shape[1:])

  def drift_and_scale(x, t, h):
    sigma = sigma_of(t)
    g2 = 2.0 * sigma ** 2 * log_ratio
    return col(h * g2) * score_fn(x, sigma), col(jnp.sqrt(h * g2))

  def cond(carry):
    _, _, t, _, _, _, _, it = carry
    return jnp.any(t > 0) & (it < max_iters)

  def body(carry):
    x, w, t, h, attempts, accepted, nfe, it = carry
    active = t > 0
    h = jnp.minimum(h, t)
    t_next = jnp.where(h >= t, 0.0, t - h)
    if tree:
      w_next = _brownian_tree(path_keys, t_next, x)
      z = (w - w_next) / col(jnp.sqrt(jnp.maximum(h, jnp.finfo(jnp.float32).tiny)))
    else:
      w_next = w
      step = jax.random.fold_in(rng, it) if rng.ndim == 0 else attempts
      z = _normal(rng, step, x)
    drift1, scale1 = drift_and_scale(x, t, h)
    k1 = drift1 + scale1 * z
    x_em = x + k1
    drift2, scale2 = drift_and_scale(x_em, t_next, h)
    x_ie = x + 0.5 * (k1 + drift2 + scale2 * z)
    delta = jnp.maximum(abs_tol, rel_tol * jnp.maximum(jnp.abs(x_ie), jnp.abs(x)))
    err = jnp.sqrt(jnp.sum(((x_ie - x_em) / delta).reshape(b, -1) ** 2, axis=1) / n_elems)
    accept = active & (err <= 1.0)
    factor = jnp.minimum(h_max_factor, safety * err ** -exponent)
    x = jnp.where(col(accept), x_ie, x)
    w = jnp.where(col(accept), w_next, w)
    t = jnp.where(accept, t_next, t)
    h = jnp.where(active, jnp.minimum(h * factor, t), h)
    a = active.astype(jnp.int32)
    return (x, w, t, h, attempts + a, accepted + accept.astype(jnp.int32), nfe + 2 * a, it + 1)

  zeros = jnp.zeros((b,), jnp.int32)
  ones = jnp.ones((b,), jnp.float32)
  # W(1), the path's value at the start (a dummy with "redraw").
  w_init = _brownian_tree(path_keys, ones, x_init) if tree else jnp.zeros_like(x_init)
  init = (x_init, w_init, ones, jnp.full((b,), h_init, jnp.float32), zeros, zeros, zeros,
          jnp.zeros((), jnp.int32))
  x, _, t, _, attempts, accepted, nfe, _ = jax.lax.while_loop(cond, body, init)
  if denoise:
    x = _denoise_fn(score_fn, x, sigma_min)
    nfe = nfe + 1
  info = {"accepted": accepted, "rejected": attempts - accepted, "done": t <= 0}
  return _output(x, info, nfe, return_info=return_info)
