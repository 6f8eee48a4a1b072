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
import numpy as np
import optax

from score_jax import (checkpoint, data, gan, models, noise, parallel, samplers, steps,
                       stored_config)
from score_jax.score import make_score_fn
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


# The samplers a config can name. Each takes the keyword arguments of its sub-group
# `config.sampling.<method>`; the annealed samplers also take the shared `sampling.denoise`, and
# the ODE samplers' sub-groups also choose the ladder they step through (`sampling_ladder`).
SAMPLERS = {"als": samplers.annealed_langevin, "cas": samplers.consistent_annealed,
            "pc": samplers.predictor_corrector, "euler": samplers.euler, "heun": samplers.heun,
            "dpm_solver_pp_2m": samplers.dpm_solver_pp_2m, "adaptive": samplers.adaptive}
ANNEALED_SAMPLERS = ("als", "cas", "pc")  # step through the trained ladder; keep trajectories.
ODE_SAMPLERS = ("euler", "heun", "dpm_solver_pp_2m")  # step through `sampling_ladder`, end at 0.
LADDERS = ("trained", "geometric", "karras")
_LADDER_KEYS = ("ladder", "num_steps", "rho", "sigma_max", "sigma_min")


def sampler_kwargs(config: ml_collections.ConfigDict, method: str | None = None) -> dict:
  """The plain keyword arguments of sampler `method` (default `sampling.method`).

  Returns:
    Its sub-group `sampling.<method>` as a dict, plus the shared `denoise` for the annealed
    samplers (ALS, CAS, PC).
  """
  s = config.sampling
  method = method or s.method
  if method not in SAMPLERS:
    raise ValueError(f"sampler {method!r} is unknown; use one of {', '.join(SAMPLERS)}")
  kwargs = s[method].to_dict()
  if method in ANNEALED_SAMPLERS:
    kwargs["denoise"] = s.denoise
  return kwargs


def sampler_init(config: ml_collections.ConfigDict, method: str | None = None) -> str:
  """The initial state of sampler `method`: `sampling.init` for ALS and CAS, else the VE prior.

  ALS and CAS are Markov chains whose image configs start from U[0, 1] in the reference code
  (ermongroup/ncsn `anneal_runner.py`, ermongroup/ncsnv2 `runners/ncsn_runner.py`). The other
  samplers discretize the reverse VE SDE or its probability-flow ODE from sigma_max, whose marginal
  they assume at the start: the prior N(0, sigma_max^2 I) (Song et al. 2021, score_sde
  `sde_lib.py` `prior_sampling`; Karras et al. 2022, Algorithm 2, line 1; Jolicoeur-Martineau et
  al. 2021, Algorithm 1). A deterministic ODE sampler started from U[0, 1] would carry that
  mismatch into every sample.
  """
  method = method or config.sampling.method
  return config.sampling.init if method in ("als", "cas") else "gaussian"


def sampler_settings(config: ml_collections.ConfigDict, method: str | None = None) -> dict:
  """What identifies a sampling run in records: method, init and the sampler's arguments."""
  method = method or config.sampling.method
  return {"method": method, "init": sampler_init(config, method),
          **sampler_kwargs(config, method)}


def sampling_params(config: ml_collections.ConfigDict, state: TrainState) -> Any:
  """The weights samplers use: the first EMA (`sampling.use_ema`, the NCSNv2 convention) or the
  raw parameters (NCSN v1 keeps no EMA, ermongroup/ncsn `anneal_runner.py`)."""
  return state.ema_params[0] if config.sampling.use_ema else state.params


def sampling_ladder(sigmas: jax.Array, *, ladder: str = "trained", num_steps: int | None = None,
                    rho: float = 7.0, sigma_max: float | None = None,
                    sigma_min: float | None = None) -> jax.Array:
  """The descending ladder `[N]` a fixed-step ODE sampler steps through (then to sigma = 0).

  Args:
    sigmas: `[L]` the trained ladder (concrete).
    ladder: "trained" (the trained ladder itself), "geometric" (`num_steps` levels spaced
      geometrically) or "karras" (EDM's rho-schedule, Karras et al. 2022, Eq. 5).
    num_steps: N for "geometric" and "karras"; must be None for "trained".
    rho: the exponent of "karras".
    sigma_max, sigma_min: the ends of "geometric" and "karras"; None: the trained ones.
  """
  if ladder not in LADDERS:
    raise ValueError(f"ladder={ladder!r} is unknown; use one of {', '.join(LADDERS)}")
  if ladder == "trained":
    if num_steps is not None or sigma_max is not None or sigma_min is not None:
      raise ValueError("ladder='trained' steps through the trained sigmas: leave num_steps, "
                       "sigma_max and sigma_min None, or choose ladder='geometric' or 'karras'")
    return jnp.asarray(sigmas, jnp.float32)
  if num_steps is None:
    raise ValueError(f"ladder={ladder!r} needs num_steps (the number of levels, >= 2)")
  hi = float(sigmas[0]) if sigma_max is None else float(sigma_max)
  lo = float(sigmas[-1]) if sigma_min is None else float(sigma_min)
  if ladder == "geometric":
    return noise.geometric_sigmas(hi, lo, num_steps)
  return noise.karras_sigmas(hi, lo, num_steps, rho)


