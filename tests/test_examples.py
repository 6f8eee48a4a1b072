"""The Bayesian example: Langevin driven by jax.grad of a log posterior recovers its mean."""

import jax
import numpy as np

from examples import bayesian_logistic_regression as blr


def test_langevin_recovers_logistic_regression_posterior_mean():
  x, y = blr.make_data(jax.random.key(0))
  exact = blr.quadrature_posterior_mean(x, y)
  estimate = blr.langevin_posterior_mean(x, y, jax.random.key(1))
  # 512 chains x posterior std ~0.3: Monte Carlo error ~0.015; the step bias is smaller.
  np.testing.assert_allclose(estimate, exact, atol=0.06)
  assert np.abs(exact).max() > 0.5  # the posterior is far from the prior mean: a real test.
