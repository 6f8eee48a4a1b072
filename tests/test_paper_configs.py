"""Every config in configs/ builds, names data splits its dataset has, and samples CAS feasibly.

Checks what a first evaluation or sample would otherwise find hours into a run: the evaluation
split exists for the dataset (TFDS `lsun` has train and validation only), and each CAS step size
(the config's and every sweep override's) lies in the feasibility interval
sigma_L^2 (1 -/+ gamma) of its sampling ladder.
"""

from __future__ import annotations

import importlib
import pathlib
import re

import jax
import numpy as np
import pytest

from score_jax import config_schema, experiment, models, noise, samplers, sampling
from score_jax.eval import reference_stats

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob(
    "*.py") if p.stem != "__init__")
# The splits of each dataset family, as TFDS (or the project's own builders) define them.
SPLITS = {"lsun": ("train", "validation"), "celeb_a": ("train", "validation", "test")}


def _module(name):
  return importlib.import_module(f"configs.{name}")


def _variants(name):
  module = _module(name)
  config = module.get_config()
  yield config
  for overrides in getattr(module, "get_sweep", lambda: [])():
    variant = config.copy_and_resolve_references()
    for key, value in overrides.items():
      group, _, field = key.rpartition(".")
      node = variant
      for part in group.split("."):
        node = node[part]
      node[field] = value
    yield variant


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_with_existing_splits_and_feasible_cas(name):
  for config in _variants(name):
    models.build(config)
    family = config.data.dataset.split("/")[0]
    if family in SPLITS:
      assert config.data.eval_split in SPLITS[family], (name, config.data.eval_split)
    cas = config.sampling.cas
    uses_cas = "cas" in tuple(config.sampling.methods) or config.sampling.method == "cas"
    if uses_cas:
      ladder = np.asarray(samplers.cas_ladder(experiment.sigmas_from_config(config), cas.n_sigma))
      noise.check_cas_step_lr(ladder, cas.step_lr)


def test_lsun_configs_evaluate_on_validation():
  for name in ("ncsnv2_church", "ncsnv2_bedroom", "adversarial_church"):
    assert _module(name).get_config().data.eval_split == "validation"
  assert _module("adversarial_church").get_config().model.name == "ncsnv2_deeper"


def test_ncsn_v1_configs_dequantize_and_sample_without_ema():
  for name in ("ncsn_mnist", "ncsn_cifar10", "ncsn_celeba"):
    config = _module(name).get_config()
    assert config.data.uniform_dequantization and not config.sampling.use_ema, name


def test_sampling_params_follow_use_ema():
  config = _module("test").get_config()
  state = experiment.init_state(config, models.build(config))
  state = state.replace(params=jax.tree.map(lambda v: v + 1.0, state.params))
  assert sampling.sampling_params(state, config.sampling.use_ema) is state.ema_params[0]
  config.sampling.use_ema = False
  assert sampling.sampling_params(state, config.sampling.use_ema) is state.params


@pytest.mark.parametrize("name, samples, split, images", [
    ("ncsnv2_cifar10", 50_000, "train", 50_000), ("cas_cifar10", 10_000, "train", 50_000),
    ("ncsn_cifar10", 50_000, "train", 50_000), ("ncsnv2_celeba", 50_000, "test", 19_962),
    ("adversarial_cifar10", 10_000, "train", 50_000),
    ("adversarial_cifar10_unet", 2_000, "train", 50_000),
    ("adversarial_church", 5_000, "train", 126_227)])
def test_paper_configs_default_to_the_papers_fid_protocol(name, samples, split, images):
  config = _module(name).get_config()
  assert config.eval.num_samples == samples
  assert config_schema.reference_split(config) == (split, images)
  exp = experiment.build(config)
  assert reference_stats.reference_split(exp.eval, exp.data) == (split, images)
  assert config.training.keep_every_steps == 5000


PAPER_CONFIGS = ("ncsnv2_cifar10", "cas_cifar10", "ncsn_cifar10", "ncsnv2_celeba",
                 "adversarial_cifar10", "adversarial_cifar10_unet", "adversarial_church")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_evaluate_with_their_docstrings_fid_anchor_count(name):
  """FID falls as the sample count grows: a config reproduces its anchor only at its count."""
  doc = " ".join(_module(name).__doc__.split())
  match = re.search(r"FID anchor: .*?(\d[\d,]*) samples against", doc)
  assert match, f"configs/{name}.py names no 'FID anchor: ... N samples against ...'"
  assert _module(name).get_config().eval.num_samples == int(match.group(1).replace(",", ""))


def test_reference_statistics_read_the_reference_split(tmp_path, monkeypatch):
  from score_jax import image_data
  config = _module("test").get_config()
  config.data.dataset, config.data.image_size, config.data.num_channels = "cifar10", 8, 3
  config.eval.num_samples, config.eval.batch_size = 10, 4
  config.eval.reference_split, config.eval.reference_num_images = "train", 6
  seen = []

  def fake_iterator(data_spec, *, split, seed, batch_size, shuffle=True, per_process=True):
    seen.append((split, batch_size, shuffle, per_process))
    while True:
      yield {"x": np.ones((batch_size, 8, 8, 3), np.float32)}

  monkeypatch.setattr(experiment.DataSpec, "iterator", fake_iterator)
  monkeypatch.setattr(image_data, "num_records", lambda **kw: 6 if kw["split"] == "train" else 0)
  exp = experiment.build(config)
  ref = reference_stats.reference_statistics(exp.eval, exp.data, str(tmp_path),
                                             lambda x: {"pool": x[:, 0, 0]}, "w", seed=exp.seed)
  assert seen == [("train", 4, False, False)] and len(ref["features"]) == 6
  assert ref["protocol"] == "cifar10:train first 6 images"
  assert (tmp_path / "eval_cache" / "ref_stats_cifar10_train_6.npz").is_file()
  config.eval.reference_num_images = 7
  exp = experiment.build(config)
  with pytest.raises(ValueError, match="eval.reference_num_images=7 exceeds the 6 images"):
    reference_stats.reference_statistics(exp.eval, exp.data, str(tmp_path),
                                         lambda x: {"pool": x[:, 0, 0]}, "w", seed=exp.seed)
