"""Langevin sampling of a Bayesian logistic-regression posterior from its unnormalized density.

The samplers only need a score function: here it is `jax.grad` of log prior + log likelihood, with
no normalizing constant (the Bayesian use of Langevin dynamics, Welling & Teh 2011 without
minibatching). The posterior mean from many parallel chains is compared to numerical quadrature on
a grid, which is exact for a 2-parameter model.

    .venv/bin/python examples/bayesian_logistic_regression.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from score_jax import samplers

PRIOR_STD = 2.0


def make_data(rng: jax.Array, n: int = 50, w_true=(1.5, -1.0)):
  x_rng, y_rng = jax.random.split(rng)
  x = jax.random.normal(x_rng, (n, 2))
  p = jax.nn.sigmoid(x @ jnp.asarray(w_true))
  y = jax.random.bernoulli(y_rng, p).astype(jnp.float32)
  return x, y


def log_posterior(w, x, y):
  """Unnormalized log p(w | x, y) for w [2]: N(0, PRIOR_STD^2) prior, Bernoulli likelihood."""
  logits = x @ w
  return jnp.sum(y * logits - jnp.logaddexp(0.0, logits)) - 0.5 * jnp.sum(w ** 2) / PRIOR_STD ** 2


def langevin_posterior_mean(x, y, rng, *, chains: int = 512, n_steps: int = 2000,
                            step_size: float = 2e-3) -> np.ndarray:
  grad = jax.vmap(jax.grad(log_posterior), in_axes=(0, None, None))
  score_fn = lambda w, sigma: grad(w, x, y)
  w0 = jax.random.normal(rng, (chains, 2))
  run = jax.jit(lambda w0, r: samplers.langevin(score_fn, w0, r, sigma=0.0, n_steps=n_steps,
                                                step_size=step_size))
  w = run(w0, jax.random.fold_in(rng, 1))
  return np.asarray(w.mean(0))


def quadrature_posterior_mean(x, y, *, half_width: float = 6.0, n: int = 401) -> np.ndarray:
  grid = np.linspace(-half_width, half_width, n)
  w1, w2 = np.meshgrid(grid, grid, indexing="ij")
  ws = jnp.asarray(np.stack([w1.ravel(), w2.ravel()], 1), jnp.float32)
  logp = np.asarray(jax.vmap(log_posterior, in_axes=(0, None, None))(ws, x, y), np.float64)
  p = np.exp(logp - logp.max())
  p /= p.sum()
  return (np.asarray(ws, np.float64) * p[:, None]).sum(0)


if __name__ == "__main__":
  x, y = make_data(jax.random.key(0))
  print("Langevin posterior mean  ", langevin_posterior_mean(x, y, jax.random.key(1)))
  print("quadrature posterior mean", quadrature_posterior_mean(x, y))
