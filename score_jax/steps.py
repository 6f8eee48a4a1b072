"""Pure per-device steps: the score-matching loss, the train and eval steps, the adversarial step.

`train_step(state, batch, rng, ...)` is one optimizer step of denoising (or sliced) score matching
(Song & Ermon 2019, Eq. 5-6 with lambda(sigma) = sigma^2) written as a per-device body:
gradients and metrics are averaged with `lax.pmean` over `parallel.BATCH_AXIS`, and
`parallel.data_parallel` turns it into one SPMD program. Randomness is derived, never stored: the
step is folded into the run key, and each example's global index (`batch["index"]`) into that, so
the same config draws the same noise on 1, 2 or 8 devices and a resumed step k replays step k.

A step whose loss or gradient is not finite leaves the state unchanged and raises the
`nonfinite` metric; the host loop (`train.py`) stops at the next check without saving.

Adversarial score matching (Jolicoeur-Martineau et al. 2020, Sec. 4), `adversarial_train_step`:
A discriminator D compares real data x with the network's denoised samples
x_hat = x_tilde + sigma^2 s(x_tilde, sigma) (the expected denoised sample), optionally clamped
to the data range. One call of `adversarial_train_step` consumes `d_steps` data batches
(stacked on a leading axis `[d_steps, b, ...]` when `d_steps > 1`, a plain `[b, ...]` batch when
`d_steps == 1`) and does, in this order:

1. `d_steps` discriminator updates, update k on batch k's real data and on denoised samples from
   fresh noise draws (the score network frozen): minimize lambda_D * L_D(D(x), D(x_hat')).
2. One score-network update on the last batch, batch `d_steps - 1`: lambda_DSM * L_DSM +
   lambda_G * L_G(D(x), D(x_hat)), where x_hat comes from the same forward pass as the DSM term
   (D frozen and in eval mode), then the EMA.

This is the reference's order (AlexiaJM/AdversarialConsistentScoreMatching,
`runners/train_runner.py`, `TrainRunner.run`): every data batch gets one discriminator update,
and on every `D_steps`-th batch the score network also steps, on that same batch, right after
the discriminator's update. Here those `d_steps` batches form one compiled step, so `state.step`
counts score-network updates and the data iterator advances `d_steps` batches per step (a
resumed step k reads the batches step k read).

The DSM term draws its levels and noise exactly as the plain step (`train_step`) does, so
with lambda_G = 0 the score network's update is the plain DSM update on the last batch. The
discriminator draws from its own keys, one per update.

Spectral-norm power iterations run in each D forward pass during D updates (twice per update:
real, then fake); they depend on the weights only, so every device computes the same vectors.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from score_jax import gan, losses, noise, parallel, rng_streams
from score_jax.models.discriminator import SPECTRAL_STATS
from score_jax.score import broadcast_sigma, make_score_fn
from score_jax.train_state import AdversarialState, TrainState

BATCH_AXIS = parallel.BATCH_AXIS


def _example_rngs(rng: jax.Array, index: jax.Array) -> jax.Array:
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, index)


def _levels(rng: jax.Array, index: jax.Array, *, method: str, num_scales: int,
            global_batch_size: int) -> jax.Array | None:
  """Per-example level indices for batch-coupled level sampling; None for uniform draws."""
  if method == "uniform":
    return None
  return noise.sample_levels(rng, global_batch_size, num_scales, method)[index]


def score_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array, *, model: nn.Module,
               sigmas: jax.Array, loss: str = "dsm", level_sampling: str = "uniform",
               weight_power: float = 2.0, global_batch_size: int,
               ssm_projection: str = "gaussian", ssm_num_projections: int = 1,
               distribution: noise.NoiseDistribution | None = None, weighting: str = "ncsn",
               sigma_data: float = 0.5, train: bool = True, internals: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """This device's score-matching loss on its slice of the batch (no cross-device averaging).

  `distribution` draws each example's sigma (None: a level of `sigmas`; continuous: the level
  metrics are per sigma bin of `sigmas`), `weighting` and `sigma_data` weight the loss (see
  `losses`). `internals` (DSM only) adds the perturbed inputs, scores and levels to the metrics.
  """
  level_rng, example_rng, dropout_rng = jax.random.split(rng, 3)
  example_rngs = _example_rngs(example_rng, batch["index"])
  sigma_idx = _levels(level_rng, batch["index"], method=level_sampling,
                      num_scales=sigmas.shape[0], global_batch_size=global_batch_size)
  # Dropout masks are per device: with dropout > 0, runs on different device counts differ.
  score_fn = make_score_fn(model, params, train=train,
                           rngs={"dropout": jax.random.fold_in(dropout_rng, batch["index"][0])})
  weights = dict(weight_power=weight_power, distribution=distribution, weighting=weighting,
                 sigma_data=sigma_data)
  if loss == "dsm":
    return losses.dsm_loss(score_fn, batch["x"], sigmas, example_rngs, sigma_idx=sigma_idx,
                           internals=internals, **weights)
  if loss == "ssm":
    return losses.ssm_loss(score_fn, batch["x"], sigmas, example_rngs, sigma_idx=sigma_idx,
                           projection=ssm_projection, num_projections=ssm_num_projections,
                           **weights)
  raise ValueError(f"training.loss={loss!r} is unknown; use 'dsm' or 'ssm'")


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               ema_decays: tuple[float, ...], **loss_kwargs) -> tuple[TrainState, dict]:
  """One optimizer step on this device's slice; `rng` is the run key (the step is folded in).

  Returns the new state and device-averaged metrics: `loss`, `grad_norm`, `nonfinite`,
  `level_loss_sum` / `level_count` `[L]` (sums, so interval averages per level are exact).
  """
  rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(score_loss, has_aux=True)
  (loss, metrics), grads = grad_fn(parallel.per_device(state.params), batch, rng, **loss_kwargs)
  grads = jax.lax.pmean(grads, BATCH_AXIS)
  metrics = reduce_metrics(dict(metrics, loss=loss))
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  # A non-finite step leaves the state as it was. `lax.cond` rather than a `where` per leaf: the
  # per-leaf selects cost more than the optimizer update itself on CPU (bench/NOTES.md).
  state = jax.lax.cond(finite, lambda s: s.apply_gradients(grads=grads).update_ema(ema_decays),
                       lambda s: s, state)
  metrics.update(grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
  return state, metrics


def reduce_metrics(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Device-average scalars; per-level sums and counts are summed over devices."""
  return {k: (jax.lax.psum(v, BATCH_AXIS) if k.startswith("level_") else
              jax.lax.pmean(v, BATCH_AXIS)) for k, v in metrics.items()}


