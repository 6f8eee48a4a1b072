"""Samplers driven by exact scores: mode weights, moments, CAS consistency, compilation, inputs."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import noise, samplers, toy

MIX = toy.ncsn_mixture()
SIGMAS = noise.geometric_sigmas(20.0, 1.0, 10)


def _init(n, d=2, scale=20.0, seed=0):
  return scale * jax.random.normal(jax.random.key(seed), (n, d))


def test_als_recovers_mode_weights_where_plain_langevin_fails():
  x0 = _init(2000)
  als = jax.jit(lambda x, r: samplers.annealed_langevin(MIX.score, x, SIGMAS, r, step_lr=0.1,
                                                        steps_per_sigma=100))(x0, jax.random.key(1))
  np.testing.assert_allclose(toy.mode_weights(als, MIX.means), [0.2, 0.8], atol=0.04)
  # Plain Langevin on the clean-data score from the same start: the weights stay where the
  # start put them (about 1/2 each), as in Section 3 of the NCSN paper.
  plain = jax.jit(lambda x, r: samplers.langevin(MIX.score, x, r, sigma=1e-3, n_steps=1000,
                                                 step_size=0.1))(x0 * 0.3, jax.random.key(1))
  w = toy.mode_weights(plain, MIX.means)
  assert abs(w[0] - 0.2) > 0.15


def test_als_recovers_gaussian_moments():
  g = toy.Gaussian(np.array([1.0, -2.0, 0.5]), 0.5)
  sigmas = noise.geometric_sigmas(10.0, 0.01, 10)
  x = samplers.annealed_langevin(g.score, _init(4000, 3, 10.0), sigmas, jax.random.key(2),
                                 step_lr=2e-5, steps_per_sigma=100, denoise=True)
  err = toy.gaussian_moment_errors(np.asarray(x), [1.0, -2.0, 0.5], 0.5)
  assert err["mean_error"] < 0.05 and err["std_error"] < 0.03


def test_cas_keeps_noise_level_equal_to_sigma_and_als_does_not():
  point = toy.PointMass(np.zeros(1000))
  x0 = _init(64, 1000)
  _, cas = samplers.consistent_annealed(point.score, x0, SIGMAS, jax.random.key(3), step_lr=0.5,
                                        return_trajectory=True)
  np.testing.assert_allclose(cas["noise_std"] / cas["sigma"], 1.0, atol=0.01)
  # Exact point-mass score: noise_std is the rms of x itself.
  _, als = samplers.annealed_langevin(point.score, x0, SIGMAS, jax.random.key(3), step_lr=0.5,
                                      steps_per_sigma=1, return_trajectory=True)
  assert np.max(np.abs(als["noise_std"] / als["sigma"] - 1.0)) > 0.3


def test_cas_finer_ladder_and_pc_sampler():
  x0 = _init(2000)
  cas = samplers.consistent_annealed(MIX.score, x0, SIGMAS, jax.random.key(4), step_lr=0.3,
                                     n_sigma=5, denoise=True)
  np.testing.assert_allclose(toy.mode_weights(cas, MIX.means), [0.2, 0.8], atol=0.05)
  pc = samplers.predictor_corrector(MIX.score, x0, noise.geometric_sigmas(20.0, 0.1, 50),
                                    jax.random.key(5), snr=0.16, corrector_steps=2, denoise=True)
  np.testing.assert_allclose(toy.mode_weights(pc, MIX.means), [0.2, 0.8], atol=0.05)


def test_denoise_is_tweedie():
  g = toy.Gaussian(np.zeros(2), 1.0)
  x = jnp.array([[2.0, -1.0]])
  # E[x0 | x] for N(0, 1) data and sigma = 1 is x / 2.
  np.testing.assert_allclose(samplers.denoise(g.score, x, 1.0), x / 2, rtol=1e-6)


def test_inpainting_keeps_known_entries_and_uses_the_mask():
  g = toy.Gaussian(np.zeros(4), 1.0)
  x_known = jnp.tile(jnp.array([[3.0, 0.0, -3.0, 0.0]]), (256, 1))
  mask = jnp.array([1.0, 0.0, 1.0, 0.0])
  sigmas = noise.geometric_sigmas(5.0, 0.05, 10)
  # CAS shrinks the signal by about eta^2 sigma^2 / (1 + sigma^2) per level (its known bias on
  # non-degenerate data), so it runs on a finer ladder with a small eta here.
  for fn, kw in ((samplers.annealed_langevin, dict(steps_per_sigma=50, step_lr=5e-4)),
                 (samplers.consistent_annealed, dict(n_sigma=10, step_lr=2.5e-4))):
    x = fn(g.score, _init(256, 4, 5.0), sigmas, jax.random.key(6), mask=mask, x_known=x_known,
           **kw)
    np.testing.assert_array_equal(x[:, 0], 3.0)
    np.testing.assert_array_equal(x[:, 2], -3.0)
    # Independent coordinates: the unknown ones follow N(0, 1).
    assert abs(float(jnp.std(x[:, 1])) - 1.0) < 0.15
  with pytest.raises(ValueError, match="mask shape"):
    samplers.annealed_langevin(g.score, _init(256, 4), sigmas, jax.random.key(0), step_lr=1e-3,
                               steps_per_sigma=1, mask=jnp.ones(3), x_known=x_known)


def test_same_rng_same_samples_and_snapshots():
  a = samplers.annealed_langevin(MIX.score, _init(8), SIGMAS, jax.random.key(7), step_lr=0.1,
                                 steps_per_sigma=3, save_every=4)
  b = samplers.annealed_langevin(MIX.score, _init(8), SIGMAS, jax.random.key(7), step_lr=0.1,
                                 steps_per_sigma=3, save_every=4)
  np.testing.assert_array_equal(a[0], b[0])
  assert a[1]["samples"].shape == (2, 8, 2)


def test_traced_once_and_vmappable_over_step_sizes():
  traces = []

  def score(x, sigma):
    traces.append(1)
    return MIX.score(x, sigma)

  run = jax.jit(lambda x, r, lr: samplers.annealed_langevin(score, x, SIGMAS, r, step_lr=lr,
                                                            steps_per_sigma=5))
  run(_init(16), jax.random.key(0), 0.1)
  n = len(traces)
  run(_init(16, seed=1), jax.random.key(1), 0.2)
  assert len(traces) == n  # second call with the same shapes: no retrace
  grid = jax.vmap(lambda lr: run(_init(16), jax.random.key(0), lr))(jnp.array([0.05, 0.1, 0.2]))
  assert grid.shape == (3, 16, 2)


def test_compile_time_does_not_grow_with_levels():
  def compile_seconds(num_levels):
    sigmas = noise.geometric_sigmas(20.0, 1.0, num_levels)
    fn = jax.jit(lambda x, r: samplers.consistent_annealed(MIX.score, x, sigmas, r,
                                                           step_lr=0.5))
    t0 = time.perf_counter()
    fn.lower(_init(8), jax.random.key(0)).compile()
    return time.perf_counter() - t0

  compile_seconds(10)  # warm caches
  small, large = compile_seconds(10), compile_seconds(1000)
  assert large < 3 * small + 0.5


def test_invalid_inputs():
  x0 = _init(4)
  with pytest.raises(ValueError, match="descending"):
    samplers.annealed_langevin(MIX.score, x0, jnp.array([1.0, 2.0]), jax.random.key(0),
                               step_lr=0.1, steps_per_sigma=1)
  with pytest.raises(ValueError, match="> 0"):
    samplers.annealed_langevin(MIX.score, x0, jnp.array([2.0, -1.0]), jax.random.key(0),
                               step_lr=0.1, steps_per_sigma=1)
  with pytest.raises(ValueError, match="step_lr"):
    samplers.annealed_langevin(MIX.score, x0, SIGMAS, jax.random.key(0), step_lr=0.0,
                               steps_per_sigma=1)
  with pytest.raises(ValueError, match="infeasible"):
    samplers.consistent_annealed(MIX.score, x0, SIGMAS, jax.random.key(0), step_lr=5.0)


def _counting(score_fn):
  """`score_fn` plus a host counter of its batch evaluations (one per executed call)."""
  calls = []

  def fn(x, sigma):
    jax.debug.callback(lambda: calls.append(1))
    return score_fn(x, sigma)

  return fn, calls


FIXED_STEP = {
    "als": (lambda f, x, r, **kw: samplers.annealed_langevin(
        f, x, SIGMAS, r, step_lr=0.1, steps_per_sigma=3, **kw), 10 * 3),
    "als_denoise": (lambda f, x, r, **kw: samplers.annealed_langevin(
        f, x, SIGMAS, r, step_lr=0.1, steps_per_sigma=3, denoise=True, **kw), 10 * 3 + 1),
    "cas": (lambda f, x, r, **kw: samplers.consistent_annealed(
        f, x, SIGMAS, r, step_lr=0.5, n_sigma=2, denoise=True, **kw), 19),
    "pc": (lambda f, x, r, **kw: samplers.predictor_corrector(
        f, x, SIGMAS, r, snr=0.16, corrector_steps=2, **kw), 10 * 3),
    "pc_no_corrector": (lambda f, x, r, **kw: samplers.predictor_corrector(
        f, x, SIGMAS, r, snr=0.16, corrector_steps=0, denoise=True, **kw), 10),
    "langevin": (lambda f, x, r, **kw: samplers.langevin(
        f, x, r, sigma=1.0, n_steps=7, step_size=0.1, **kw), 7),
}


@pytest.mark.parametrize("name", sorted(FIXED_STEP))
def test_nfe_equals_the_number_of_score_calls(name):
  run, expected = FIXED_STEP[name]
  score, calls = _counting(MIX.score)
  x, info = jax.jit(lambda x, r: run(score, x, r, return_info=True))(_init(4), jax.random.key(0))
  jax.block_until_ready(x)
  assert info["nfe"] == expected == len(calls)


@pytest.mark.parametrize("name", ["als_denoise", "cas", "pc_no_corrector", "langevin"])
def test_per_example_keys_make_samples_independent_of_the_batch(name):
  run = jax.jit(lambda x, r: FIXED_STEP[name][0](MIX.score, x, r))
  keys = jax.random.split(jax.random.key(11), 64)
  x0 = _init(64)
  big = run(x0, keys)
  small = run(x0[:7], keys[:7])
  np.testing.assert_allclose(small, big[:7], rtol=1e-5, atol=1e-5)
  # Another key for example 0 changes example 0 only.
  other = run(x0[:7], keys[:7].at[0].set(jax.random.key(12)))
  assert not np.allclose(other[0], small[0])
  np.testing.assert_array_equal(other[1:], small[1:])


def test_one_key_still_works_and_info_merges_with_the_trajectory():
  x, info = samplers.annealed_langevin(MIX.score, _init(8), SIGMAS, jax.random.key(3),
                                       step_lr=0.1, steps_per_sigma=2, return_info=True,
                                       return_trajectory=True, save_every=5)
  assert info["nfe"] == 20 and info["samples"].shape == (2, 8, 2)
  assert info["noise_std"].shape == (10,)
  again = samplers.annealed_langevin(MIX.score, _init(8), SIGMAS, jax.random.key(3),
                                     step_lr=0.1, steps_per_sigma=2)
  np.testing.assert_array_equal(x, again)
  with pytest.raises(ValueError, match="per-example rng has 3 keys"):
    samplers.annealed_langevin(MIX.score, _init(8), SIGMAS, jax.random.split(jax.random.key(0), 3),
                               step_lr=0.1, steps_per_sigma=2)
