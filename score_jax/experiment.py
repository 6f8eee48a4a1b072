"""The config boundary: the only module that turns a config into objects.

Configs reaching it are checked by `config_schema.validate` (the CLI does so before any work);
the functions here do not repeat those checks.

Noise ladder, optimizer, data iterator, model state, step function, sampler settings and the
checkpoint compatibility check are built here from a config; everything below (`noise`,
`losses`, `samplers`, `steps`, `models`, `parallel`, `checkpoint`) takes plain values. The host
loops (`train.py`, `sample.py`, `evaluate.py`) call this module and never each other.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from score_jax import (checkpoint, data, gan, models, noise, parallel, sampling, steps,
                       stored_config)
from score_jax.train_state import (AdversarialState, TrainState, create_discriminator_state,
                                   create_train_state)

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




def noise_distribution_from_config(config: ml_collections.ConfigDict
                                   ) -> noise.NoiseDistribution:
  """How training draws sigma: `noise.distribution` with its parameters."""
  n = config.noise
  return noise.NoiseDistribution(n.distribution, sigma_min=n.sigma_min, sigma_max=n.sigma_max,
                                 p_mean=n.p_mean, p_std=n.p_std)


def loss_kwargs_from_config(config: ml_collections.ConfigDict, model: nn.Module,
                            sigmas: jax.Array) -> dict[str, Any]:
  """The loss's keywords: for continuous noise, `sigmas` (the configured ladder) are the bins of
  the per-level metrics."""
  return dict(model=model, sigmas=sigmas, loss=config.training.loss,
              level_sampling=config.noise.level_sampling,
              weight_power=config.noise.weight_power,
              distribution=noise_distribution_from_config(config),
              weighting=config.noise.weighting, sigma_data=config.noise.sigma_data,
              global_batch_size=config.training.batch_size,
              ssm_projection=config.training.ssm_projection,
              ssm_num_projections=config.training.ssm_num_projections)


def sigmas_from_config(config: ml_collections.ConfigDict) -> jax.Array:
  """The configured ladder: the training levels of `noise.distribution="ladder"`; for continuous
  noise, the ladder ALS, CAS and PC step through (and the default ends of the other samplers)."""
  n = config.noise
  return noise.ladder(n.schedule, n.sigma_max, n.sigma_min, n.num_scales)


def optimizer_from_config(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  return make_optimizer(optimizer=o.optimizer, lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                        weight_decay=o.weight_decay, warmup_steps=o.warmup_steps,
                        grad_clip=o.grad_clip)


def iterator_from_config(config: ml_collections.ConfigDict, *, split: str, seed: int,
                         batch_size: int, shuffle: bool = True,
                         per_process: bool = True) -> data.DataIterator:
  """The config's data; each process reads its own shard unless `per_process=False` (then every
  process reads the same records, as reference statistics over all devices need)."""
  d = config.data
  image_kwargs = {}
  if not data.is_toy(d.dataset):
    image_kwargs = dict(
        image_size=d.image_size, num_channels=d.num_channels, data_dir=d.data_dir, path=d.path,
        random_flip=d.random_flip and shuffle, uniform_dequantization=d.uniform_dequantization,
        gaussian_dequantization=d.gaussian_dequantization, centered=d.centered,
        num_workers=d.num_workers, prefetch=d.prefetch, shuffle=shuffle)
  return data.create_iterator(dataset=d.dataset, batch_size=batch_size, seed=seed,
                              shard_index=parallel.process_index() if per_process else 0,
                              shard_count=parallel.process_count() if per_process else 1,
                              toy_dim=d.toy_dim,
                              split=split, **image_kwargs)


def example_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  d = config.data
  return data.example_batch_shape(d.dataset, toy_dim=d.toy_dim, image_size=d.image_size,
                                  num_channels=d.num_channels)


def discriminator_from_config(config: ml_collections.ConfigDict) -> nn.Module:
  from score_jax.models import discriminator
  a = config.adversarial
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
    return functools.partial(steps.train_step, ema_decays=ema_decays, **loss_kwargs)
  a = config.adversarial
  clamp = None
  if a.clamp and not data.is_toy(config.data.dataset):
    clamp = (-1.0, 1.0) if config.data.centered else (0.0, 1.0)
  return functools.partial(steps.adversarial_train_step, ema_decays=ema_decays,
                           d_model=discriminator_from_config(config), gan_loss=a.gan_loss,
                           lambda_dsm=a.lambda_dsm, lambda_g=a.lambda_g, lambda_d=a.lambda_d,
                           d_steps=a.d_steps, clamp=clamp, **loss_kwargs)


def batches_per_step(config: ml_collections.ConfigDict) -> int:
  """Data batches one training step consumes: one per discriminator update when adversarial."""
  return config.adversarial.d_steps if config.adversarial.enabled else 1


# --------------------------------------------------------------------------------------------
# Sampler settings.


def sampler_kwargs(config: ml_collections.ConfigDict, method: str | None = None) -> dict:
  """The plain keyword arguments of sampler `method` (default `sampling.method`).

  Returns:
    Its sub-group `sampling.<method>` as a dict, plus the shared `denoise` for the annealed
    samplers (ALS, CAS, PC).
  """
  s = config.sampling
  method = method or s.method
  if method not in sampling.SAMPLERS:
    raise ValueError(f"sampler {method!r} is unknown; use one of {', '.join(sampling.SAMPLERS)}")
  kwargs = s[method].to_dict()
  if sampling.SAMPLERS[method].kind == "annealed":
    kwargs["denoise"] = s.denoise
  return kwargs


def sampler_init(config: ml_collections.ConfigDict, method: str | None = None) -> str:
  """The initial state of sampler `method`: `sampling.init` for ALS and CAS, else the VE prior
  (`sampling.initial_state`)."""
  return sampling.initial_state(method or config.sampling.method, config.sampling.init)


def sampler_settings(config: ml_collections.ConfigDict, method: str | None = None) -> dict:
  """What identifies a sampling run in records: method, init and the sampler's arguments."""
  method = method or config.sampling.method
  return {"method": method, "init": sampler_init(config, method),
          **sampler_kwargs(config, method)}


