"""Sampling from trained checkpoints and writing results.

`load_checkpoint(workdir, step)` and `make_sampler(config, state)` are the notebook entry points
(re-exported by `score_jax`). `sample_and_write` is what `main.py --mode=sample` (and the end of
training) runs: it samples with the configured sampler using the first EMA parameters and writes
`samples/<tag>.npz`, PNGs and sample-quality metrics into the workdir.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from score_jax import checkpoint, configs_dir, data, models, noise, parallel, plots, samplers, toy
from score_jax.metric_writers import MetricWriter
from score_jax.score import denoise, make_score_fn
from score_jax.train import example_shape, init_state, sigmas_from_config
from score_jax.train_state import TrainState

_METHOD_IDS = {"als": 1, "cas": 2, "pc": 3}
_DEFAULT_CONFIG = configs_dir() / "default.py"


def _default_config() -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("score_jax_default_config", _DEFAULT_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def config_from_dict(stored: dict) -> ml_collections.ConfigDict:
  """The schema of configs/default.py with the stored values written over it (locked, typed)."""
  config = _default_config()

  def assign(node: ml_collections.ConfigDict, values: dict, prefix: str):
    for key, value in values.items():
      if key not in node:
        continue
      if isinstance(value, dict):
        assign(node[key], value, f"{prefix}{key}.")
      else:
        if isinstance(node[key], tuple) and isinstance(value, list):
          value = tuple(value)
        node[key] = value

  assign(config, stored, "")
  return config


def load_checkpoint(workdir: str, step: int | None = None
                    ) -> tuple[ml_collections.ConfigDict, TrainState]:
  """Returns `(config, state)` of the checkpoint at `step` (latest if None) in `workdir`."""
  manager = checkpoint.create_manager(workdir, async_save=False)
  try:
    steps = checkpoint.all_steps(manager)
    if not steps:
      raise checkpoint.CheckpointError(f"no checkpoint in {os.path.abspath(workdir)}/checkpoints; "
                                       "train first (python main.py --workdir=...)")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise checkpoint.CheckpointError(f"no checkpoint at step {step} in {workdir}; "
                                       f"available steps: {steps}")
    config = config_from_dict(checkpoint.restore_config(manager, step))
    model = models.build(config)
    template = parallel.replicate(init_state(config, model), parallel.make_mesh())
    state, _ = checkpoint.restore(manager, step, template)
  finally:
    manager.close()
  return config, state


# --------------------------------------------------------------------------------------------


def make_sample_fn(model, sigmas: jax.Array, shape: tuple[int, ...], *, method: str,
                   step_lr: float, steps_per_sigma: int = 1, n_sigma: int = 1, snr: float = 0.16,
                   denoise: bool = True, init: str = "gaussian",
                   return_trajectory: bool = False, save_every: int | None = None,
                   ) -> Callable[..., Any]:
  """`sample(params, rng, n)` drawing `n` samples of `shape` with the named sampler (pure).

  `init`: "uniform" draws U[0, 1] as the NCSN image samplers do; "gaussian" draws the VE prior
  N(0, sigma_1^2 I). `sample(params, rng, n, step_lr=lr)` replaces the step size at call time
  (it may be traced, e.g. vmapped over a grid; CAS feasibility is then the caller's to check).
  """
  if method == "cas":
    noise.check_cas_step_lr(_cas_ladder(np.asarray(sigmas), n_sigma), step_lr)
  if method not in ("als", "cas", "pc"):
    raise ValueError(f"sampling.method={method!r} is unknown; use 'als', 'cas' or 'pc'")
  if init not in ("uniform", "gaussian"):
    raise ValueError(f"sampling.init={init!r} is unknown; use 'uniform' or 'gaussian'")
  extra = dict(denoise=denoise, return_trajectory=return_trajectory, save_every=save_every)

  def sample(params, rng, n, step_lr=step_lr):
    init_rng, rng = jax.random.split(rng)
    if init == "uniform":
      x0 = jax.random.uniform(init_rng, (n, *shape))
    else:
      x0 = sigmas[0] * jax.random.normal(init_rng, (n, *shape))
    score_fn = make_score_fn(model, params)
    if method == "als":
      return samplers.annealed_langevin(score_fn, x0, sigmas, rng, step_lr=step_lr,
                                        steps_per_sigma=steps_per_sigma, **extra)
    if method == "cas":
      return samplers.consistent_annealed(score_fn, x0, sigmas, rng, step_lr=step_lr,
                                          n_sigma=n_sigma, **extra)
    return samplers.predictor_corrector(score_fn, x0, sigmas, rng, snr=snr,
                                        corrector_steps=steps_per_sigma, **extra)

  return sample


def _cas_ladder(sigmas: np.ndarray, n_sigma: int) -> np.ndarray:
  if n_sigma == 1:
    return sigmas
  return np.geomspace(sigmas[0], sigmas[-1], (len(sigmas) - 1) * n_sigma + 1)


def sampler_kwargs(config: ml_collections.ConfigDict, method: str | None = None) -> dict:
  s = config.sampling
  method = method or s.method
  step_lr = s.cas_step_lr if (method == "cas" and method != s.method) else s.step_lr
  return dict(method=method, step_lr=step_lr, steps_per_sigma=s.steps_per_sigma,
              n_sigma=s.n_sigma, snr=s.snr, denoise=s.denoise, init=s.init)


def make_sampler(config: ml_collections.ConfigDict, state: TrainState, *,
                 method: str | None = None, **overrides) -> Callable[[jax.Array, int], jax.Array]:
  """A jit-compiled `(rng, n) -> samples` with the first EMA params and the configured sampler.

  `method` ("als", "cas", "pc") and keyword overrides (step_lr, denoise, ...) replace the config's
  sampling settings; `return_trajectory=True` makes it return `(samples, trajectory)`.
  """
  model = models.build(config)
  kwargs = sampler_kwargs(config, method)
  kwargs.update(overrides)
  fn = make_sample_fn(model, sigmas_from_config(config), example_shape(config), **kwargs)
  jitted = jax.jit(fn, static_argnums=2)
  params = state.ema_params[0]
  return lambda rng, n: jitted(params, rng, n)


# --------------------------------------------------------------------------------------------


def _draw(sample_fn, num: int, batch: int, rng: jax.Array):
  """Draws `num` samples in batches of `batch`; concatenates outputs (and first trajectory)."""
  outs, trajectory = [], None
  for i in range(-(-num // batch)):
    out = sample_fn(jax.random.fold_in(rng, i), min(batch, num - i * batch))
    if isinstance(out, tuple):
      out, aux = out
      trajectory = trajectory if trajectory is not None else jax.device_get(aux)
    outs.append(np.asarray(out))
  return np.concatenate(outs), trajectory


def toy_metrics(samples: np.ndarray, distribution: Any, rng: jax.Array) -> dict[str, Any]:
  """Sample-quality metrics of a toy: MMD, energy distance, and mixture mode weights."""
  reference = np.asarray(distribution.sample(rng, min(len(samples), 4000)))
  x = samples[:4000]
  out = {"mmd_rbf": float(toy.mmd_rbf(x, reference)),
         "energy_distance": float(toy.energy_distance(x, reference)),
         "finite_fraction": float(np.isfinite(samples).all(axis=1).mean())}
  means = getattr(distribution, "means", None)
  if means is not None:
    out["mode_weights"] = np.asarray(toy.mode_weights(samples, np.asarray(means))).tolist()
    out["true_mode_weights"] = np.asarray(distribution.weights).tolist()
  return out


def sample_and_write(config: ml_collections.ConfigDict, state: TrainState, workdir: str, *,
                     methods: tuple[str, ...] | None = None) -> dict[str, dict]:
  """Samples with each method, writes npz/PNGs/metrics under `workdir`, returns the metrics."""
  s = config.sampling
  if methods is None:
    methods = (s.method,) + (("cas",) if s.also_cas and s.method != "cas" else ())
  out_dir = os.path.join(workdir, "samples")
  main = parallel.is_main_process()
  if main:
    os.makedirs(out_dir, exist_ok=True)
  step = int(jax.device_get(state.step))
  rng = jax.random.fold_in(jax.random.key(config.seed), 0x5A3)
  is_toy = data.is_toy(config.data.dataset)
  results, all_samples, trajectories = {}, {}, {}
  # Images keep the last Langevin iterate too: the sampler runs without its final denoising
  # step and `_denoise_in_batches` applies the same x + sigma_L^2 s(x, sigma_L) afterwards.
  denoise_after = not is_toy and s.denoise
  for method in methods:
    sample_fn = make_sampler(config, state, method=method, return_trajectory=True,
                             save_every=s.save_every_levels,
                             **({"denoise": False} if denoise_after else {}))
    samples, trajectory = _draw(sample_fn, s.num_samples, s.batch_size,
                                jax.random.fold_in(rng, _METHOD_IDS[method]))
    raw = None
    if denoise_after:
      raw, samples = samples, _denoise_in_batches(config, state, samples, s.batch_size)
    tag = f"{method}_step{step}"
    all_samples[method], trajectories[method] = samples, trajectory
    metrics = {"method": method, "step": step, "num_samples": int(len(samples)),
               **sampler_kwargs(config, method)}
    if is_toy:
      distribution = toy.get_toy(config.data.dataset, dim=config.data.toy_dim)
      metrics.update(toy_metrics(samples, distribution, jax.random.fold_in(rng, 7)))
    results[method] = metrics
    if main:
      np.savez_compressed(os.path.join(out_dir, f"{tag}.npz"), x=samples,
                          sigmas=np.asarray(sigmas_from_config(config)),
                          **({"x_before_denoising": raw} if raw is not None else {}))
      if not is_toy:
        if raw is not None:
          plots.save_image_grid(raw[:64], os.path.join(out_dir, f"{tag}_grid.png"),
                                centered=config.data.centered)
          plots.save_image_grid(samples[:64], os.path.join(out_dir, f"{tag}_denoised_grid.png"),
                                centered=config.data.centered)
        else:
          plots.save_image_grid(samples[:64], os.path.join(out_dir, f"{tag}_grid.png"),
                                centered=config.data.centered)
        saved = (trajectory or {}).get("samples")
        if saved is not None:
          plots.save_intermediates(np.asarray(saved)[:, :8],
                                   os.path.join(out_dir, f"{tag}_intermediates.png"),
                                   centered=config.data.centered)
  if not is_toy and s.inpaint_examples:
    x_known = _test_images(config, s.inpaint_examples)
    inpaint_and_write(config, state, workdir, x_known, right_half_mask(x_known.shape))
  if main:
    if is_toy:
      distribution = toy.get_toy(config.data.dataset, dim=config.data.toy_dim)
      truth = np.asarray(distribution.sample(jax.random.fold_in(rng, 11), s.num_samples))
      plots.save_toy_comparison(truth, all_samples,
                                os.path.join(out_dir, f"comparison_step{step}.png"))
    plots.save_trajectories(trajectories, os.path.join(out_dir, f"trajectory_step{step}.png"))
    writer = MetricWriter(workdir, name="sample_metrics", tensorboard=False)
    for method, m in results.items():
      writer.write(step, {}, **{k: v for k, v in m.items() if k != "step"})
    writer.close()
    with open(os.path.join(out_dir, f"metrics_step{step}.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results


def _denoise_in_batches(config: ml_collections.ConfigDict, state: TrainState, x: np.ndarray,
                        batch_size: int) -> np.ndarray:
  """x + sigma_L^2 s(x, sigma_L) (Tweedie's formula at the smallest level), batch by batch."""
  score_fn = make_score_fn(models.build(config), state.ema_params[0])
  sigma_min = float(sigmas_from_config(config)[-1])
  fn = jax.jit(lambda xb: denoise(score_fn, xb, sigma_min))
  return np.concatenate([np.asarray(fn(x[i:i + batch_size]))
                         for i in range(0, len(x), batch_size)])


def _test_images(config: ml_collections.ConfigDict, n: int) -> np.ndarray:
  """The first `n` images of the evaluation split (no shuffling, flips or dequantization)."""
  from score_jax.train import iterator_from_config
  it = iterator_from_config(config, split=config.data.eval_split, seed=config.seed, batch_size=n,
                            shuffle=False)
  return np.asarray(next(it)["x"])


def right_half_mask(shape: tuple[int, ...]) -> np.ndarray:
  """1 on the left half of each image (kept), 0 on the right half (to inpaint); `[b, h, w, c]`."""
  mask = np.ones(shape, np.float32)
  mask[:, :, shape[2] // 2:] = 0.0
  return mask


def inpaint_and_write(config: ml_collections.ConfigDict, state: TrainState, workdir: str,
                      x_known: np.ndarray, mask: np.ndarray, *, method: str | None = None
                      ) -> np.ndarray:
  """Completes `x_known` where `mask` is 0 with ALS/CAS and writes an inpainting grid."""
  kwargs = sampler_kwargs(config, method)
  model = models.build(config)
  sigmas = sigmas_from_config(config)
  score_fn = make_score_fn(model, state.ema_params[0])
  rng = jax.random.fold_in(jax.random.key(config.seed), 0x1AA)
  x0 = jax.random.uniform(rng, x_known.shape) if kwargs["init"] == "uniform" else (
      sigmas[0] * jax.random.normal(rng, x_known.shape))
  if kwargs["method"] == "cas":
    run = jax.jit(lambda x0, r: samplers.consistent_annealed(
        score_fn, x0, sigmas, r, step_lr=kwargs["step_lr"], denoise=kwargs["denoise"],
        n_sigma=kwargs["n_sigma"], mask=jnp.asarray(mask), x_known=jnp.asarray(x_known)))
  else:
    run = jax.jit(lambda x0, r: samplers.annealed_langevin(
        score_fn, x0, sigmas, r, step_lr=kwargs["step_lr"],
        steps_per_sigma=kwargs["steps_per_sigma"], denoise=kwargs["denoise"],
        mask=jnp.asarray(mask), x_known=jnp.asarray(x_known)))
  completed = np.asarray(run(x0, jax.random.fold_in(rng, 1)))
  if parallel.is_main_process():
    step = int(jax.device_get(state.step))
    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    plots.save_inpainting_grid(x_known * mask, completed,
                               os.path.join(out_dir, f"inpainting_step{step}.png"),
                               centered=config.data.centered)
  return completed