def make_sample_fn(model, sigmas: jax.Array, shape: tuple[int, ...], *, method: str,
                   init: str = "gaussian", return_trajectory: bool = False,
                   save_every: int | None = None, return_info: bool = False,
                   **kwargs) -> Callable[..., Any]:
  """`sample(params, rng, n)` drawing `n` samples of `shape` with the named sampler (pure).

  `rng` is either one key (shape `()`: the batch's noise is drawn together, the fastest path) or
  a batch of per-example keys `[b]` (then `n` may be None): example i's initial state and its
  noise at every step come only from `rng[i]`, so a sample does not depend on the batch it is
  drawn in (the convention of EDM, Karras et al. 2022). With per-example keys the trajectory
  statistics and snapshots of `return_trajectory`/`save_every` are per example (leading axis b),
  and the predictor-corrector's step size uses each example's own norms instead of batch means.

  Args:
    model: the score network.
    sigmas: `[L]` descending noise ladder the network was trained on.
    shape: shape of one sample.
    method: a key of `SAMPLERS`.
    init: "uniform" draws U[0, 1] as the NCSN image samplers do; "gaussian" draws the VE prior
      N(0, sigma_start^2 I) with sigma_start the first level the sampler steps through (the
      trained sigma_1, or the sub-group's `sigma_max`).
    return_trajectory, save_every: passed to the annealed samplers (ALS, CAS, PC); the others
      keep no per-level statistics and ignore them.
    return_info: return `(samples, info)` with info["nfe"] (network evaluations per sample;
      `[n]` for the adaptive solver). `return_trajectory` implies it.
    **kwargs: the sampler's own keyword arguments (`sampler_kwargs`).

  `sample(params, rng, n, **changes)` replaces sampler arguments at call time (they may be traced,
  e.g. a vmapped `step_lr` grid; CAS feasibility is then the caller's to check).
  """
  if method not in SAMPLERS:
    raise ValueError(f"sampling.method={method!r} is unknown; use one of {', '.join(SAMPLERS)}")
  if init not in ("uniform", "gaussian"):
    raise ValueError(f"sampling.init={init!r} is unknown; use 'uniform' or 'gaussian'")
  kwargs = dict(kwargs)
  if method == "cas" and kwargs.get("step_lr") is not None:
    noise.check_cas_step_lr(np.asarray(samplers.cas_ladder(sigmas, kwargs.get("n_sigma", 1))),
                            kwargs["step_lr"])
  if method == "cas" and kwargs.get("eta") is not None:
    eta = np.asarray(kwargs["eta"], np.float32)
    kwargs["eta"] = float(eta.reshape(())) if eta.size == 1 else tuple(eta.tolist())
    samplers.check_cas_eta(np.asarray(samplers.cas_ladder(sigmas, kwargs.get("n_sigma", 1))),
                           np.asarray(kwargs["eta"]), "eta")
  for unbounded in ("s_tmax", "h_max_factor"):  # None in the config: the sampler's default, inf
    if unbounded in kwargs and kwargs[unbounded] is None:
      del kwargs[unbounded]
  ladder, start = sigmas, sigmas[0]
  if method in ANNEALED_SAMPLERS:
    options = dict(return_trajectory=return_trajectory, save_every=save_every,
                   return_info=return_info)
  else:
    options = dict(return_info=return_info or return_trajectory)
  if method in ODE_SAMPLERS:
    ladder = sampling_ladder(sigmas, **{k: kwargs.pop(k) for k in _LADDER_KEYS if k in kwargs})
    start = ladder[0]
  elif method == "adaptive":
    for end, default in (("sigma_max", sigmas[0]), ("sigma_min", sigmas[-1])):
      kwargs[end] = float(default) if kwargs.get(end) is None else float(kwargs[end])
    start = kwargs["sigma_max"]
  sampler = SAMPLERS[method]
  # One example per program under vmap where a batch would couple examples: PC's step size
  # (batch-mean norms) and the trajectory statistics (batch means) are then per example.
  one_at_a_time = return_trajectory or save_every is not None or method == "pc"

  def init_state(rng, n):
    if init == "uniform":
      return jax.random.uniform(rng, (n, *shape))
    return start * jax.random.normal(rng, (n, *shape))

  def draw(params, x0, rng, changes):
    args = {**kwargs, **changes, **options}
    score_fn = make_score_fn(model, params)
    if method == "adaptive":
      return sampler(score_fn, x0, rng, **args)
    return sampler(score_fn, x0, ladder, rng, **args)

  def per_example(params, keys, changes):
    pairs = jax.vmap(jax.random.split)(keys)
    x0 = jax.vmap(lambda k: init_state(k, 1)[0])(pairs[:, 0])
    if not one_at_a_time:
      return draw(params, x0, pairs[:, 1], changes)
    nfe = []

    def one(x, key):
      out = draw(params, x[None], key[None], changes)
      if not isinstance(out, tuple):
        return out[0]
      x, info = out
      if isinstance(info["nfe"], jax.Array):  # per-example counts (adaptive): out through vmap
        info["nfe"] = info["nfe"].reshape(())
      else:  # one static count for every example
        nfe.append(info.pop("nfe"))
      if "samples" in info:
        info["samples"] = info["samples"][:, 0]
      return x[0], info

    out = jax.vmap(one)(x0, pairs[:, 1])
    return (out[0], {**out[1], "nfe": nfe[0]}) if nfe else out

  def sample(params, rng, n=None, **changes):
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
      raise ValueError("sample: rng must be a typed key (jax.random.key) or a batch of them, "
                       f"got dtype {rng.dtype}")
    if rng.ndim == 1:
      if n is not None and n != rng.shape[0]:
        raise ValueError(f"sample: n={n} differs from the {rng.shape[0]} per-example keys")
      return per_example(params, rng, changes)
    if rng.ndim != 0 or n is None:
      raise ValueError(f"sample: rng must be one key with n given, or keys [b]; got shape "
                       f"{rng.shape}, n={n}")
    init_rng, rng = jax.random.split(rng)
    return draw(params, init_state(init_rng, n), rng, changes)

  return sample


