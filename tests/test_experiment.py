"""`experiment.build`: the config turned once into a frozen `Experiment` of plain values."""

import dataclasses
import json
import types

import jax
import ml_collections
import numpy as np
import pytest

from configs import test as test_config
from score_jax import cli, experiment, models, parallel, rng_streams, sample, sampling, train


@pytest.fixture(scope="module")
def exp_and_config():
  config = test_config.get_config()
  return experiment.build(config), config


def test_experiment_is_frozen_and_holds_no_config(exp_and_config):
  exp, config = exp_and_config
  with pytest.raises(dataclasses.FrozenInstanceError):
    exp.seed = 1
  with pytest.raises(dataclasses.FrozenInstanceError):
    exp.train.batch_size = 1
  with pytest.raises(TypeError):
    exp.sampling.samplers["als"] = None
  with pytest.raises(TypeError):
    exp.sampling.sampler("als").kwargs["step_lr"] = 1.0
  with pytest.raises(TypeError):
    exp.train.loss_kwargs["loss"] = "ssm"

  def leaves(obj, seen):
    if id(obj) in seen:
      return
    seen.add(id(obj))
    yield obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
      for f in dataclasses.fields(obj):
        yield from leaves(getattr(obj, f.name), seen)
    elif isinstance(obj, (types.MappingProxyType, dict)):
      for v in obj.values():
        yield from leaves(v, seen)
    elif isinstance(obj, (tuple, list)):
      for v in obj:
        yield from leaves(v, seen)
    elif hasattr(obj, "func") and hasattr(obj, "keywords"):  # functools.partial
      yield from leaves(obj.keywords, seen)
      yield from leaves(obj.args, seen)

  found = [type(v).__name__ for v in leaves(exp, set())
           if isinstance(v, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict))]
  assert not found
  assert json.loads(exp.config_json) == json.loads(config.to_json())


def test_build_gives_the_config_readers_values(exp_and_config):
  exp, config = exp_and_config
  np.testing.assert_array_equal(exp.sigmas, experiment.sigmas_from_config(config))
  assert exp.example_shape == experiment.example_shape(config) == (2,)
  assert exp.model_name == "mlp" and exp.seed == config.seed
  assert exp.train.batch_size == config.training.batch_size
  assert exp.train.ema_decays == tuple(config.training.ema_decays)
  assert exp.train.batches_per_step == 1 and not exp.train.adversarial
  assert exp.data.dataset == config.data.dataset and exp.data.is_toy
  assert exp.eval.sweep_methods == tuple(config.eval.sweep_methods)
  assert exp.likelihood.rtol == config.likelihood.rtol
  assert exp.sampling.methods == ("als", "cas")
  assert set(exp.sampling.samplers) == set(sampling.SAMPLERS)
  for method in sampling.SAMPLERS:
    spec = exp.sampling.sampler(method)
    assert spec.settings() == experiment.sampler_settings(config, method)
    assert spec.fn is sampling.SAMPLERS[method].fn
  assert exp.sampling.sampler().method == config.sampling.method


def test_built_state_equals_the_config_readers_state(exp_and_config):
  exp, config = exp_and_config
  a = exp.train.init_state()
  b = experiment.init_state(config, models.build(config))
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)
  abstract = exp.train.abstract_state(parallel.make_mesh())
  assert [np.shape(s) for s in jax.tree.leaves(abstract)] == [np.shape(x) for x in leaves_a]


def test_named_streams_keep_the_numbers_they_replaced(exp_and_config):
  exp, _ = exp_and_config
  root = jax.random.key(exp.seed)
  for name, number in (("init", 0x1A17), ("sample", 0x5A3), ("inpaint", 0x1AA),
                       ("eval", 0xE7A1), ("eval_loss", 0xE7A1)):
    np.testing.assert_array_equal(jax.random.key_data(exp.key(name)),
                                  jax.random.key_data(jax.random.fold_in(root, number)))
  np.testing.assert_array_equal(
      jax.random.key_data(rng_streams.fold(root, "step.discriminator")),
      jax.random.key_data(jax.random.fold_in(root, 0xD15C)))
  with pytest.raises(KeyError, match="no random stream 'nope'"):
    exp.key("nope")


def test_the_cli_builds_the_experiment_once_per_run(tmp_path, monkeypatch):
  calls = []
  build = experiment.build

  def counting_build(config):
    calls.append(config)
    return build(config)

  monkeypatch.setattr(experiment, "build", counting_build)
  seen = {}
  trainer, sampler = train.train_and_evaluate, sample.sample_and_write

  def check_train(exp, *args, **kwargs):
    seen["train"] = exp
    return trainer(exp, *args, **kwargs)

  def check_sample(exp, *args, **kwargs):
    seen["sample"] = exp
    return sampler(exp, *args, **kwargs)

  monkeypatch.setattr(train, "train_and_evaluate", check_train)
  monkeypatch.setattr(sample, "sample_and_write", check_sample)
  config = test_config.get_config()
  config.training.num_train_steps = 10
  config.sampling.num_samples = 8
  config.sampling.batch_size = 8
  config.sampling.methods = ("als",)
  monkeypatch.setattr(cli, "FLAGS", types.SimpleNamespace(
      num_devices=None, allow_undigested_checkpoints=False, restart_from_scratch=False))
  cli.run(config, str(tmp_path), "train")
  assert len(calls) == 1
  assert isinstance(seen["train"], experiment.Experiment) and seen["sample"] is seen["train"]