def abstract_state(config: ml_collections.ConfigDict, model, mesh: jax.sharding.Mesh) -> Any:
  """Shapes, dtypes and replicated shardings of `init_state(config, model)`, computed abstractly.

  A restore target needs no values: building one with `jax.eval_shape` traces the networks once
  instead of initializing them op by op (minutes for a RefineNet on a CPU).
  """
  sharding = parallel.replicated_sharding(mesh)
  shapes = jax.eval_shape(lambda: init_state(config, model))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def load_checkpoint(workdir: str, step: int | None = None, *, allow_undigested: bool = False
                    ) -> tuple[ml_collections.ConfigDict, TrainState]:
  """Returns `(config, state)` of the checkpoint at `step` in `workdir`.

  Read-only: it never creates, deletes or renames anything, so it may run while training writes
  to `workdir`. With `step` None it restores the newest step that verifies against its digest,
  skipping (and reporting) damaged ones; a step the writer's rotation removes while it is read
  is replaced by the newest one. `allow_undigested` reads steps without a digest, unverified
  (checkpoints written before digests existed).
  """
  manager = checkpoint.open_reader(workdir)

  def read(s: int) -> tuple[ml_collections.ConfigDict, TrainState]:
    config = stored_config.config_from_dict(checkpoint.restore_config(manager, s,
                                                        allow_undigested=allow_undigested))
    template = abstract_state(config, models.build(config), parallel.make_mesh())
    return config, checkpoint.restore(manager, s, template,
                                      allow_undigested=allow_undigested)[0]

  try:
    found = checkpoint.restore_newest(manager, read, move_damaged=False, step=step,
                                      allow_undigested=allow_undigested)
  finally:
    manager.close()
  if found is None:
    raise checkpoint.CheckpointError(f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}; "
                                     "train first (python main.py --workdir=...)")
  return found[1]


def make_sampler(config: ml_collections.ConfigDict, state: TrainState, *,
                 method: str | None = None, init: str | None = None,
                 return_trajectory: bool = False, save_every: int | None = None,
                 return_info: bool = False,
                 **overrides) -> Callable[..., Any]:
  """`(rng, n) -> samples` with the configured weights and sampler, on all devices.

  Samples are drawn over every device of every host (`sampling.make_parallel_sampler`) in batches
  of `sampling.batch_size`; sample k's trajectory comes from the key folded from `(rng, k)`, so
  the samples do not depend on the device count or the batch size. The result is a host array
  `[n, ...]`. `sample(rng, n, start=s)` draws samples s..s+n-1 of the same sequence;
  `on_batch(count)` is called after each batch (progress bars).

  `method` (a key of `sampling.SAMPLERS`) and `init` replace the config's; keyword overrides
  replace the sampler's own arguments (`sampler_kwargs`: e.g. step_lr, steps_per_sigma, n_sigma,
  snr, corrector_steps, denoise, ladder, num_steps, s_churn, rel_tol); `return_info=True` makes
  it return `(samples, info)` with info["nfe"] (per sample `[n]` for the adaptive solver), and
  `return_trajectory=True` adds per-level statistics `[L']` averaged over the samples (x_std and
  noise_std are computed per sample, then averaged) and snapshots `[L' // save_every, n, ...]`.
  """
  method = method or config.sampling.method
  kwargs = sampler_kwargs(config, method)
  unknown = sorted(set(overrides) - set(kwargs))
  if unknown:
    raise ValueError(f"make_sampler: {', '.join(unknown)} is not an argument of the {method} "
                     f"sampler; it takes {', '.join(kwargs)}")
  p_sample = sampling.make_parallel_sampler(
      models.build(config), sigmas_from_config(config), example_shape(config), method=method,
      mesh=parallel.make_mesh(), init=init or sampler_init(config, method),
      kwargs={**kwargs, **overrides}, return_trajectory=return_trajectory, save_every=save_every)
  params = sampling.sampling_params(state, config.sampling.use_ema)
  batch = int(config.sampling.batch_size)

  def sample(rng: jax.Array, n: int, *, start: int = 0,
             on_batch: Callable[[int], None] | None = None):
    x, info = p_sample.draw(params, rng, n, batch_size=batch, start=start, on_batch=on_batch)
    return (x, info) if return_info or return_trajectory else x

  return sample
