"""The config boundary: `build(config)` turns a validated config, once, into an `Experiment`.

Configs reaching it are checked by `config_schema.validate` (the CLI does so before any work);
nothing here repeats those checks. The `Experiment` is a frozen dataclass of plain values and
built objects, and the host loops (`train.py`, `sample.py`) take it, never a config:

- `model`, `sigmas` (the configured noise ladder), `example_shape`, `seed`, `config_json` (the
  config as an opaque JSON string, stored with checkpoints and exports);
- `data`: a `DataSpec`, the data group's values and its iterator factory (`DataSpec.iterator`);
- `train`: a `TrainSpec`, the training group's values, the optimizer, the step function with its
  keywords bound, the batches one step reads, and the initial (or abstract) state;
- `sampling`: a `SamplingSpec`, the sampling group's shared values and one `SamplerSpec` per
  sampler of `sampling.SAMPLERS` (function, initial state, keyword arguments);
- `eval`, `likelihood`: `EvalSpec`, `LikelihoodSpec`, those groups' values;
- `key(name)`: the run's named random streams (`rng_streams.STREAMS`).

The `*_from_config` functions are the pieces `build` assembles; old stored configs are read in
`stored_config`, the samplers assembled in `sampling`. `load_checkpoint` and `make_sampler` are
the notebook entry points (re-exported by `score_jax`).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from score_jax import (checkpoint, data, gan, models, noise, parallel, rng_streams, sampling,
                       steps, stored_config)
from score_jax.models import discriminator
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


# --------------------------------------------------------------------------------------------
# The Experiment and its parts.


def _group_values(cls, group: ml_collections.ConfigDict, **extra) -> Any:
  """`cls` (a spec dataclass) from the config group's fields of the same names."""
  names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]
  return cls(**{name: group[name] for name in names}, **extra)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The data group: which data, its layout and preprocessing; `iterator` reads it."""
  dataset: str
  toy_dim: int
  image_size: int
  num_channels: int
  data_dir: str | None
  manual_dir: str | None
  path: str | None
  split: str
  eval_split: str
  random_flip: bool
  uniform_dequantization: bool
  gaussian_dequantization: bool
  centered: bool
  num_workers: int
  prefetch: int

  @property
  def is_toy(self) -> bool:
    return data.is_toy(self.dataset)

  def iterator(self, *, split: str, seed: int, batch_size: int, shuffle: bool = True,
               per_process: bool = True) -> data.DataIterator:
    """Batches of `split`; each process reads its own shard unless `per_process=False` (then every
    process reads the same records, as reference statistics over all devices need)."""
    image_kwargs = {}
    if not self.is_toy:
      image_kwargs = dict(
          image_size=self.image_size, num_channels=self.num_channels, data_dir=self.data_dir,
          path=self.path, random_flip=self.random_flip and shuffle,
          uniform_dequantization=self.uniform_dequantization,
          gaussian_dequantization=self.gaussian_dequantization, centered=self.centered,
          num_workers=self.num_workers, prefetch=self.prefetch, shuffle=shuffle)
    return data.create_iterator(dataset=self.dataset, batch_size=batch_size, seed=seed,
                                shard_index=parallel.process_index() if per_process else 0,
                                shard_count=parallel.process_count() if per_process else 1,
                                toy_dim=self.toy_dim, split=split, **image_kwargs)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """The training group's values and what training is built from.

  `step_fn(state, batch, rng)` is the per-device step (plain or adversarial) with its keywords
  bound; `loss_kwargs` are the loss's keywords (`steps.eval_step` takes them too);
  `batches_per_step` the data batches one step reads (one per discriminator update when
  adversarial); `init_state()` a fresh state on the host (not yet placed on devices).
  """
  loss: str
  batch_size: int
  num_train_steps: int
  steps_per_dispatch: int
  log_every_steps: int
  eval_every_steps: int | None
  ckpt_every_steps: int
  keep_checkpoints: int
  keep_every_steps: int | None
  ema_decays: tuple[float, ...]
  distributed: bool
  async_checkpoint: bool
  progress_bar: bool
  adversarial: bool
  optimizer: optax.GradientTransformation
  loss_kwargs: Mapping[str, Any]
  step_fn: Callable[..., Any]
  batches_per_step: int
  init_state: Callable[[], TrainState | AdversarialState]

  def abstract_state(self, mesh: jax.sharding.Mesh) -> Any:
    """Shapes, dtypes and replicated shardings of `init_state()`, computed abstractly.

    A restore target needs no values: building one with `jax.eval_shape` traces the networks
    once instead of initializing them op by op (minutes for a RefineNet on a CPU).
    """
    return _abstract(self.init_state, mesh)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """One sampler as configured: its function, initial state and keyword arguments."""
  method: str
  fn: Callable[..., Any]
  init: str
  kwargs: Mapping[str, Any]

  def settings(self) -> dict[str, Any]:
    """What identifies a sampling run in records: method, init and the sampler's arguments."""
    return {"method": self.method, "init": self.init, **self.kwargs}


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
  """The sampling group's shared values and every sampler's `SamplerSpec` (`samplers`)."""
  method: str
  methods: tuple[str, ...]
  denoise: bool
  use_ema: bool
  init: str
  num_samples: int
  batch_size: int
  save_every_levels: int | None
  inpaint_examples: int
  samplers: Mapping[str, SamplerSpec]

  def sampler(self, method: str | None = None) -> SamplerSpec:
    """The spec of `method` (None: `sampling.method`)."""
    method = method or self.method
    if method not in self.samplers:
      raise ValueError(f"sampler {method!r} is unknown; use one of {', '.join(self.samplers)}")
    return self.samplers[method]

  def params(self, state: TrainState) -> Any:
    """The weights samplers use (`sampling.sampling_params`)."""
    return sampling.sampling_params(state, self.use_ema)


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """The eval group (`--mode=eval` and `--mode=sampler_sweep`)."""
  num_samples: int
  batch_size: int
  begin_step: int | None
  end_step: int | None
  features: str
  inception_weights: str | None
  mnist_classifier_weights: str | None
  reference_stats: str | None
  reference_split: str | None
  reference_num_images: int | None
  sweep_step_lrs: tuple[float, ...]
  sweep_steps_per_sigma: tuple[int, ...]
  sweep_methods: tuple[str, ...]
  sweep_denoise: tuple[bool, ...]
  sweep_num_steps: tuple[int, ...]
  sweep_rel_tols: tuple[float, ...]
  sweep_vmap: bool


