"""Sampling from a trained state and writing results: the sample mode's host loop.

`sample_and_write(exp, state, workdir)` is what `main.py --mode=sample` (and the end of training)
runs, on the `experiment.Experiment` the CLI built: it samples with each sampler of
`sampling.methods` using the first EMA parameters over all devices of all hosts (sample k from
the key folded from (seed, k), so the samples do not depend on the device count or
`sampling.batch_size`), with a progress bar, and writes `samples/<tag>.npz`, PNGs and
sample-quality metrics into the workdir. The notebook entry points are
`score_jax.load_checkpoint` and `score_jax.make_sampler` (`experiment.py`).
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from score_jax import parallel, paths, plots, progress, rng_streams, sampling, toy
from score_jax.config_schema import sampler_fix_hint
from score_jax.experiment import Experiment
from score_jax.metric_writers import MetricWriter
from score_jax.score import denoise, make_score_fn
from score_jax.train_state import TrainState

# Samples whose trajectory statistics and snapshots are kept (the first ones of the sequence).
_TRAJECTORY_SAMPLES = 64


def _draw(exp: Experiment, state: TrainState, method: str, num: int, rng: jax.Array,
          **overrides) -> tuple[np.ndarray, dict | None, float | None]:
  """`num` samples over all devices, and the trajectory of the first `_TRAJECTORY_SAMPLES`.

  Sample k comes from the key folded from `(rng, k)` whichever sampler draws it, so the samples
  drawn with trajectories are those the plain sampler would draw.

  Returns:
    `(samples [num, ...], trajectory, nfe)`: per-level statistics averaged over the traced
    samples (`[L']` each) and snapshots `[L' // save_every, t, ...]` of them (None for samplers
    that keep none), and the mean number of network evaluations per sample.
  """
  s = exp.sampling
  params = s.params(state)
  traced = min(num, _TRAJECTORY_SAMPLES)
  with progress.bar(num, f"sample {method}") as pbar:
    first, info = exp.parallel_sampler(
        method, mesh=parallel.make_mesh(), return_trajectory=True, save_every=s.save_every_levels,
        **overrides).draw(params, rng, traced, batch_size=s.batch_size, on_batch=pbar.update)
    rest = []
    if num > traced:
      rest = [exp.parallel_sampler(method, mesh=parallel.make_mesh(), **overrides).draw(
          params, rng, num - traced, batch_size=s.batch_size, start=traced,
          on_batch=pbar.update)[0]]
  nfe = info.pop("nfe", None)
  nfe = None if nfe is None else float(np.mean(nfe))
  return np.concatenate([first, *rest]), (info if "sigma" in info else None), nfe


def sample_and_write(exp: Experiment, state: TrainState, workdir: str, *,
                     methods: tuple[str, ...] | None = None) -> dict[str, dict]:
  """Samples with each method (None: `sampling.methods`), writes npz/PNGs/metrics under
  `workdir`, returns the metrics."""
  s = exp.sampling
  methods = tuple(s.methods) if methods is None else methods
  out_dir = paths.join(workdir, "samples")
  main = parallel.is_main_process()
  if main:
    paths.makedirs(out_dir)
  step = int(jax.device_get(state.step))
  rng = exp.key("sample")
  is_toy = exp.data.is_toy
  centered = exp.data.centered
  results, all_samples, trajectories = {}, {}, {}
  # Images keep the last Langevin iterate too: the sampler runs without its final denoising
  # step and `_denoise_in_batches` applies the same x + sigma_L^2 s(x, sigma_L) afterwards.
  denoise_after = not is_toy and s.denoise
  for method in methods:
    shared_denoise = denoise_after and method in sampling.ANNEALED_SAMPLERS
    samples, trajectory, nfe = _draw(exp, state, method, s.num_samples,
                                     jax.random.fold_in(rng, sampling.SAMPLERS[method].stream),
                                     **({"denoise": False} if shared_denoise else {}))
    raw = None
    if shared_denoise:
      raw, samples = samples, _denoise_in_batches(exp, state, samples, s.batch_size)
    tag = f"{method}_step{step}"
    # Metrics use the finite samples only; none finite is an error, some a warning.
    finite = sampling.finite_rows(samples)
    if not finite.any():
      raise sampling.NonFiniteSamplesError(
          f"all {len(samples)} samples of {method} at step {step} are non-finite "
          f"({dict(s.sampler(method).kwargs)}); none written for it. "
          f"{sampler_fix_hint(method).capitalize()} or check the checkpoint")
    if not finite.all() and main:
      print(f"warning: {1 - finite.mean():.1%} of the {method} samples are non-finite; metrics "
            "use the finite ones", file=sys.stderr)
    all_samples[method], trajectories[method] = samples, trajectory
    metrics = {"step": step, "num_samples": int(len(samples)),
               "nfe": None if nfe is None else nfe + int(shared_denoise),
               **s.sampler(method).settings()}
    if is_toy:
      distribution = toy.get_toy(exp.data.dataset, dim=exp.data.toy_dim)
      metrics.update(toy.sample_metrics(samples[finite], distribution,
                                        rng_streams.fold(rng, "sample.toy_metrics")))
    metrics["finite_fraction"] = float(finite.mean())
    results[method] = metrics
    if main:
      paths.save_npz(paths.join(out_dir, f"{tag}.npz"), compressed=True, x=samples,
                     sigmas=np.asarray(exp.sigmas),
                     **({"x_before_denoising": raw} if raw is not None else {}))
      if not is_toy:
        if raw is not None:
          plots.save_image_grid(raw[:64], paths.join(out_dir, f"{tag}_grid.png"),
                                centered=centered)
          plots.save_image_grid(samples[:64], paths.join(out_dir, f"{tag}_denoised_grid.png"),
                                centered=centered)
        else:
          plots.save_image_grid(samples[:64], paths.join(out_dir, f"{tag}_grid.png"),
                                centered=centered)
        saved = (trajectory or {}).get("samples")
        if saved is not None:
          plots.save_intermediates(np.asarray(saved)[:, :8],
                                   paths.join(out_dir, f"{tag}_intermediates.png"),
                                   centered=centered)
  if not is_toy and s.inpaint_examples:
    x_known = _test_images(exp, s.inpaint_examples)
    inpaint_and_write(exp, state, workdir, x_known, right_half_mask(x_known.shape))
  if main:
    if is_toy:
      distribution = toy.get_toy(exp.data.dataset, dim=exp.data.toy_dim)
      truth = np.asarray(distribution.sample(rng_streams.fold(rng, "sample.toy_truth"),
                                             s.num_samples))
      plots.save_toy_comparison(truth, all_samples,
                                paths.join(out_dir, f"comparison_step{step}.png"),
                                nfe={m: r["nfe"] for m, r in results.items()})
    plots.save_trajectories(trajectories, paths.join(out_dir, f"trajectory_step{step}.png"))
    writer = MetricWriter(workdir, name="sample_metrics")
    for method, m in results.items():
      writer.write(step, {}, **{k: v for k, v in m.items() if k != "step"})
    # This step's PNGs (grids, comparison, trajectories) in TensorBoard beside the scalars.
    # Read back by name through `paths` (a glob's path objects do not round-trip gs:// URLs).
    names = sorted(p.name for p in paths.as_path(out_dir).glob(f"*step{step}*.png"))
    writer.write_images(step, {f"samples/{n.replace(f'_step{step}', '').removesuffix('.png')}":
                               _read_bytes(paths.join(out_dir, n)) for n in names})
    writer.close()
    paths.write_text(paths.join(out_dir, f"metrics_step{step}.json"),
                     json.dumps(results, indent=2))
  return results


def _read_bytes(path: str) -> bytes:
  with paths.open_file(path, "rb") as f:
    return f.read()


def _denoise_in_batches(exp: Experiment, state: TrainState, x: np.ndarray,
                        batch_size: int) -> np.ndarray:
  """x + sigma_L^2 s(x, sigma_L) (Tweedie's formula at the smallest level), over all devices."""
  model = exp.model
  sigma_min = float(exp.sigmas[-1])
  p_denoise = parallel.batch_map(
      lambda params, xb: denoise(make_score_fn(model, params), xb, sigma_min),
      parallel.make_mesh())
  params = exp.sampling.params(state)
  return np.concatenate([p_denoise(params, x[i:i + batch_size])
                         for i in range(0, len(x), batch_size)])


def _test_images(exp: Experiment, n: int) -> np.ndarray:
  """The first `n` images of the evaluation split (no shuffling, flips or dequantization)."""
  # Every process reads the same images: the inpainting batch is split over all devices.
  it = exp.data.iterator(split=exp.data.eval_split, seed=exp.seed, batch_size=n, shuffle=False,
                         per_process=False)
  return np.asarray(next(it)["x"])


def right_half_mask(shape: tuple[int, ...]) -> np.ndarray:
  """1 on the left half of each image (kept), 0 on the right half (to inpaint); `[b, h, w, c]`."""
  mask = np.ones(shape, np.float32)
  mask[:, :, shape[2] // 2:] = 0.0
  return mask


def inpaint_and_write(exp: Experiment, state: TrainState, workdir: str, x_known: np.ndarray,
                      mask: np.ndarray, *, method: str | None = None) -> np.ndarray:
  """Completes `x_known` where `mask` is 0 with sampler `method` and writes an inpainting grid.

  Every sampler of `sampling.SAMPLERS` inpaints: the known entries are replaced by
  `x_known + sigma_i z` before every update (PC: every corrector and predictor update). The
  examples are split over all devices of all hosts (`parallel.batch_map`); example i's start and
  noise come from the key folded from (seed, i), so the completions do not depend on the devices
  or hosts.
  """
  spec = exp.sampling.sampler(method)
  kwargs, sampler = dict(spec.kwargs), spec.fn
  sigmas, model = exp.sigmas, exp.model
  uniform = spec.init == "uniform"
  x_known = np.asarray(x_known, np.float32)
  mask = np.broadcast_to(np.asarray(mask, np.float32), x_known.shape)

  def body(shared, batch):
    params, rng = shared
    pairs = jax.vmap(jax.random.split)(parallel.sample_keys(rng, batch["index"]))
    shape = batch["x_known"].shape[1:]
    x0 = jax.vmap(lambda k: jax.random.uniform(k, shape) if uniform else
                  sigmas[0] * jax.random.normal(k, shape))(pairs[:, 0])
    return sampler(make_score_fn(model, params), x0, sigmas, pairs[:, 1], mask=batch["mask"],
                   x_known=batch["x_known"], **kwargs)

  rng = exp.key("inpaint")
  completed = parallel.batch_map(body, parallel.make_mesh())(
      (exp.sampling.params(state), rng),
      {"x_known": x_known, "mask": mask, "index": np.arange(len(x_known), dtype=np.int32)})
  if parallel.is_main_process():
    step = int(jax.device_get(state.step))
    out_dir = paths.join(workdir, "samples")
    paths.makedirs(out_dir)
    plots.save_inpainting_grid(x_known * mask, completed,
                               paths.join(out_dir, f"inpainting_step{step}.png"),
                               centered=exp.data.centered)
  return completed
