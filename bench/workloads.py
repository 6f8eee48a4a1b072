"""Benchmark workloads: each builds a jit-compiled call and measures it with `measure`."""

from __future__ import annotations

import functools
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

_DEVICES = {"scaling_d2": 2, "scaling_d4": 4, "scaling_d8": 8}


def devices_of(name: str) -> int:
  return _DEVICES.get(name, 1)


def _block(x):
  return jax.block_until_ready(x)


def _flops(compiled) -> float | None:
  """XLA's cost analysis, plus the oneDNN convolution custom calls (forward, input and weight
  gradients), which it counts as 0."""
  from score_jax.cpu import onednn, onednn_wgrad
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  text = compiled.as_text()
  f = ((float(cost.get("flops") or 0.0) if cost else 0.0) + onednn.flops(text)
       + onednn_wgrad.flops(text))
  return f if f > 0 else None


def measure(name: str, fn: Callable, args: tuple, *, repeats: int, work_per_call: float,
            unit: str, note: str = "", donate: tuple[int, ...] = (),
            loop_iterations: int = 1) -> dict[str, Any]:
  """Compiles `fn(*args)`, runs it once, then times `repeats` calls (fresh inputs if donated).

  XLA's cost analysis counts the body of a loop (lax.scan, nested or not) once: a call whose
  work is one body run `loop_iterations` times reports the body's FLOPs times that number.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn, donate_argnums=donate)
  # Donated inputs are consumed by each call: keep a pristine copy and hand out fresh copies.
  pristine = tuple(jax.tree.map(jnp.copy, a) if i in donate else a for i, a in enumerate(args))

  def fresh():
    out = tuple(jax.tree.map(jnp.copy, a) if i in donate else a for i, a in enumerate(pristine))
    return _block(out)

  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  flops = _flops(compiled)
  flops = flops * loop_iterations if flops else None
  out = _block(compiled(*fresh()))
  times = []
  for _ in range(repeats):
    if donate:
      args = fresh()
    t0 = time.perf_counter()
    out = _block(compiled(*args))
    times.append(time.perf_counter() - t0)
  del out
  median = statistics.median(times)
  return {"name": name, "median_s": median, "min_s": min(times), "max_s": max(times),
          "compile_s": compile_s, "flops": flops, "throughput": work_per_call / median,
          "throughput_unit": unit, "peak_rss_mb": resource.getrusage(
              resource.RUSAGE_SELF).ru_maxrss / 1024, "note": note, "repeats": repeats,
          "loop_iterations": loop_iterations}


# ----------------------------------------------------------------------------------------------


def _config(**overrides):
  import sys, pathlib
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from configs import default
  config = default.get_config()
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _toy_config():
  return _config(**{"model.mlp.hidden": 128, "model.mlp.num_layers": 3,
                    "model.mlp.activation": "softplus"})


def _ncsn_mnist_config():
  return _config(**{"data.dataset": "mnist", "data.image_size": 28, "data.num_channels": 1,
                    "model.name": "ncsn", "model.ncsn.ngf": 64, "noise.sigma_max": 1.0,
                    "noise.sigma_min": 0.01, "noise.num_scales": 10})


def _mnist_cpu_config():
  _config()  # puts the repository on sys.path
  from configs import mnist_cpu
  return mnist_cpu.get_config()


def _ncsnv2_cifar_config(dtype="float32"):
  return _config(**{"data.dataset": "cifar10", "data.image_size": 32, "data.num_channels": 3,
                    "model.name": "ncsnv2", "model.ncsn.ngf": 128, "noise.sigma_max": 50.0,
                    "noise.sigma_min": 0.01, "noise.num_scales": 232, "model.dtype": dtype})


def _state_and_step(config, batch_size, num_devices=1, fused=None):
  from score_jax import experiment, models, parallel, steps
  model = models.build(config)
  sigmas = experiment.sigmas_from_config(config)
  config.training.batch_size = batch_size
  kwargs = experiment.loss_kwargs_from_config(config, model, sigmas)
  mesh = parallel.make_mesh(num_devices)
  state = parallel.replicate(experiment.init_state(config, model), mesh)
  step = functools.partial(steps.train_step, ema_decays=tuple(config.training.ema_decays), **kwargs)
  p_step = parallel.data_parallel(step, mesh, fused_steps=fused)
  shape = experiment.example_shape(config)
  lead = (fused,) if fused else ()
  x = np.random.RandomState(0).rand(*lead, batch_size, *shape).astype(np.float32)
  batch = parallel.shard_batch({"x": x}, mesh, fused_steps=fused)
  return model, sigmas, state, p_step, batch


def _train(name, config, batch_size, repeats, num_devices=1, note="", fused=None):
  _, _, state, p_step, batch = _state_and_step(config, batch_size, num_devices, fused)
  rng = jax.random.key(0)
  return measure(name, p_step, (state, batch, rng), repeats=repeats,
                 work_per_call=batch_size * (fused or 1), unit="examples/s", donate=(0,),
                 note=note, loop_iterations=fused or 1)


def _pipeline(name, repeats, steps=30):
  """Training steps/s fed by the real MNIST pipeline (TFDS ArrayRecord + grain) vs one constant
  batch, same model and step (configs/mnist_cpu.py, batch 64, 1 device)."""
  import pathlib
  import tempfile
  from score_jax import experiment, image_data, parallel
  mnist = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
  config = _mnist_cpu_config()
  config.data.data_dir = image_data.prepare_cached(
      "mnist", str(mnist), str(pathlib.Path(tempfile.gettempdir()) / "score_jax_bench_tfds"))
  _, _, state, p_step, batch = _state_and_step(config, 64)
  mesh = parallel.make_mesh(1)
  it = experiment.iterator_from_config(config, split="train", seed=0, batch_size=64)
  rng = jax.random.key(0)
  state, _ = p_step(state, batch, rng)
  _block(state)

  def run(feed):
    nonlocal state
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = p_step(state, feed(), rng)
    _block(state)
    return steps / (time.perf_counter() - t0)

  constant = [run(lambda: batch) for _ in range(max(1, repeats // 2))]
  real = [run(lambda: parallel.shard_batch(next(it), mesh)) for _ in range(max(1, repeats // 2))]
  t0 = time.perf_counter()
  for _ in range(200):
    next(it)
  loader = 200 / (time.perf_counter() - t0)
  c, r = statistics.median(constant), statistics.median(real)
  return {"name": name, "median_s": 1 / r, "min_s": 1 / max(real), "max_s": 1 / min(real),
          "compile_s": None, "flops": None, "throughput": r * 64, "throughput_unit": "examples/s",
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "repeats": repeats, "constant_steps_per_s": c, "real_steps_per_s": r,
          "loader_batches_per_s": loader,
          "note": (f"real MNIST {r:.2f} steps/s vs constant batch {c:.2f} steps/s "
                   f"({r / c:.0%}); loader alone {loader:.0f} batches/s")}


def _als(name, config, batch_size, repeats, *, levels, steps, note="", extrapolate_to=None):
  from score_jax import experiment, models, samplers
  from score_jax.score import make_score_fn
  model = models.build(config)
  sigmas = experiment.sigmas_from_config(config)[:levels]
  shape = experiment.example_shape(config)
  params = experiment.init_state(config, model).params

  def sample(params, x0, rng):
    return samplers.annealed_langevin(make_score_fn(model, params), x0, sigmas, rng,
                                      step_lr=1e-5, steps_per_sigma=steps)

  x0 = jnp.asarray(np.random.RandomState(0).rand(batch_size, *shape).astype(np.float32))
  r = measure(name, sample, (params, x0, jax.random.key(0)), repeats=repeats,
              work_per_call=levels * steps, unit="Langevin steps/s", note=note,
              loop_iterations=levels * steps)
  r["per_step_s"] = r["median_s"] / (levels * steps)
  if extrapolate_to:
    r["extrapolated_s"] = r["per_step_s"] * extrapolate_to
    r["note"] = (note + f" whole sampler ({extrapolate_to} steps) extrapolated: "
                 f"{r['extrapolated_s']:.0f} s").strip()
  if r["flops"]:
    r["flops_per_step"] = r["flops"] / (levels * steps)
  return r


def _loop_vs_scan(name, method, repeats):
  """The same sampler as one program vs a Python loop calling a jitted step per update."""
  from score_jax import experiment, models, samplers
  from score_jax.score import make_score_fn
  config = _toy_config()
  model = models.build(config)
  sigmas = experiment.sigmas_from_config(config)
  params = experiment.init_state(config, model).params
  score_fn = make_score_fn(model, params)
  steps = 100 if method == "als" else 1
  step_lr = 0.1 if method == "als" else 0.5
  x0 = jnp.asarray(np.random.RandomState(0).randn(64, 2).astype(np.float32)) * 20

  if method == "als":
    program = jax.jit(lambda x, r: samplers.annealed_langevin(
        score_fn, x, sigmas, r, step_lr=step_lr, steps_per_sigma=steps))

    @jax.jit
    def one_update(x, rng, sigma):
      alpha = step_lr * (sigma / sigmas[-1]) ** 2
      s = score_fn(x, jnp.full((x.shape[0],), sigma))
      return x + alpha * s + jnp.sqrt(2 * alpha) * jax.random.normal(rng, x.shape)

    def loop(x, rng):
      for i in range(len(sigmas)):
        for t in range(steps):
          x = one_update(x, jax.random.fold_in(rng, i * steps + t), sigmas[i])
      return x
  else:
    program = jax.jit(lambda x, r: samplers.consistent_annealed(
        score_fn, x, sigmas, r, step_lr=step_lr))
    eta = step_lr / sigmas[-1] ** 2

    @jax.jit
    def one_update(x, rng, sigma, next_sigma, last):
      x = x + eta * sigma ** 2 * score_fn(x, jnp.full((x.shape[0],), sigma))
      beta = jnp.sqrt(jnp.clip(1 - ((1 - eta) * sigma / next_sigma) ** 2, 0.0))
      return jnp.where(last, x, x + beta * next_sigma * jax.random.normal(rng, x.shape))

    def loop(x, rng):
      for i in range(len(sigmas)):
        nxt = sigmas[min(i + 1, len(sigmas) - 1)]
        x = one_update(x, jax.random.fold_in(rng, i), sigmas[i], nxt, i == len(sigmas) - 1)
      return x

  n = len(sigmas) * steps
  rng = jax.random.key(0)
  r = measure(name, program, (x0, rng), repeats=repeats, work_per_call=n, unit="steps/s",
              loop_iterations=n)
  _block(loop(x0, rng))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _block(loop(x0, rng))
    times.append(time.perf_counter() - t0)
  loop_s = statistics.median(times)
  r["python_loop_median_s"] = loop_s
  r["speedup_vs_python_loop"] = loop_s / r["median_s"]
  r["note"] = (f"{method.upper()} batch 64, {n} updates: one program {r['median_s'] * 1e3:.1f} ms "
               f"vs Python loop of jitted steps {loop_s * 1e3:.1f} ms = "
               f"{r['speedup_vs_python_loop']:.1f}x")
  return r


def _matmul_peak(repeats):
  """float32 [n, n] @ [n, n] at the backend's default precision (on NVIDIA GPUs that is TF32,
  the precision the float32 workloads' convolutions and matmuls also get)."""
  n = 4096 if jax.default_backend() == "cpu" else 8192
  a = jnp.asarray(np.random.RandomState(0).randn(n, n).astype(np.float32))
  b = jnp.asarray(np.random.RandomState(1).randn(n, n).astype(np.float32))
  r = measure("matmul_peak", lambda a, b: a @ b, (a, b), repeats=repeats,
              work_per_call=2 * n ** 3, unit="FLOP/s",
              note=f"{n}^2 float32 matmul, default precision")
  r["flops"] = 2.0 * n ** 3
  return r