@dataclasses.dataclass(frozen=True)
class LikelihoodSpec:
  """The likelihood group (`--mode=likelihood`)."""
  trace: str
  num_probes: int
  rtol: float
  atol: float
  num_examples: int
  repeats: int
  batch_size: int
  split: str


@dataclasses.dataclass(frozen=True, eq=False)
class Experiment:
  """A run, built once from its config (`build`): plain values and built objects."""
  name: str
  seed: int
  config_json: str
  model: nn.Module
  model_name: str
  sigmas: jax.Array
  example_shape: tuple[int, ...]
  data: DataSpec
  train: TrainSpec
  sampling: SamplingSpec
  eval: EvalSpec
  likelihood: LikelihoodSpec

  def key(self, name: str) -> jax.Array:
    """The run's key of random stream `name` (a top-level name of `rng_streams.STREAMS`)."""
    return rng_streams.key(self.seed, name)

  def parallel_sampler(self, method: str | None = None, *, mesh: jax.sharding.Mesh,
                       init: str | None = None, return_trajectory: bool = False,
                       save_every: int | None = None, grid: Mapping[str, Any] | None = None,
                       **overrides) -> sampling.ParallelSampler:
    """`sampling.make_parallel_sampler` of the configured sampler `method` (None:
    `sampling.method`); keyword `overrides` replace its configured arguments."""
    spec = self.sampling.sampler(method)
    unknown = sorted(set(overrides) - set(spec.kwargs))
    if unknown:
      raise ValueError(f"{', '.join(unknown)} is not an argument of the {spec.method} sampler; "
                       f"it takes {', '.join(spec.kwargs)}")
    return sampling.make_parallel_sampler(
        self.model, self.sigmas, self.example_shape, method=spec.method, mesh=mesh,
        init=init or spec.init, kwargs={**spec.kwargs, **overrides},
        return_trajectory=return_trajectory, save_every=save_every, grid=grid)


def build(config: ml_collections.ConfigDict) -> Experiment:
  """The `Experiment` of a validated config (`config_schema.validate`)."""
  model = models.build(config)
  sigmas = sigmas_from_config(config)
  loss_kwargs = loss_kwargs_from_config(config, model, sigmas)
  optimizer = optimizer_from_config(config)
  s = config.sampling
  samplers = {method: SamplerSpec(method, entry.fn, sampler_init(config, method),
                                  types.MappingProxyType(sampler_kwargs(config, method)))
              for method, entry in sampling.SAMPLERS.items()}
  train = _group_values(
      TrainSpec, config.training, ema_decays=tuple(config.training.ema_decays),
      adversarial=bool(config.adversarial.enabled), optimizer=optimizer,
      loss_kwargs=types.MappingProxyType(loss_kwargs),
      step_fn=step_fn_from_config(config, loss_kwargs),
      batches_per_step=batches_per_step(config),
      init_state=functools.partial(_fresh_state, **_state_kwargs(config, model, optimizer)))
  return Experiment(
      name=config.name, seed=int(config.seed), config_json=config.to_json(), model=model,
      model_name=config.model.name, sigmas=sigmas, example_shape=example_shape(config),
      data=_group_values(DataSpec, config.data),
      train=train,
      sampling=_group_values(SamplingSpec, s, methods=tuple(s.methods),
                             samplers=types.MappingProxyType(samplers)),
      eval=_group_values(EvalSpec, config.eval),
      likelihood=_group_values(LikelihoodSpec, config.likelihood))


