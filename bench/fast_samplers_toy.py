"""Quality against NFE for every sampler on the NCSN two-mode mixture with exact scores.

Mixture: 1/5 N((-5,-5), I) + 4/5 N((5,5), I) (Song & Ermon 2019, Section 3); scores exact, so
only the sampler's error remains. Table 1 starts from exact samples of the marginal at
sigma_max = 20; the adaptive solver and ALS are also run on the mixture padded with independent
N(0, 1) coordinates to 64 dimensions (see `samplers.adaptive` on dimension). Table 2 starts from
the prior N(0, sigma_max^2 I) at several sigma_max and reports the small mode's weight (truth 0.2).
Columns: NFE per sample (mean for the adaptive solver), mode weights, per-mode variance (mean
over coordinates, truth 1), energy distance to 1000 true samples (the floor is that of another
1000 true samples, printed first).

  .venv/bin/python bench/fast_samplers_toy.py [--n=2000]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from score_jax import noise, samplers, toy  # noqa: E402

SIGMA_MIN = 0.01


def padded_mixture(dim: int) -> toy.GaussianMixture:
  pad = [0.0] * (dim - 2)
  return toy.GaussianMixture((0.2, 0.8), (tuple([-5.0, -5.0] + pad), tuple([5.0, 5.0] + pad)),
                             (1.0, 1.0))


def _stats(x, mix, truth):
  x = np.asarray(x, np.float64)
  means = np.asarray(mix.means)
  nearest = np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)
  w = np.bincount(nearest, minlength=2) / len(x)
  var = [x[nearest == k].var(0).mean() if np.any(nearest == k) else np.nan for k in range(2)]
  return w, var, toy.energy_distance(x[:1000], truth)


def runners(mix, sigma_max):
  """name -> jitted (x0, rng) -> (x, info)."""
  out = {}
  for n in (10, 25, 50):
    sig = noise.karras_sigmas(sigma_max, SIGMA_MIN, n)
    out[f"euler N={n}"] = lambda x, r, sig=sig: samplers.euler(mix.score, x, sig, return_info=True)
  for n in (5, 10, 25):
    sig = noise.karras_sigmas(sigma_max, SIGMA_MIN, n)
    out[f"heun N={n}"] = lambda x, r, sig=sig: samplers.heun(mix.score, x, sig, return_info=True)
    out[f"dpm++2m N={n}"] = lambda x, r, sig=sig: samplers.dpm_solver_pp_2m(
        mix.score, x, sig, return_info=True)
  sig = noise.karras_sigmas(sigma_max, SIGMA_MIN, 25)
  out["heun churn=10 N=25"] = lambda x, r, sig=sig: samplers.heun(
      mix.score, x, sig, r, s_churn=10.0, return_info=True)
  for rel_tol in (0.1, 0.05):
    out[f"adaptive rel_tol={rel_tol}"] = lambda x, r, rt=rel_tol: samplers.adaptive(
        mix.score, x, r, sigma_max=sigma_max, sigma_min=SIGMA_MIN, abs_tol=0.0078, rel_tol=rt,
        return_info=True)
  for levels, t in ((100, 1), (100, 5), (200, 5)):
    sig = noise.geometric_sigmas(sigma_max, SIGMA_MIN, levels)
    lr = noise.step_lr_from_variance_recursion(SIGMA_MIN, float(sig[0] / sig[1]), t)
    out[f"als {levels}x{t}"] = lambda x, r, sig=sig, lr=lr, t=t: samplers.annealed_langevin(
        mix.score, x, sig, r, step_lr=lr, steps_per_sigma=t, denoise=True, return_info=True)
  for levels in (100, 500):
    sig = noise.geometric_sigmas(sigma_max, SIGMA_MIN, levels)
    eta = 2.0 * (1.0 - float(sig[1] / sig[0]))
    out[f"cas L={levels} eta=2(1-g)"] = lambda x, r, sig=sig, eta=eta: (
        samplers.consistent_annealed(mix.score, x, sig, r, eta=eta, denoise=True,
                                     return_info=True))
  sig = noise.geometric_sigmas(sigma_max, SIGMA_MIN, 100)
  out["pc 100x(1+1)"] = lambda x, r, sig=sig: samplers.predictor_corrector(
      mix.score, x, sig, r, snr=0.16, corrector_steps=1, denoise=True, return_info=True)
  return out


def _nfe(info):
  return float(jnp.mean(jnp.asarray(info["nfe"])))


def table_from_marginal(mix, n, sigma_max, only=None):
  data_rng, noise_rng = jax.random.split(jax.random.key(1))
  x0 = mix.sample(data_rng, n) + sigma_max * jax.random.normal(noise_rng, (n, mix.dim))
  truth = np.asarray(mix.sample(jax.random.key(3), 1000))
  w, var, ed = _stats(mix.sample(jax.random.key(4), n), mix, truth)
  print(f"  {'true samples':26s} {'':>7s}  w {w[0]:.3f}/{w[1]:.3f}  var {var[0]:.3f}/{var[1]:.3f}"
        f"  ED {ed:.4f}", flush=True)
  for name, fn in runners(mix, sigma_max).items():
    if only and not name.startswith(only):
      continue
    x, info = jax.jit(fn)(x0, jax.random.key(0))
    w, var, ed = _stats(x, mix, truth)
    print(f"  {name:26s} {_nfe(info):7.1f}  w {w[0]:.3f}/{w[1]:.3f}  var {var[0]:.3f}/{var[1]:.3f}"
          f"  ED {ed:.4f}", flush=True)


def table_from_prior(mix, n, sigma_maxes):
  names = list(runners(mix, 20.0))
  print(f"  {'sampler':26s} " + " ".join(f"sigma_max={s:<6g}" for s in sigma_maxes), flush=True)
  rows = {name: [] for name in names}
  for sigma_max in sigma_maxes:
    x0 = sigma_max * jax.random.normal(jax.random.key(2), (n, mix.dim))
    for name, fn in runners(mix, sigma_max).items():
      x, _ = jax.jit(fn)(x0, jax.random.key(0))
      rows[name].append(toy.mode_weights(x, mix.means)[0])
  for name in names:
    print(f"  {name:26s} " + " ".join(f"{w:<16.3f}" for w in rows[name]), flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=2000)
  args = parser.parse_args(argv)
  if args.n < 1000:
    raise SystemExit(f"--n={args.n} must be >= 1000 (the energy distance uses 1000 samples)")
  print("Table 1: from exact samples of the marginal at sigma_max = 20 (2-D); "
        "columns: NFE, mode weights, per-mode variance, energy distance")
  table_from_marginal(toy.ncsn_mixture(), args.n, 20.0)
  print("Table 1b: the same, mixture padded to 64-D")
  for prefix in ("adaptive", "als", "heun N=25", "dpm++2m N=25"):
    table_from_marginal(padded_mixture(64), args.n, 20.0, only=prefix)
  print("Table 2: small-mode weight (truth 0.2) from the prior N(0, sigma_max^2 I) (2-D)")
  table_from_prior(toy.ncsn_mixture(), args.n, (20.0, 50.0, 200.0))


if __name__ == "__main__":
  main()
