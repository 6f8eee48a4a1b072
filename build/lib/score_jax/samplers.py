"""Samplers as pure `lax.scan` programs: Langevin, ALS, CAS, and the VE predictor-corrector.

All take a score function and an explicit `rng`, are jit- and vmap-able (step sizes may be traced,
e.g. vmapped over a grid), and compile into one XLA program whose size does not depend on the
number of levels or steps (scan, not unrolling). Host-side argument checks run when the values are
concrete.

Options shared by the annealed samplers:
* `denoise`: finish with the expected denoised sample x + sigma_L^2 s(x, sigma_L) (Tweedie).
* `mask`, `x_known`: inpainting. `mask` is 1 on known entries. Before every update the known
  entries are replaced by `x_known + sigma_i z` with fresh z (the NCSNv2 convention, REFERENCE B10;
  any mask, not only a half image); the output carries `x_known` exactly on known entries.
* `return_trajectory`: also return per-level statistics `[L']` of the state entering each level:
  "sigma", "x_mean", "x_std", "score_norm" (batch mean of ||s||), "snr" (sqrt(alpha/2)||s||/||z||,
  as logged by NCSNv2), and "noise_std" = rms(sigma_i^2 s(x, sigma_i)) = rms(x - denoised(x)), the
  noise level of x as seen by the score (exact for a point mass). Memory is O(L') scalars.
* `save_every=k`: also return "samples" `[L' // k, b, ...]`, x after every k-th level, held in a
  preallocated buffer (memory does not grow with steps).
With either option the return value is `(x, aux)`, else `x`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from score_jax import noise as noise_lib
from score_jax.score import ScoreFn, broadcast_sigma, denoise

__all__ = ["langevin", "annealed_langevin", "consistent_annealed", "predictor_corrector",
           "denoise", "cas_ladder"]


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


def _rms(v: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(v.astype(jnp.float32) ** 2))


def _norms(v: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1).astype(jnp.float32) ** 2, axis=1))


def _level_stats(x, s, sigma, alpha, z) -> dict[str, jax.Array]:
  return {"sigma": sigma, "x_mean": jnp.mean(x), "x_std": jnp.std(x),
          "score_norm": jnp.mean(_norms(s)),
          "snr": jnp.mean(jnp.sqrt(alpha / 2.0) * _norms(s) / _norms(z)),
          "noise_std": _rms(sigma ** 2 * s)}


def _impose(x, mask, x_known, sigma, rng):
  if mask is None:
    return x
  noisy = x_known + sigma * jax.random.normal(rng, x.shape, x.dtype)
  return jnp.where(mask > 0, noisy, x)


def _finish(x, mask, x_known):
  return x if mask is None else jnp.where(mask > 0, x_known, x)


def _run_levels(level_fn: Callable, x: jax.Array, per_level: tuple, num_levels: int, *,
                return_trajectory: bool, save_every: int | None):
  """Scans `level_fn(x, inputs_i) -> (x, stats_i)` over levels; collects stats and snapshots."""
  if save_every is not None and not 1 <= int(save_every) <= num_levels:
    raise ValueError(f"save_every={save_every} must be in [1, {num_levels}] (levels)")
  n_saved = 0 if save_every is None else num_levels // int(save_every)
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


def _output(x, aux, return_trajectory, save_every):
  return (x, aux) if (return_trajectory or save_every is not None) else x


# --------------------------------------------------------------------------------------------


def langevin(score_fn: ScoreFn, x_init: Float[Array, "b ..."], rng: jax.Array, *,
             sigma: float | jax.Array, n_steps: int,
             step_size: float | jax.Array) -> Float[Array, "b ..."]:
  """Plain (unadjusted) Langevin dynamics at one noise level: x <- x + a s + sqrt(2a) z.

  `score_fn` may ignore sigma (e.g. `jax.grad` of an unnormalized log posterior).
  """
  a = _concrete(step_size)
  if a is not None and not a > 0:
    raise ValueError(f"step_size={a} must be > 0")
  if int(n_steps) < 1:
    raise ValueError(f"n_steps={n_steps} must be >= 1")
  sig = jnp.full((x_init.shape[0],), sigma, jnp.float32)

  def step(x, key):
    z = jax.random.normal(key, x.shape, x.dtype)
    return x + step_size * score_fn(x, sig) + jnp.sqrt(2.0 * step_size) * z, None

  x, _ = jax.lax.scan(step, x_init, jax.random.split(rng, int(n_steps)))
  return x


def annealed_langevin(score_fn: ScoreFn, x_init: Float[Array, "b ..."],
                      sigmas: Float[Array, "L"], rng: jax.Array, *,
                      step_lr: float | jax.Array, steps_per_sigma: int, denoise: bool = False,
                      mask: jax.Array | None = None, x_known: jax.Array | None = None,
                      return_trajectory: bool = False, save_every: int | None = None) -> Any:
  """Annealed Langevin sampling (Song & Ermon 2019, Algorithm 1), reference-code convention.

  For each level i (largest first), `steps_per_sigma` steps of
  x <- x + alpha_i s(x, sigma_i) + sqrt(2 alpha_i) z with alpha_i = step_lr (sigma_i / sigma_L)^2.
  This is the convention of the reference implementations (N1/N2/AC). Algorithm 1 of the NCSN
  paper writes a_i = epsilon sigma_i^2 / sigma_L^2 and x <- x + (a_i / 2) s + sqrt(a_i) z, which is
  the same update with epsilon = 2 * step_lr. `denoise=True` ends with x + sigma_L^2 s(x, sigma_L) (NCSNv2).
  """
  _check_common(x_init, sigmas, step_lr, "step_lr", mask, x_known)
  if int(steps_per_sigma) < 1:
    raise ValueError(f"steps_per_sigma={steps_per_sigma} must be >= 1")
  sigmas = jnp.asarray(sigmas, jnp.float32)
  num_levels, b, t = sigmas.shape[0], x_init.shape[0], int(steps_per_sigma)
  sigma_min = sigmas[-1]

  def level_fn(x, inp):
    sigma, key = inp
    alpha = step_lr * (sigma / sigma_min) ** 2
    sig_b = jnp.full((b,), sigma)

    def step(x, key):
      known_key, z_key = jax.random.split(key)
      x = _impose(x, mask, x_known, sigma, known_key)
      s = score_fn(x, sig_b)
      z = jax.random.normal(z_key, x.shape, x.dtype)
      stats = _level_stats(x, s, sigma, alpha, z) if return_trajectory else None
      return x + alpha * s + jnp.sqrt(2.0 * alpha) * z, stats

    x, stats = jax.lax.scan(step, x, jax.random.split(key, t))
    first = jax.tree.map(lambda v: v[0], stats) if return_trajectory else None
    return x, first

  loop_rng, final_rng = jax.random.split(rng)
  x, aux = _run_levels(level_fn, x_init, (sigmas, jax.random.split(loop_rng, num_levels)),
                       num_levels, return_trajectory=return_trajectory, save_every=save_every)
  if denoise:
    x = _impose(x, mask, x_known, sigma_min, final_rng)
    x = _denoise_fn(score_fn, x, sigma_min)
  return _output(_finish(x, mask, x_known), aux, return_trajectory, save_every)


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


def consistent_annealed(score_fn: ScoreFn, x_init: Float[Array, "b ..."],
                        sigmas: Float[Array, "L"], rng: jax.Array, *,
                        step_lr: float | jax.Array, denoise: bool = False, n_sigma: int = 1,
                        mask: jax.Array | None = None, x_known: jax.Array | None = None,
                        return_trajectory: bool = False, save_every: int | None = None) -> Any:
  """Consistent annealed sampling (Jolicoeur-Martineau et al. 2020, Algorithm 2; AC code).

  eta = step_lr / sigma_L^2. At level i: x <- x + eta sigma_i^2 s(x, sigma_i); then, except after
  the last level, x <- x + beta_i sigma_{i+1} z with gamma_i = sigma_{i+1} / sigma_i and
  beta_i = sqrt(1 - ((1 - eta) / gamma_i)^2), so that x carries noise of std exactly sigma_{i+1}
  when the score is exact. `n_sigma > 1` samples a finer geometric ladder ((L-1) n_sigma + 1
  levels) for score functions that accept any sigma. With `denoise`, the output is the last
  level's expected denoised sample x + sigma_L^2 s(x, sigma_L) from the same score evaluation
  (no extra network call, as in the AC code). Feasibility (checked when concrete):
  sigma_L^2 (1 - gamma) < step_lr < sigma_L^2 (1 + gamma) with gamma = sigma_L / sigma_{L-1}.
  """
  _check_common(x_init, sigmas, step_lr, "step_lr", mask, x_known)
  ladder = cas_ladder(sigmas, n_sigma)
  lr = _concrete(step_lr)
  if lr is not None and _concrete_array(ladder) is not None:
    noise_lib.check_cas_step_lr(np.asarray(ladder), lr)
  num_levels, b = ladder.shape[0], x_init.shape[0]
  sigma_min = ladder[-1]
  eta = step_lr / sigma_min ** 2
  next_sigmas = jnp.concatenate([ladder[1:], ladder[-1:]])
  is_last = jnp.arange(num_levels) == num_levels - 1

  def level_fn(carry_x, inp):
    x = carry_x
    sigma, next_sigma, last, key = inp
    known_key, z_key = jax.random.split(key)
    x = _impose(x, mask, x_known, sigma, known_key)
    s = score_fn(x, jnp.full((b,), sigma))
    z = jax.random.normal(z_key, x.shape, x.dtype)
    gamma = next_sigma / sigma
    beta = jnp.sqrt(jnp.clip(1.0 - ((1.0 - eta) / gamma) ** 2, 0.0))
    stats = _level_stats(x, s, sigma, eta * sigma ** 2, z) if return_trajectory else None
    moved = x + eta * sigma ** 2 * s
    if denoise:
      final = x + sigma ** 2 * s
    else:
      final = moved
    x_new = jnp.where(last, final, moved + beta * next_sigma * z)
    return x_new, stats

  x, aux = _run_levels(level_fn, x_init,
                       (ladder, next_sigmas, is_last, jax.random.split(rng, num_levels)),
                       num_levels, return_trajectory=return_trajectory, save_every=save_every)
  return _output(_finish(x, mask, x_known), aux, return_trajectory, save_every)


def predictor_corrector(score_fn: ScoreFn, x_init: Float[Array, "b ..."],
                        sigmas: Float[Array, "L"], rng: jax.Array, *,
                        snr: float | jax.Array, corrector_steps: int = 1, denoise: bool = False,
                        mask: jax.Array | None = None, x_known: jax.Array | None = None,
                        return_trajectory: bool = False, save_every: int | None = None) -> Any:
  """VE predictor-corrector sampling (Song et al. 2021, Algorithm 2 on the SMLD ladder).

  At level i: `corrector_steps` Langevin corrector steps with
  eps = 2 (snr ||z|| / ||s||)^2 (batch-mean norms, as the reference code), then the reverse
  diffusion predictor to the next level: x_mean = x + (sigma_i^2 - sigma_{i+1}^2) s(x, sigma_i),
  x = x_mean + sqrt(sigma_i^2 - sigma_{i+1}^2) z, with sigma_{L+1} = 0. With `denoise` the last
  predictor's mean is returned (no noise added after the last level).
  """
  _check_common(x_init, sigmas, snr, "snr", mask, x_known)
  if int(corrector_steps) < 0:
    raise ValueError(f"corrector_steps={corrector_steps} must be >= 0")
  sigmas = jnp.asarray(sigmas, jnp.float32)
  num_levels, b = sigmas.shape[0], x_init.shape[0]
  next_sigmas = jnp.concatenate([sigmas[1:], jnp.zeros((1,), sigmas.dtype)])
  is_last = jnp.arange(num_levels) == num_levels - 1

  def level_fn(x, inp):
    sigma, next_sigma, last, key = inp
    sig_b = jnp.full((b,), sigma)
    corr_key, pred_key = jax.random.split(key)

    def corrector(x, key):
      known_key, z_key = jax.random.split(key)
      x = _impose(x, mask, x_known, sigma, known_key)
      s = score_fn(x, sig_b)
      z = jax.random.normal(z_key, x.shape, x.dtype)
      eps = 2.0 * (snr * jnp.mean(_norms(z)) / jnp.mean(_norms(s))) ** 2
      return x + eps * s + jnp.sqrt(2.0 * eps) * z, None

    if int(corrector_steps):
      x, _ = jax.lax.scan(corrector, x, jax.random.split(corr_key, int(corrector_steps)))
    known_key, z_key = jax.random.split(pred_key)
    x = _impose(x, mask, x_known, sigma, known_key)
    s = score_fn(x, sig_b)
    g2 = sigma ** 2 - next_sigma ** 2
    z = jax.random.normal(z_key, x.shape, x.dtype)
    stats = _level_stats(x, s, sigma, g2, z) if return_trajectory else None
    x_mean = x + g2 * s
    x_next = x_mean + jnp.sqrt(g2) * z
    if denoise:
      x_next = jnp.where(last, x_mean, x_next)
    return x_next, stats

  x, aux = _run_levels(level_fn, x_init,
                       (sigmas, next_sigmas, is_last, jax.random.split(rng, num_levels)),
                       num_levels, return_trajectory=return_trajectory, save_every=save_every)
  return _output(_finish(x, mask, x_known), aux, return_trajectory, save_every)