# --------------------------------------------------------------------------------------------
# The pieces `build` assembles, each from its config group.


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
  """`DataSpec.iterator` of the config's data group."""
  return _group_values(DataSpec, config.data).iterator(
      split=split, seed=seed, batch_size=batch_size, shuffle=shuffle, per_process=per_process)


def example_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  d = config.data
  return data.example_batch_shape(d.dataset, toy_dim=d.toy_dim, image_size=d.image_size,
                                  num_channels=d.num_channels)


def discriminator_from_config(config: ml_collections.ConfigDict) -> nn.Module:
  a = config.adversarial
  return discriminator.build_discriminator(a.d_arch, ch=a.d_ch, resolution=config.data.image_size)


def _fresh_state(*, seed: int, model: nn.Module, example_shape: tuple[int, ...],
                 optimizer: optax.GradientTransformation, ema_decays: tuple[float, ...],
                 discriminator: tuple[nn.Module, optax.GradientTransformation] | None = None
                 ) -> TrainState | AdversarialState:
  """A fresh state on the host (not yet placed on devices); with a `(module, optimizer)`
  discriminator, both players of an adversarial run."""
  x_example = jnp.zeros((1, *example_shape), jnp.float32)
  init_rng = rng_streams.key(seed, "init")
  state = create_train_state(init_rng, model, x_example, optimizer, ema_decays)
  if discriminator is None:
    return state
  disc = create_discriminator_state(rng_streams.fold(init_rng, "init.discriminator"),
                                    discriminator[0], x_example, discriminator[1])
  return AdversarialState(score=state, disc=disc)


def _state_kwargs(config: ml_collections.ConfigDict, model: nn.Module,
                  optimizer: optax.GradientTransformation | None = None) -> dict[str, Any]:
  """`_fresh_state`'s keywords for `config` (plain values and built objects)."""
  a = config.adversarial
  discriminator = None
  if a.enabled:
    discriminator = (discriminator_from_config(config),
                     gan.adamp(a.d_lr, b1=a.d_beta1, b2=a.d_beta2))
  return dict(seed=int(config.seed), model=model, example_shape=example_shape(config),
              optimizer=optimizer or optimizer_from_config(config),
              ema_decays=tuple(config.training.ema_decays), discriminator=discriminator)


def init_state(config: ml_collections.ConfigDict, model: nn.Module
               ) -> TrainState | AdversarialState:
  """A fresh state on the host (not yet placed on devices); adversarial runs get both players
  (`TrainSpec.init_state` of `build(config)`)."""
  return _fresh_state(**_state_kwargs(config, model))


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


def _abstract(make_state: Callable[[], Any], mesh: jax.sharding.Mesh) -> Any:
  sharding = parallel.replicated_sharding(mesh)
  shapes = jax.eval_shape(make_state)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def abstract_state(config: ml_collections.ConfigDict, model, mesh: jax.sharding.Mesh) -> Any:
  """`TrainSpec.abstract_state` of `init_state(config, model)`."""
  return _abstract(lambda: init_state(config, model), mesh)


# --------------------------------------------------------------------------------------------
# Reading checkpoints; sampling from a notebook.


def load_checkpoint(workdir: str, step: int | None = None, *, allow_undigested: bool = False
                    ) -> tuple[ml_collections.ConfigDict, TrainState]:
  """Returns `(config, state)` of the checkpoint at `step` in `workdir`.

  The config is the stored one read onto today's schema (`stored_config.config_from_dict`); a
  reader applies its own overrides, validates, and builds its `Experiment` from it.

  Read-only: it never creates, deletes or renames anything, so it may run while training writes
  to `workdir`. With `step` None it restores the newest step that verifies against its digest,
  skipping (and reporting) damaged ones; a step the writer's rotation removes while it is read
  is replaced by the newest one. `allow_undigested` reads steps without a digest, unverified
  (checkpoints written before digests existed).
  """
  manager = checkpoint.open_reader(workdir)

  def read(s: int) -> tuple[ml_collections.ConfigDict, TrainState]:
    config = stored_config.config_from_dict(
        checkpoint.restore_config(manager, s, allow_undigested=allow_undigested))
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
  exp = build(config)
  try:
    p_sample = exp.parallel_sampler(method, mesh=parallel.make_mesh(), init=init,
                                    return_trajectory=return_trajectory, save_every=save_every,
                                    **overrides)
  except ValueError as e:
    raise ValueError(f"make_sampler: {e}") from None
  params = exp.sampling.params(state)
  batch = exp.sampling.batch_size

  def sample(rng: jax.Array, n: int, *, start: int = 0,
             on_batch: Callable[[int], None] | None = None):
    x, info = p_sample.draw(params, rng, n, batch_size=batch, start=start, on_batch=on_batch)
    return (x, info) if return_info or return_trajectory else x

  return sample