def eval_step(params: Any, batch: dict[str, jax.Array], rng: jax.Array, **loss_kwargs) -> dict:
  """Test loss of `params` on this device's slice, averaged over devices."""
  loss, metrics = score_loss(params, batch, rng, train=False, **loss_kwargs)
  return reduce_metrics(dict(metrics, loss=loss))


# --------------------------------------------------------------------------------------------
# Adversarial score matching.



def denoised_from(metrics: dict[str, jax.Array], clamp: tuple[float, float] | None) -> jax.Array:
  """x_tilde + sigma^2 * score from a DSM pass's internals, clamped to `clamp` if given."""
  x_tilde, score, sigma = metrics["x_tilde"], metrics["score"], metrics["sigma"]
  x_hat = x_tilde + broadcast_sigma(sigma, x_tilde) ** 2 * score
  return x_hat if clamp is None else jnp.clip(x_hat, *clamp)


def _whole_batch(logits: jax.Array) -> jax.Array:
  """This device's logits gathered with every other device's, in global batch order.

  Relativistic-average losses compare each logit with the mean over the batch; on a slice that
  mean would depend on the device count. Every device evaluates the GAN loss on the whole batch
  (identical values). The gather's transpose sums every device's cotangent for this slice, i.e.
  N times its share of the gradient, which the `pmean` of the gradients divides by N again
  (tests check that 1 and 8 devices give the same update).
  """
  return jax.lax.all_gather(logits, parallel.BATCH_AXIS, tiled=True)


