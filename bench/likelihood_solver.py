"""A/B: score_jax's Dormand-Prince solver (`score_jax/ode.py`) against diffrax's Dopri5 on the
likelihood ODE of `score_jax/likelihood.py`, in one process, on the same vector field.

Problems (exact scores, so the truth is known):
* mixture: the NCSN two-mode mixture in 2-D, exact trace, the exact marginal at sigma_max as the
  prior, so the only error left is the solver's; truth = the mixture's log-density at sigma_min.
* gauss784: N(0.5, 0.3^2 I) in 784 dimensions (MNIST-sized), Rademacher trace (exact for an
  isotropic Gaussian), Gaussian prior; truth = the estimator's closed form.

Solvers: score_jax `ode.dopri5` (per-example step control); diffrax `Dopri5` with a
`PIDController` (I-controller, its defaults) solving the batch as one ODE (one step size for the
batch), and diffrax vmapped over examples (per-example step control). Time is log sigma for all.
Reported per solver: the largest |logp error| per dimension, mean and max NFE per example
(diffrax: 6 per step + 2 for the starting step, like ours), and the process CPU time of a
compiled call (median of repeats, the solvers interleaved; CPU time, not wall time, because the
machine is shared) with its ratio against score_jax's.

    /tmp/venv-i21/bin/python bench/likelihood_solver.py   # a venv with diffrax (not a dependency)
"""

import json
import math
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

import diffrax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from score_jax import likelihood as lik  # noqa: E402
from score_jax import ode, toy  # noqa: E402
from score_jax.score import broadcast_sigma  # noqa: E402

SIGMA_MIN = 0.01


def field_fn(score_fn, probes):
  """The likelihood ODE in t = log sigma for state (x [b, ...], integral [b, 1])."""
  def field(t, state):
    x, _ = state
    sigma = jnp.exp(t)
    if probes is None:
      score, div = lik._exact_divergence(score_fn, x, sigma)
    else:
      score, div = lik._hutchinson_divergence(score_fn, x, sigma, probes)
    return -broadcast_sigma(sigma, x) ** 2 * score, (sigma ** 2)[:, None] * div
  return field


def ours(score_fn, probes, x, t0, t1, tol):
  b = x.shape[0]
  (z, integral), stats = ode.dopri5(field_fn(score_fn, probes), (x, jnp.zeros((b, 1))), t0, t1,
                                    rtol=tol, atol=tol)
  return z, integral[:, 0], stats.nfe


def diffrax_batch(score_fn, probes, x, t0, t1, tol):
  b = x.shape[0]
  field = field_fn(score_fn, probes)
  term = diffrax.ODETerm(lambda t, y, args: field(jnp.full((b,), t), y))
  sol = diffrax.diffeqsolve(term, diffrax.Dopri5(), t0, t1, None, (x, jnp.zeros((b, 1))),
                            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
                            max_steps=4096, saveat=diffrax.SaveAt(t1=True))
  z, integral = sol.ys
  nfe = 6 * sol.stats["num_steps"] + 2
  return z[0], integral[0, :, 0], jnp.full((b,), nfe)


def diffrax_vmap(score_fn, probes, x, t0, t1, tol):
  def one(xi, probe_i):
    p = None if probe_i is None else probe_i[:, None]
    z, integral, nfe = diffrax_batch(score_fn, p, xi[None], t0, t1, tol)
    return z[0], integral[0], nfe[0]
  if probes is None:
    return jax.vmap(lambda xi: one(xi, None))(x)
  return jax.vmap(one, in_axes=(0, 1))(x, probes)


def run_problem(name, score_fn, probes, x, t0, t1, prior_logp, truth, d, repeats=11):
  """Compiles the three solvers, then times them interleaved (same machine state for each)."""
  solvers = (("score_jax", ours), ("diffrax_batch", diffrax_batch),
             ("diffrax_vmap", diffrax_vmap))
  rows = []
  for tol in (1e-3, 1e-5):
    fns = {n: jax.jit(lambda x, f=f: f(score_fn, probes, x, t0, t1, tol)) for n, f in solvers}
    outs = {n: jax.block_until_ready(fn(x)) for n, fn in fns.items()}
    times = {n: [] for n in fns}
    for _ in range(repeats):
      for n, fn in fns.items():
        start = time.process_time()
        jax.block_until_ready(fn(x))
        times[n].append(time.process_time() - start)
    base = statistics.median(times["score_jax"])
    for n, (z, integral, nfe) in outs.items():
      logp = prior_logp(z) - integral
      wall = statistics.median(times[n])
      row = {"problem": name, "solver": n, "rtol=atol": tol, "batch": int(x.shape[0]),
             "max_err_nats_per_dim": float(jnp.max(jnp.abs(logp - truth))) / d,
             "nfe_mean": float(jnp.mean(nfe)), "nfe_max": int(jnp.max(nfe)),
             "cpu_ms": 1e3 * wall, "time_vs_score_jax": wall / base}
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def main():
  print(f"jax {jax.__version__}, diffrax {diffrax.__version__}, {jax.devices()[0].platform}")
  t0, t1 = math.log(SIGMA_MIN), math.log(1e3)

  mix = toy.ncsn_mixture()
  x = mix.sample(jax.random.key(0), 256)
  run_problem("mixture", mix.score, None, x, t0, math.log(20.0),
              lambda z: mix.log_prob(z, 20.0), mix.log_prob(x, SIGMA_MIN), 2)

  d, m, s = 784, 0.5, 0.3
  gauss = toy.Gaussian(np.full(d, m), s)
  x = jnp.clip(m + s * jax.random.normal(jax.random.key(1), (64, d)), 0.0, 1.0)
  probes = jax.random.rademacher(jax.random.key(2), (1, 64, d), jnp.float32)
  v_min, v_max = s ** 2 + SIGMA_MIN ** 2, s ** 2 + 1e6
  z = m + (x - m) * math.sqrt(v_max / v_min)
  truth = lik.gaussian_prior_logp(z, 1e3) + 0.5 * d * math.log(v_max / v_min)
  run_problem("gauss784", gauss.score, probes, x, t0, t1,
              lambda z: lik.gaussian_prior_logp(z, 1e3), truth, d)


if __name__ == "__main__":
  main()
