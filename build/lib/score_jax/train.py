"""Training: the pure per-device step and the restore-or-init / log / eval / save loop.

`train_step(state, batch, rng, ...)` is one optimizer step of denoising (or sliced) score matching
(Song & Ermon 2019, Eq. 5-6 with lambda(sigma) = sigma^2) written as a per-device body:
gradients and metrics are averaged with `lax.pmean` over `parallel.BATCH_AXIS`, and
`parallel.data_parallel` turns it into one SPMD program. Randomness is derived, never stored: the
step is folded into the run key, and each example's global index (`batch["index"]`) into that, so
the same config draws the same noise on 1, 2 or 8 devices and a resumed step k replays step k.

A step whose loss or gradient is not finite leaves the state unchanged and raises the
`nonfinite` metric; the host stops at the next check without saving, so the last checkpoint on
disk stays the last good one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from score_jax import checkpoint, data, gan, losses, models, noise, parallel
from score_jax.metric_writers import MetricWriter
from score_jax.score import make_score_fn
from score_jax.train_state import (AdversarialState, TrainState, create_discriminator_state,
                                   create_train_state, param_count)

BATCH_AXIS = parallel.BATCH_AXIS


class TrainingError(RuntimeError):
  """Training cannot go on (for example a non-finite loss)."""


# --------------------------------------------------------------------------------------------
# Pure pieces.


def make_sigmas(*, schedule: str, sigma_max: float, sigma_min: float,
                num_scales: int) -> jax.Array:
  """The descending noise ladder `[L]` of a config's `noise` group."""
  if schedule == "geometric":
    return noise.geometric_sigmas(sigma_max, sigma_min, num_scales)
  if schedule == "linear":
    return noise.linear_sigmas(sigma_max, sigma_min, num_scales)
  raise ValueError(f"noise.schedule={schedule!r} is unknown; use 'geometric' or 'linear'")


def make_optimizer(*, optimizer: str, lr: float, beta1: float, beta2: float, eps: float,
                   weight_decay: float = 0.0, warmup_steps: int = 0,
                   grad_clip: float | None = None) -> optax.GradientTransformation:
  """Adam/AdamW with optional linear warm-up and global-norm gradient clipping."""
  schedule = lr if warmup_steps <= 0 else optax.linear_schedule(0.0, lr, warmup_steps)
  if optimizer == "adam":
    opt = optax.adam(schedule, b1=beta1, b2=beta2, eps=eps)
  elif optimizer == "adamw":
    opt = optax.adamw(schedule, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay)
  else:
    raise ValueError(f"optim.optimizer={optimizer!r} is unknown; use 'adam' or 'adamw'")
  if grad_clip is not None:
    opt = optax.chain(optax.clip_by_global_norm(grad_clip), opt)
  return opt


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
               train: bool = True, internals: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """This device's score-matching loss on its slice of the batch (no cross-device averaging).

  `internals` (DSM only) adds the perturbed inputs, scores and levels to the metrics.
  """
  level_rng, example_rng, dropout_rng = jax.random.split(rng, 3)
  example_rngs = _example_rngs(example_rng, batch["index"])
  sigma_idx = _levels(level_rng, batch["index"], method=level_sampling,
                      num_scales=sigmas.shape[0], global_batch_size=global_batch_size)
  # Dropout masks are per device: with dropout > 0, runs on different device counts differ.
  score_fn = make_score_fn(model, params, train=train,
                           rngs={"dropout": jax.random.fold_in(dropout_rng, batch["index"][0])})
  if loss == "dsm":
    return losses.dsm_loss(score_fn, batch["x"], sigmas, example_rngs, sigma_idx=sigma_idx,
                           weight_power=weight_power, internals=internals)
  if loss == "ssm":
    return losses.ssm_loss(score_fn, batch["x"], sigmas, example_rngs, sigma_idx=sigma_idx,
                           projection=ssm_projection, num_projections=ssm_num_projections,
                           weight_power=weight_power)
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
  # selects cost ~2.5x the optimizer update itself (~65 ms of NCSNv2's CPU step, bench/NOTES.md).
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
# Config -> plain values (the only place of this module that reads the config).