def _d_update(state: AdversarialState, batch: dict, rng: jax.Array, *, d_model: nn.Module,
              gan_loss: str, lambda_d: float, clamp, loss_kwargs: dict):
  num_scales = loss_kwargs["sigmas"].shape[0]
  _, internals = score_loss(jax.lax.stop_gradient(state.score.params), batch, rng,
                            internals=True, **loss_kwargs)
  fake = jax.lax.stop_gradient(denoised_from(internals, clamp))
  disc = state.disc

  def loss_fn(params):
    variables = {"params": params, SPECTRAL_STATS: disc.spectral_stats}
    real_logits, upd = d_model.apply(variables, batch["x"], train=True, mutable=[SPECTRAL_STATS])
    variables = {"params": params, **upd}
    fake_logits, upd = d_model.apply(variables, fake, train=True, mutable=[SPECTRAL_STATS])
    loss = lambda_d * gan.discriminator_loss(_whole_batch(real_logits), _whole_batch(fake_logits),
                                             kind=gan_loss)
    return loss, (loss, upd[SPECTRAL_STATS], real_logits, fake_logits)

  (_, (loss, stats, real_logits, fake_logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      parallel.per_device(disc.params))
  grads = jax.lax.pmean(grads, parallel.BATCH_AXIS)
  # The power iteration saw the per-device copy of the weights: its result is equal on every
  # device, and averaging makes it replicated state again.
  stats = jax.lax.pmean(stats, parallel.BATCH_AXIS)
  disc = disc.apply_gradients(grads=grads).replace(spectral_stats=stats)
  fake_correct = (fake_logits <= 0).astype(jnp.float32)
  metrics = {
      "d_loss": loss,
      "d_acc_real": jnp.mean((real_logits > 0).astype(jnp.float32)),
      "d_acc_fake": jnp.mean(fake_correct),
      "level_d_acc_fake_sum": jax.ops.segment_sum(fake_correct, internals["sigma_idx"],
                                                  num_segments=num_scales),
      "level_d_count": jax.ops.segment_sum(jnp.ones_like(fake_correct), internals["sigma_idx"],
                                           num_segments=num_scales),
      "d_grad_norm": optax.tree.norm(grads),
  }
  return state.replace(disc=disc), metrics


def _split_d_batches(batch: dict[str, jax.Array], d_steps: int) -> list[dict[str, jax.Array]]:
  """The batches of the `d_steps` discriminator updates, in order (see `adversarial_train_step`)."""
  if d_steps == 1:
    return [batch]
  if batch["index"].ndim != 2 or batch["index"].shape[0] != d_steps:
    raise ValueError(f"adversarial.d_steps={d_steps} needs {d_steps} batches stacked on a leading "
                     f"axis (index shape [{d_steps}, b]), got index shape "
                     f"{tuple(batch['index'].shape)}; build it with parallel.shard_batch(..., "
                     f"batches_per_step={d_steps})")
  return [jax.tree.map(lambda v, k=k: v[k], batch) for k in range(d_steps)]


def adversarial_train_step(state: AdversarialState, batch: dict[str, jax.Array], rng: jax.Array,
                           *, ema_decays: tuple[float, ...], d_model: nn.Module, gan_loss: str,
                           lambda_dsm: float, lambda_g: float, lambda_d: float, d_steps: int,
                           clamp: tuple[float, float] | None, **loss_kwargs: Any
                           ) -> tuple[AdversarialState, dict[str, jax.Array]]:
  """One adversarial step on this device's slice (see the module docstring for the order).

  `batch` is one batch (`x` `[b, ...]`, `index` `[b]`) when `d_steps == 1`, else `d_steps`
  batches stacked on a leading axis (`[d_steps, b, ...]`, as `parallel.shard_batch(...,
  batches_per_step=d_steps)` builds them): discriminator update k uses batch k, the
  score-network update the last one.

  Returns the new state and device-reduced metrics: the DSM `loss` (and per-level sums), `d_loss`,
  `g_loss`, `d_acc_real`, `d_acc_fake` (averages over the `d_steps` updates), per-level
  discriminator accuracy on denoised samples (`level_d_acc_fake_sum` / `level_d_count`),
  gradient norms and `nonfinite`.
  """
  d_batches = _split_d_batches(batch, d_steps)
  batch = d_batches[-1]
  old = state
  rng = jax.random.fold_in(rng, state.step)
  d_rng = rng_streams.fold(rng, "step.discriminator")
  d_metrics = []
  for k, d_batch in enumerate(d_batches):
    state, m = _d_update(state, d_batch, jax.random.fold_in(d_rng, k), d_model=d_model,
                         gan_loss=gan_loss, lambda_d=lambda_d, clamp=clamp,
                         loss_kwargs=loss_kwargs)
    d_metrics.append(m)
  d_metrics = jax.tree.map(lambda *xs: sum(xs) / (1 if xs[0].ndim else len(xs)), *d_metrics)

  disc_variables = {"params": state.disc.params, SPECTRAL_STATS: state.disc.spectral_stats}

  def loss_fn(params):
    dsm, internals = score_loss(params, batch, rng, internals=True, **loss_kwargs)
    fake_logits = d_model.apply(disc_variables, denoised_from(internals, clamp), train=False)
    real_logits = d_model.apply(disc_variables, batch["x"], train=False)
    g_loss = gan.generator_loss(_whole_batch(real_logits), _whole_batch(fake_logits),
                                kind=gan_loss)
    public = {k: internals[k] for k in ("level_loss_sum", "level_count")}
    objective = lambda_dsm * dsm + lambda_g * g_loss
    return objective, dict(public, loss=dsm, g_loss=g_loss)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      parallel.per_device(state.score.params))
  grads = jax.lax.pmean(grads, parallel.BATCH_AXIS)
  grad_norm = optax.tree.norm(grads)
  metrics = reduce_metrics({**metrics, **d_metrics})
  finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            & jnp.isfinite(metrics["d_loss"]) & jnp.isfinite(metrics["d_grad_norm"]))
  # A non-finite step leaves both networks as they were (`lax.cond`, cheaper than a `where` per
  # leaf, as in steps.train_step).
  state = jax.lax.cond(
      finite, lambda s: s[0].replace(score=s[0].score.apply_gradients(grads=grads)
                                     .update_ema(ema_decays)),
      lambda s: s[1], (state, old))
  metrics.update(grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
  return state, metrics
