"""Overhead of the library's fixed-step samplers against a hand-written `lax.scan` of the same
update, both driven by the same toy score network (3x128 softplus MLP, batch 64) with one key.

Every pair is compiled first, then timed in the same process with interleaved repeats (sampler,
reference, sampler, ...), so slow phases of a shared machine hit both alike. The ratio is the
median over repeats of sampler time / reference time of the same repeat (1.05: the sampler costs
5% more); the ratio of the minima is printed beside it.

  .venv/bin/python bench/sampler_overhead.py [--repeats=30] [--batch=64] [--only=als,cas]
      [--out=FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from score_jax import models, noise, samplers, train  # noqa: E402
from score_jax.score import make_score_fn  # noqa: E402
import workloads  # noqa: E402


def _toy_score_fn():
  config = workloads._toy_config()
  model = models.build(config)
  params = train.init_state(config, model).params
  return make_score_fn(model, params), train.sigmas_from_config(config)


def _full(sigma, b):
  return jnp.full((b,), sigma)


def _pairs(score_fn, sigmas, b):
  """name -> (library sampler, hand-written scan, NFE), each `(x, rng) -> x`."""
  num_levels = sigmas.shape[0]
  sigma_min = sigmas[-1]
  pairs = {}

  t, lr = 100, 0.1

  def als(x, rng):
    return samplers.annealed_langevin(score_fn, x, sigmas, rng, step_lr=lr, steps_per_sigma=t)

  def als_ref(x, rng):
    sig = jnp.repeat(sigmas, t)
    alpha = lr * (sig / sigma_min) ** 2

    def step(x, inp):
      a, s, key = inp
      z = jax.random.normal(key, x.shape, x.dtype)
      return x + a * score_fn(x, _full(s, b)) + jnp.sqrt(2 * a) * z, None

    return jax.lax.scan(step, x, (alpha, sig, jax.random.split(rng, num_levels * t)))[0]

  pairs["als"] = (als, als_ref, num_levels * t)

  ladder = samplers.cas_ladder(sigmas, 100)
  cas_lr = 0.5 * float(ladder[-1]) ** 2

  def cas(x, rng):
    return samplers.consistent_annealed(score_fn, x, sigmas, rng, step_lr=cas_lr, n_sigma=100)

  def cas_ref(x, rng):
    eta = cas_lr / ladder[-1] ** 2
    nxt = jnp.concatenate([ladder[1:], ladder[-1:]])
    last = jnp.arange(ladder.shape[0]) == ladder.shape[0] - 1

    def step(x, inp):
      s, n, is_last, key = inp
      x = x + eta * s ** 2 * score_fn(x, _full(s, b))
      beta = jnp.sqrt(jnp.clip(1 - ((1 - eta) * s / n) ** 2, 0.0))
      z = jax.random.normal(key, x.shape, x.dtype)
      return jnp.where(is_last, x, x + beta * n * z), None

    keys = jax.random.split(rng, ladder.shape[0])
    return jax.lax.scan(step, x, (ladder, nxt, last, keys))[0]

  pairs["cas"] = (cas, cas_ref, int(ladder.shape[0]))

  pc_sigmas = noise.geometric_sigmas(float(sigmas[0]), float(sigmas[-1]), 500)

  def pc(x, rng):
    return samplers.predictor_corrector(score_fn, x, pc_sigmas, rng, snr=0.16, corrector_steps=1)

  def pc_ref(x, rng):
    nxt = jnp.concatenate([pc_sigmas[1:], jnp.zeros((1,))])
    norms = lambda v: jnp.sqrt(jnp.sum(v ** 2, axis=1))

    def level(x, inp):
      s, n, key = inp
      c_key, p_key = key[0], key[1]
      g = score_fn(x, _full(s, b))
      z = jax.random.normal(c_key, x.shape, x.dtype)
      eps = 2.0 * (0.16 * jnp.mean(norms(z)) / jnp.mean(norms(g))) ** 2
      x = x + eps * g + jnp.sqrt(2 * eps) * z
      g2 = s ** 2 - n ** 2
      z = jax.random.normal(p_key, x.shape, x.dtype)
      return x + g2 * score_fn(x, _full(s, b)) + jnp.sqrt(g2) * z, None

    keys = jax.random.split(rng, 2 * pc_sigmas.shape[0]).reshape(-1, 2)
    return jax.lax.scan(level, x, (pc_sigmas, nxt, keys))[0]

  pairs["pc"] = (pc, pc_ref, 2 * int(pc_sigmas.shape[0]))

  ode_sigmas = noise.karras_sigmas(float(sigmas[0]), float(sigmas[-1]), 500)

  def ode_ref(heun):
    def run(x, rng):
      def step(x, inp):
        s, n = inp
        d = -s * score_fn(x, _full(s, b))
        x_next = x + (n - s) * d
        if heun:
          x_next = x + (n - s) * 0.5 * (d - n * score_fn(x_next, _full(n, b)))
        return x_next, None
      x = jax.lax.scan(step, x, (ode_sigmas[:-1], ode_sigmas[1:]))[0]
      s = ode_sigmas[-1]
      return x + s ** 2 * score_fn(x, _full(s, b))
    return run

  pairs["euler"] = (lambda x, rng: samplers.euler(score_fn, x, ode_sigmas), ode_ref(False), 500)
  pairs["heun"] = (lambda x, rng: samplers.heun(score_fn, x, ode_sigmas), ode_ref(True), 999)

  def dpm_ref(x, rng):
    t = -jnp.log(ode_sigmas)
    h = t[1:] - t[:-1]

    def step(carry, inp):
      x, d_prev, h_last = carry
      s, n, h_i, i = inp
      d = x + s ** 2 * score_fn(x, _full(s, b))
      r = h_last / h_i
      d_mix = jnp.where(i == 0, d, (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev)
      return ((n / s) * x - jnp.expm1(-h_i) * d_mix, d, h_i), None

    (x, _, _), _ = jax.lax.scan(step, (x, x, h[0]),
                                (ode_sigmas[:-1], ode_sigmas[1:], h, jnp.arange(499)))
    return x + ode_sigmas[-1] ** 2 * score_fn(x, _full(ode_sigmas[-1], b))

  pairs["dpm_solver_pp_2m"] = (lambda x, rng: samplers.dpm_solver_pp_2m(score_fn, x, ode_sigmas),
                               dpm_ref, 500)
  return pairs


def _time(fn, args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--only", default="")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  if args.repeats < 1 or args.batch < 1:
    raise SystemExit("--repeats and --batch must be >= 1")
  score_fn, sigmas = _toy_score_fn()
  pairs = _pairs(score_fn, sigmas, args.batch)
  only = [n for n in args.only.split(",") if n]
  unknown = sorted(set(only) - set(pairs))
  if unknown:
    raise SystemExit(f"--only names unknown samplers {unknown}; use some of {sorted(pairs)}")
  x0 = jnp.asarray(np.random.RandomState(0).randn(args.batch, 2).astype(np.float32)) * 20
  rng = jax.random.key(0)
  rows = []
  for name, (lib, ref, nfe) in pairs.items():
    if only and name not in only:
      continue
    lib_c = jax.jit(lib).lower(x0, rng).compile()
    ref_c = jax.jit(ref).lower(x0, rng).compile()
    _time(lib_c, (x0, rng)), _time(ref_c, (x0, rng))
    lib_t, ref_t = [], []
    for _ in range(args.repeats):
      lib_t.append(_time(lib_c, (x0, rng)))
      ref_t.append(_time(ref_c, (x0, rng)))
    row = {"sampler": name, "batch": args.batch, "nfe": nfe, "repeats": args.repeats,
           "backend": jax.default_backend(), "sampler_median_s": statistics.median(lib_t),
           "scan_median_s": statistics.median(ref_t),
           "ratio": statistics.median(a / b for a, b in zip(lib_t, ref_t)),
           "ratio_of_minima": min(lib_t) / min(ref_t)}
    rows.append(row)
    print(f"{name:10s} nfe {nfe:5d}  sampler {row['sampler_median_s'] * 1e3:8.2f} ms  "
          f"scan {row['scan_median_s'] * 1e3:8.2f} ms  ratio {row['ratio']:.3f} "
          f"(minima {row['ratio_of_minima']:.3f})", flush=True)
  if args.out:
    with open(args.out, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  return rows


if __name__ == "__main__":
  main()