def loss_kwargs_from_config(config: ml_collections.ConfigDict, model: nn.Module,
                            sigmas: jax.Array) -> dict[str, Any]:
  return dict(model=model, sigmas=sigmas, loss=config.training.loss,
              level_sampling=config.noise.level_sampling,
              weight_power=config.noise.weight_power,
              global_batch_size=config.training.batch_size,
              ssm_projection=config.training.ssm_projection,
              ssm_num_projections=config.training.ssm_num_projections)


def sigmas_from_config(config: ml_collections.ConfigDict) -> jax.Array:
  n = config.noise
  return make_sigmas(schedule=n.schedule, sigma_max=n.sigma_max, sigma_min=n.sigma_min,
                     num_scales=n.num_scales)


def optimizer_from_config(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  return make_optimizer(optimizer=o.optimizer, lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                        weight_decay=o.weight_decay, warmup_steps=o.warmup_steps,
                        grad_clip=o.grad_clip)


def iterator_from_config(config: ml_collections.ConfigDict, *, split: str, seed: int,
                         batch_size: int, shuffle: bool = True) -> data.DataIterator:
  d = config.data
  image_kwargs = {}
  if not data.is_toy(d.dataset):
    image_kwargs = dict(
        image_size=d.image_size, num_channels=d.num_channels, data_dir=d.data_dir, path=d.path,
        random_flip=d.random_flip and shuffle, uniform_dequantization=d.uniform_dequantization,
        gaussian_dequantization=d.gaussian_dequantization, centered=d.centered,
        num_workers=d.num_workers, prefetch=d.prefetch, shuffle=shuffle)
  return data.create_iterator(dataset=d.dataset, batch_size=batch_size, seed=seed,
                              shard_index=parallel.process_index(),
                              shard_count=parallel.process_count(), toy_dim=d.toy_dim,
                              split=split, **image_kwargs)


def example_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  d = config.data
  return data.example_batch_shape(d.dataset, toy_dim=d.toy_dim, image_size=d.image_size,
                                  num_channels=d.num_channels)


def discriminator_from_config(config: ml_collections.ConfigDict) -> nn.Module:
  from score_jax.models import discriminator
  a = config.adversarial
  if data.is_toy(config.data.dataset) and a.d_arch != "mlp":
    raise ValueError(f"adversarial.d_arch={a.d_arch!r} is for images; toy data need 'mlp'")
  return discriminator.build_discriminator(a.d_arch, ch=a.d_ch, resolution=config.data.image_size)


def init_state(config: ml_collections.ConfigDict, model: nn.Module
               ) -> TrainState | AdversarialState:
  """A fresh state on the host (not yet placed on devices); adversarial runs get both players."""
  x_example = jnp.zeros((1, *example_shape(config)), jnp.float32)
  init_rng = jax.random.fold_in(jax.random.key(config.seed), 0x1A17)
  state = create_train_state(init_rng, model, x_example, optimizer_from_config(config),
                             tuple(config.training.ema_decays))
  if not config.adversarial.enabled:
    return state
  a = config.adversarial
  disc = create_discriminator_state(jax.random.fold_in(init_rng, 0xD), discriminator_from_config(
      config), x_example, gan.adamp(a.d_lr, b1=a.d_beta1, b2=a.d_beta2))
  return AdversarialState(score=state, disc=disc)


def step_fn_from_config(config: ml_collections.ConfigDict, loss_kwargs: dict) -> Any:
  """The per-device step this config trains with (plain or adversarial), keywords bound."""
  ema_decays = tuple(config.training.ema_decays)
  if not config.adversarial.enabled:
    return functools.partial(train_step, ema_decays=ema_decays, **loss_kwargs)
  from score_jax import adversarial
  a = config.adversarial
  if config.training.loss != "dsm":
    raise ValueError("adversarial training needs training.loss='dsm' (it denoises with the DSM "
                     "forward pass)")
  if a.d_steps < 1:
    raise ValueError(f"adversarial.d_steps={a.d_steps} must be >= 1")
  clamp = None
  if a.clamp and not data.is_toy(config.data.dataset):
    clamp = (-1.0, 1.0) if config.data.centered else (0.0, 1.0)
  return functools.partial(adversarial.adversarial_train_step, ema_decays=ema_decays,
                           d_model=discriminator_from_config(config), gan_loss=a.gan_loss,
                           lambda_dsm=a.lambda_dsm, lambda_g=a.lambda_g, lambda_d=a.lambda_d,
                           d_steps=a.d_steps, clamp=clamp, **loss_kwargs)


# Fields whose change makes an existing checkpoint unusable for this run.
_COMPAT_FIELDS = (("model",), ("data", "dataset"), ("data", "toy_dim"), ("data", "image_size"),
                  ("data", "num_channels"), ("noise", "num_scales"), ("training", "ema_decays"),
                  ("adversarial", "enabled"))


def check_compatible(stored: dict, config: ml_collections.ConfigDict, where: str) -> None:
  """Raises `checkpoint.CheckpointError` naming the first field that differs."""
  current = json.loads(config.to_json())
  for path in _COMPAT_FIELDS:
    a, b = stored, current
    for key in path:
      a = a.get(key) if isinstance(a, dict) else None
      b = b.get(key) if isinstance(b, dict) else None
    if a != b:
      name = ".".join(path)
      raise checkpoint.CheckpointError(
          f"{where} holds a checkpoint of an incompatible run ({name}: checkpoint {a!r}, "
          f"config {b!r}); use another --workdir or the checkpoint's config")


# --------------------------------------------------------------------------------------------
# The loop.


def _reduce_interval(history: list[dict]) -> dict[str, Any]:
  """Averages a logging interval's metrics (per step, or stacked `[k]` per fused dispatch).

  Scalars are averaged over steps; the per-level loss is the interval's sum over count per level.
  """
  host = jax.device_get(history)
  out = {k: float(np.mean(np.concatenate([np.ravel(h[k]) for h in host])))
         for k in host[0] if not k.startswith("level_")}
  for name, sum_key, count_key in (("loss", "level_loss_sum", "level_count"),
                                   ("d_acc_fake", "level_d_acc_fake_sum", "level_d_count")):
    if sum_key in host[0]:
      num_scales = np.shape(host[0][sum_key])[-1]
      total = sum(np.reshape(h[sum_key], (-1, num_scales)).sum(0) for h in host)
      count = sum(np.reshape(h[count_key], (-1, num_scales)).sum(0) for h in host)
      out[f"{name}_per_level"] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
  return out


def _level_scalars(loss_per_level: np.ndarray, max_tags: int = 10,
                   tag: str = "loss") -> dict[str, float]:
  """Per-level values as at most `max_tags` TensorBoard scalars (contiguous level groups)."""
  groups = np.array_split(np.arange(len(loss_per_level)), min(max_tags, len(loss_per_level)))
  out = {}
  for g in groups:
    vals = loss_per_level[g]
    vals = vals[np.isfinite(vals)]
    if vals.size:
      out[f"{tag}_by_level/{g[0]:04d}-{g[-1]:04d}"] = float(vals.mean())
  return out


class _Progress:
  """A tqdm bar on the main process (steps/s and ETA), or nothing."""

  def __init__(self, enabled: bool, total: int, initial: int):
    self.bar = None
    if enabled and parallel.is_main_process():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  def update(self, n: int, **postfix):
    if self.bar is not None:
      self.bar.update(n)
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _check_intervals(t: ml_collections.ConfigDict) -> None:
  k = t.steps_per_dispatch
  for name in ("num_train_steps", "log_every_steps", "ckpt_every_steps", "eval_every_steps"):
    v = t[name]
    if v is not None and v % k:
      raise ValueError(f"training.{name}={v} must be a multiple of "
                       f"training.steps_per_dispatch={k}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       num_devices: int | None = None) -> TrainState:
  """Restores the latest checkpoint in `workdir` (or initializes), trains, logs, evaluates, saves.

  Re-running the same command in the same workdir resumes. Returns the final state.
  """
  t = config.training
  _check_intervals(t)
  mesh = parallel.make_mesh(num_devices)
  local_batch = parallel.check_batch_size(t.batch_size, mesh)
  model = models.build(config)
  sigmas = sigmas_from_config(config)
  loss_kwargs = loss_kwargs_from_config(config, model, sigmas)

  # The data source first: a missing dataset fails before anything is written to the workdir.
  train_iter = iterator_from_config(config, split=config.data.split, seed=config.seed,
                                    batch_size=local_batch)
  manager = checkpoint.create_manager(workdir, keep=t.keep_checkpoints,
                                      keep_every_steps=t.keep_every_steps,
                                      async_save=t.async_checkpoint)
  state = parallel.replicate(init_state(config, model), mesh)
  latest = checkpoint.latest_step(manager)
  if latest is not None:
    check_compatible(checkpoint.restore_config(manager, latest), config, workdir)
    state, data_state = checkpoint.restore(manager, latest, state)
    train_iter.set_state(data_state)
    if parallel.is_main_process():
      print(f"resumed from checkpoint {latest} in {workdir}")

  main = parallel.is_main_process()
  writer = MetricWriter(workdir) if main else None
  n_params = param_count(state.params)
  if main:
    print(f"model {config.model.name}: {n_params:,} parameters; {mesh.size} device(s), "
          f"global batch {t.batch_size}")

  k = t.steps_per_dispatch
  fused = None if k == 1 else k
  step_fn = step_fn_from_config(config, loss_kwargs)
  p_train_step = parallel.data_parallel(step_fn, mesh, fused_steps=fused)
  p_eval_step = parallel.data_parallel(lambda p, b, r: (p, eval_step(p, b, r, **loss_kwargs)),
                                       mesh, donate_state=False)
  run_rng = jax.random.key(config.seed)
  eval_rng = jax.random.fold_in(run_rng, 0xE7A1)
  config_json = config.to_json()

  step = int(jax.device_get(state.step))
  progress = _Progress(t.progress_bar, t.num_train_steps, step)
  history: list[dict] = []
  eval_batch = None
  window = parallel.DispatchWindow()
  last_log_time, last_log_step = time.time(), step

  def next_batch():
    if fused is None:
      return parallel.shard_batch(next(train_iter), mesh)
    rows = [next(train_iter) for _ in range(k)]
    return parallel.shard_batch({key: np.stack([r[key] for r in rows]) for key in rows[0]}, mesh,
                                fused_steps=k)

  def raise_if_nonfinite():
    # On the host: `device_get` only waits, where jnp.sum would queue more device programs.
    if history and float(np.sum(jax.device_get([h["nonfinite"] for h in history]))) > 0:
      good = checkpoint.latest_step(manager)
      raise TrainingError(
          f"non-finite loss or gradient between steps {last_log_step} and {step}; training "
          f"stopped and nothing was saved (last good checkpoint: {good} in {workdir}). "
          f"Lower optim.lr, set optim.grad_clip, or check the data range")

  try:
    while step < t.num_train_steps:
      state, metrics = p_train_step(state, next_batch(), run_rng)
      window.add(metrics)
      step += k
      history.append(metrics)
      progress.update(k)

      if step % t.log_every_steps == 0 or step == t.num_train_steps:
        raise_if_nonfinite()
        summary = _reduce_interval(history)
        now = time.time()
        summary["steps_per_sec"] = (step - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step, history = now, step, []
        per_level = {k: summary.pop(k) for k in list(summary) if k.endswith("_per_level")}
        if "loss_per_level" in per_level:
          summary.update(_level_scalars(per_level["loss_per_level"]))
        if "d_acc_fake_per_level" in per_level:
          summary.update(_level_scalars(per_level["d_acc_fake_per_level"], tag="d_acc_fake"))
        if writer:
          writer.write(step, summary, **{k: [None if math.isnan(v) else v for v in a.tolist()]
                                         for k, a in per_level.items()})
        progress.update(0, loss=f"{summary['loss']:.4g}")

      if t.eval_every_steps and step % t.eval_every_steps == 0:
        if eval_batch is None:
          eval_iter = iterator_from_config(config, split=config.data.eval_split,
                                           seed=config.seed + 1, batch_size=local_batch,
                                           shuffle=False)
          eval_batch = parallel.shard_batch(next(eval_iter), mesh)
        # Finished before the next step is launched (see parallel.MAX_STEPS_IN_FLIGHT).
        _, eval_metrics = jax.block_until_ready(
            p_eval_step(state.ema_params[0], eval_batch, eval_rng))
        if writer:
          writer.write(step, {"eval_loss_ema": eval_metrics["loss"]})

      if step % t.ckpt_every_steps == 0 or step == t.num_train_steps:
        raise_if_nonfinite()
        checkpoint.save(manager, step, state, data_state=train_iter.get_state(),
                        config_json=config_json)
  finally:
    progress.close()
    checkpoint.wait(manager)
    manager.close()
    if writer:
      writer.close()
  return state