WORKLOADS: dict[str, Callable[[int], dict]] = {
    "matmul_peak": _matmul_peak,
    "toy_als_b64": lambda r: _als("toy_als_b64", _toy_config(), 64, r, levels=10, steps=100,
                                  note="MLP 3x128 softplus, 10 levels x 100 steps"),
    "toy_als_b1280": lambda r: _als("toy_als_b1280", _toy_config(), 1280, r, levels=10, steps=100,
                                    note="MLP 3x128 softplus, 10 levels x 100 steps"),
    "toy_train_b128": lambda r: _train("toy_train_b128", _toy_config(), 128, r,
                                       note="DSM step, MLP 3x128"),
    "ncsn_mnist_train_b64": lambda r: _train("ncsn_mnist_train_b64", _ncsn_mnist_config(), 64, r,
                                             note="NCSN ngf 64, 28x28x1"),
    "ncsn_mnist_als_b64": lambda r: _als("ncsn_mnist_als_b64", _ncsn_mnist_config(), 64, r,
                                         levels=1, steps=2, note="NCSN ngf 64, per Langevin step",
                                         extrapolate_to=1000),
    "mnist_cpu_train_b64": lambda r: _train("mnist_cpu_train_b64", _mnist_cpu_config(), 64, r,
                                            note="configs/mnist_cpu.py: NCSNv2 ngf 16, 28x28x1"),
    "mnist_cpu_train_b64_fused4": lambda r: _train(
        "mnist_cpu_train_b64_fused4", _mnist_cpu_config(), 64, r, fused=4,
        note="4 steps per dispatch (training.steps_per_dispatch=4)"),
    "mnist_cpu_als_b64": lambda r: _als("mnist_cpu_als_b64", _mnist_cpu_config(), 64, r,
                                        levels=1, steps=4, note="NCSNv2 ngf 16, per step;",
                                        extrapolate_to=1000),
    "mnist_pipeline": lambda r: _pipeline("mnist_pipeline", r),
    "ncsnv2_cifar_train_b16": lambda r: _train("ncsnv2_cifar_train_b16", _ncsnv2_cifar_config(),
                                               16, r, note="NCSNv2 ngf 128, 32x32x3"),
    "ncsnv2_cifar_als_b16": lambda r: _als("ncsnv2_cifar_als_b16", _ncsnv2_cifar_config(), 16, r,
                                           levels=2, steps=1, note="NCSNv2 ngf 128, per step;",
                                           extrapolate_to=232 * 5),
    "ncsnv2_cifar_train_b16_bf16": lambda r: _train(
        "ncsnv2_cifar_train_b16_bf16", _ncsnv2_cifar_config("bfloat16"), 16, r,
        note="bf16 compute, f32 params"),
    # The published batch size (128): for accelerators; on the 2-core CPU a step takes ~1 min.
    "ncsnv2_cifar_train_b128": lambda r: _train("ncsnv2_cifar_train_b128", _ncsnv2_cifar_config(),
                                                128, r, note="NCSNv2 ngf 128, published batch"),
    "ncsnv2_cifar_train_b128_bf16": lambda r: _train(
        "ncsnv2_cifar_train_b128_bf16", _ncsnv2_cifar_config("bfloat16"), 128, r,
        note="bf16 compute, f32 params"),
    "ncsnv2_cifar_als_b128": lambda r: _als("ncsnv2_cifar_als_b128", _ncsnv2_cifar_config(), 128,
                                            r, levels=2, steps=5, note="NCSNv2 ngf 128, per step;",
                                            extrapolate_to=232 * 5),
    "loop_vs_scan_als": lambda r: _loop_vs_scan("loop_vs_scan_als", "als", r),
    "loop_vs_scan_cas": lambda r: _loop_vs_scan("loop_vs_scan_cas", "cas", r),
    **{f"scaling_d{d}": (lambda r, d=d: _train(
        f"scaling_d{d}", _toy_config(), 1024, r, num_devices=d,
        note=f"toy DSM batch 1024 on {d} device(s); CPU devices are simulated: overhead only"))
       for d in (1, 2, 4, 8)},
}


def names() -> list[str]:
  return [n for n in WORKLOADS if n != "matmul_peak"]


def run(name: str, repeats: int) -> dict:
  if name not in WORKLOADS:
    raise ValueError(f"unknown workload {name!r}; see --list")
  result = WORKLOADS[name](repeats)
  if name != "matmul_peak" and result.get("flops"):
    # The peak measured in the same process right after the workload: the machine's speed drifts
    # by 10-20% between minutes (333-428 GFLOP/s for the same matmul on 2026-11-26), so a peak
    # measured once at the start of a long run would skew the later rows' fractions.
    peak = _matmul_peak(repeats)
    result["local_peak_flops"] = peak["flops"] / peak["median_s"]
  return result
