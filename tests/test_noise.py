"""Noise ladders, level sampling and the NCSNv2 schedule techniques against hand-derived values."""

import math

import jax
import numpy as np
import pytest
from scipy import stats

from score_jax import noise


def test_geometric_and_linear_ladders():
  s = np.asarray(noise.geometric_sigmas(1.0, 0.01, 10))
  assert s[0] == pytest.approx(1.0) and s[-1] == pytest.approx(0.01)
  np.testing.assert_allclose(s[:-1] / s[1:], 100 ** (1 / 9), rtol=1e-5)  # ratio 1.668
  lin = np.asarray(noise.linear_sigmas(2.0, 1.0, 3))
  np.testing.assert_allclose(lin, [2.0, 1.5, 1.0])
  with pytest.raises(ValueError, match="sigma_max"):
    noise.geometric_sigmas(0.5, 1.0, 10)
  with pytest.raises(ValueError, match="sigma_min"):
    noise.geometric_sigmas(1.0, 0.0, 10)
  with pytest.raises(ValueError, match="num_scales"):
    noise.geometric_sigmas(1.0, 0.1, 1)


def test_validate_sigmas():
  with pytest.raises(ValueError, match="descending"):
    noise.validate_sigmas([1.0, 2.0])
  with pytest.raises(ValueError, match="> 0"):
    noise.validate_sigmas([1.0, -1.0])


@pytest.mark.parametrize("method", ["uniform", "stratified", "antithetic"])
def test_sample_levels(method):
  levels = np.asarray(noise.sample_levels(jax.random.key(0), 1000, 10, method))
  assert levels.min() >= 0 and levels.max() <= 9
  counts = np.bincount(levels, minlength=10)
  if method == "stratified":
    assert counts.min() == counts.max() == 100  # exactly balanced
  if method == "antithetic":
    np.testing.assert_array_equal(levels[:500], 9 - levels[500:])
  assert counts.min() > 50


def test_technique1_max_pairwise_distance():
  x = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
  assert noise.sigma_max_from_data(x, chunk=2) == pytest.approx(5.0)


def test_technique2_ratio_condition_and_levels():
  # At gamma = 1 the condition is Phi(3) - Phi(-3) for any D (hand value 0.99730).
  assert noise.ratio_condition(1.0, 3072) == pytest.approx(stats.norm.cdf(3) - stats.norm.cdf(-3))
  # CIFAR-10 (D = 3072, 50 -> 0.01): C = 0.5 gives about 220 levels (the paper uses 232;
  # AC's R script reports ~225), C = 0.99 about 1k (Song & Ermon 2020, Technique 2).
  L = noise.num_scales_from_ratio(50.0, 0.01, 3072, c=0.5)
  assert 210 <= L <= 235
  gamma = (50.0 / 0.01) ** (1 / (L - 1))
  assert noise.ratio_condition(gamma, 3072) >= 0.5  # rounding up keeps the condition
  assert 900 <= noise.num_scales_from_ratio(50.0, 0.01, 3072, c=0.99) <= 1100


def test_technique4_step_lr():
  gamma = (50.0 / 0.01) ** (1 / 231)
  # NCSNv2's CIFAR-10 setting (232 levels, 5 steps) uses step_lr = 6.2e-6 (ermongroup/ncsnv2
  # `configs/cifar10.yml`).
  assert noise.step_lr_from_variance_recursion(0.01, gamma, 5) == pytest.approx(6.2e-6, rel=0.02)
  # One step and gamma^2 = 2: r_1 = 2 (1 - rho)^2 + 2 rho is smallest (= 1.5) at rho = 1/2.
  lr = noise.step_lr_from_variance_recursion(1.0, math.sqrt(2.0), 1)
  assert lr == pytest.approx(0.5, rel=1e-3)
  assert noise.als_variance_ratio(0.5, 1.0, math.sqrt(2.0), 1) == pytest.approx(1.5)


def test_cas_feasibility_interval():
  sigmas = noise.geometric_sigmas(50.0, 0.01, 232)
  low, high = noise.cas_step_lr_interval(sigmas)
  gamma = (0.01 / 50.0) ** (1 / 231)
  assert low == pytest.approx(1e-4 * (1 - gamma), rel=1e-4)
  assert high == pytest.approx(1e-4 * (1 + gamma), rel=1e-4)
  noise.check_cas_step_lr(sigmas, 5.6e-6)  # AC's CIFAR-10 setting is feasible
  with pytest.raises(ValueError, match=r"must lie in \("):
    noise.check_cas_step_lr(sigmas, 1e-6)
