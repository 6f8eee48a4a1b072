"""Tests for data-parallel sampling (`parallel.batch_map`, `parallel.shard_sampler`).

Sample k's whole trajectory depends only on (seed, k): the same samples on 1 or 8 devices and
for any sampling batch size, also when the count does not divide the devices. A tiny toy MLP
with 4 noise levels keeps every draw to a fraction of a second.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from score_jax import experiment, models, parallel, sampling


@pytest.fixture(scope="module")
def toy():
  config = test_config.get_config()
  model = models.build(config)
  state = experiment.init_state(config, model)
  return config, model, state


def _sample_fn(config, model, method="als", **kw):
  kwargs = {**experiment.sampler_kwargs(config, method), **kw}
  return sampling.make_sample_fn(model, experiment.sigmas_from_config(config),
                                 experiment.example_shape(config), method=method,
                                 init=experiment.sampler_init(config, method), **kwargs)


@pytest.mark.parametrize("method", ["als", "pc"])
def test_samples_equal_on_one_and_eight_devices(toy, method):
  config, model, state = toy
  p1 = parallel.shard_sampler(_sample_fn(config, model, method), parallel.make_mesh(1))
  p8 = parallel.shard_sampler(_sample_fn(config, model, method), parallel.make_mesh(8))
  rng = jax.random.key(3)
  a = p1(state.ema_params[0], rng, 0, 16)
  b = p8(state.ema_params[0], rng, 0, 16)
  assert a.shape == (16, 2) and np.isfinite(a).all()
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_batch_7_and_64_and_uneven_counts_give_the_same_samples(toy):
  config, model, state = toy
  p_sample = parallel.shard_sampler(_sample_fn(config, model), parallel.make_mesh())
  params, rng = state.ema_params[0], jax.random.key(0)
  whole = p_sample(params, rng, 0, 64)
  in_sevens = np.concatenate([p_sample(params, rng, s, 7) for s in range(0, 21, 7)])
  np.testing.assert_allclose(in_sevens, whole[:21], rtol=1e-5, atol=1e-5)
  # 13 samples on 8 devices: padded and dropped; sample k is still sample k.
  np.testing.assert_allclose(p_sample(params, rng, 20, 13), whole[20:33], rtol=1e-5, atol=1e-5)
  assert len(np.unique(whole[:, 0])) == 64  # distinct keys, distinct samples


def test_per_example_keys_match_drawing_each_sample_alone(toy):
  config, model, state = toy
  fn = jax.jit(_sample_fn(config, model), static_argnums=2)
  params = state.ema_params[0]
  keys = parallel.sample_keys(jax.random.key(5), jnp.arange(4))
  batch = np.asarray(fn(params, keys))
  alone = np.asarray(fn(params, keys[2:3]))
  np.testing.assert_allclose(batch[2:3], alone, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="differs"):
    fn(params, keys, 3)


def test_make_sampler_uses_every_device_and_ignores_the_batch_size(toy):
  config, _, state = toy
  state = parallel.replicate(state, parallel.make_mesh())
  a = experiment.make_sampler(config, state)(jax.random.key(1), 21)
  config = config.copy_and_resolve_references()
  config.sampling.batch_size = 5
  b, aux = experiment.make_sampler(config, state, return_trajectory=True, save_every=2)(
      jax.random.key(1), 21)
  assert isinstance(a, np.ndarray) and a.shape == (21, 2)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert aux["sigma"].shape == (4,) and aux["samples"].shape == (2, 21, 2)
  assert aux["nfe"] == 4 * config.sampling.als.steps_per_sigma + 1


def test_batch_map_checks_its_batch():
  p_fn = parallel.batch_map(lambda shared, x: x * shared, parallel.make_mesh())
  np.testing.assert_array_equal(p_fn(2.0, np.arange(5.0)), 2.0 * np.arange(5.0))
  with pytest.raises(ValueError, match="non-empty"):
    p_fn(2.0, np.zeros((0,)))
  with pytest.raises(ValueError, match="start >= 0"):
    parallel.shard_sampler(lambda p, k: k, parallel.make_mesh())(None, jax.random.key(0), 0, 0)