class NonFiniteSamplesError(RuntimeError):
  """Every sample drawn is non-finite (NaN or infinite): no metric can be computed on them."""


def finite_rows(x: np.ndarray) -> np.ndarray:
  """`[b]` bool: whether each sample of `x` `[b, ...]` is finite everywhere."""
  x = np.asarray(x)
  return np.isfinite(x.reshape(len(x), -1)).all(axis=1)


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

  Samples are drawn over every device of every host (`parallel.shard_sampler`) in batches of
  `sampling.batch_size`; sample k's trajectory comes from the key folded from `(rng, k)`, so the
  samples do not depend on the device count or the batch size. The result is a host array
  `[n, ...]`. `sample(rng, n, start=s)` draws samples s..s+n-1 of the same sequence;
  `on_batch(count)` is called after each batch (progress bars).

  `method` (a key of `SAMPLERS`) and `init` replace the config's; keyword overrides replace the
  sampler's own arguments (`sampler_kwargs`: e.g. step_lr, steps_per_sigma, n_sigma, snr,
  corrector_steps, denoise, ladder, num_steps, s_churn, rel_tol); `return_info=True` makes it
  return `(samples, info)` with info["nfe"] (the mean per sample for the adaptive solver), and
  `return_trajectory=True` adds per-level statistics `[L']` averaged over the samples (x_std and
  noise_std are computed per sample, then averaged) and snapshots `[L' // save_every, n, ...]`.
  """
  method = method or config.sampling.method
  kwargs = sampler_kwargs(config, method)
  unknown = sorted(set(overrides) - set(kwargs))
  if unknown:
    raise ValueError(f"make_sampler: {', '.join(unknown)} is not an argument of the {method} "
                     f"sampler; it takes {', '.join(kwargs)}")
  kwargs.update(overrides)
  fn = make_sample_fn(models.build(config), sigmas_from_config(config), example_shape(config),
                      method=method, init=init or sampler_init(config, method),
                      return_trajectory=return_trajectory, save_every=save_every,
                      return_info=return_info, **kwargs)
  per_sample = {}

  def arrays_only(params, keys):
    out = fn(params, keys)
    if isinstance(out, tuple):
      x, info = out
      if isinstance(info.get("nfe"), int):  # a count per sample, not a per-example array
        per_sample["nfe"] = info.pop("nfe")
      return x, info
    return out

  p_sample = parallel.shard_sampler(arrays_only, parallel.make_mesh())
  params = sampling_params(config, state)
  batch = int(config.sampling.batch_size)

  def sample(rng: jax.Array, n: int, *, start: int = 0,
             on_batch: Callable[[int], None] | None = None):
    b = min(batch, n)
    parts = []
    for first in range(start, start + n, b):
      parts.append(p_sample(params, rng, first, b))
      if on_batch is not None:
        on_batch(min(b, start + n - first))
    out = jax.tree.map(lambda *v: np.concatenate(v)[:n], *parts)
    if not isinstance(out, tuple):
      return out
    x, info = out
    # Per-example trajectories as the samplers' batch layout: statistics averaged over the
    # samples `[L']`, snapshots `[L' // save_every, n, ...]`; per-sample counts (the adaptive
    # solver's nfe, accepted and rejected steps) stay `[n]`.
    info = {k: np.swapaxes(v, 0, 1) if k == "samples" else
            (np.mean(v, axis=0) if np.ndim(v) >= 2 else v) for k, v in info.items()}
    return x, {**info, **per_sample}

  return sample
