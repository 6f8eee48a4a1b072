"""Configs: the per-sampler sampling groups, stored configs of the older layout."""

import pytest

from score_jax import experiment


def test_sampler_kwargs_are_the_samplers_own_arguments():
  config = experiment.config_from_dict({})
  assert experiment.sampler_kwargs(config, "als") == {"step_lr": 0.1, "steps_per_sigma": 100,
                                                      "denoise": True}
  assert experiment.sampler_kwargs(config, "cas") == {"step_lr": 0.3, "n_sigma": 1, "eta": None,
                                                      "denoise": True}
  assert experiment.sampler_kwargs(config, "pc") == {"snr": 0.16, "corrector_steps": 100,
                                                     "denoise": True}
  with pytest.raises(ValueError, match="'ald' is unknown"):
    experiment.sampler_kwargs(config, "ald")


def test_stored_config_with_one_step_lr_loads_into_the_sampler_groups():
  old = {"sampling": {"method": "als", "step_lr": 2e-5, "steps_per_sigma": 7, "n_sigma": 20,
                      "snr": 0.2, "also_cas": True, "cas_step_lr": 3e-5, "num_samples": 64}}
  config = experiment.config_from_dict(old)
  s = config.sampling
  assert (s.als.step_lr, s.als.steps_per_sigma) == (2e-5, 7)
  assert (s.cas.step_lr, s.cas.n_sigma) == (3e-5, 20)
  assert (s.pc.snr, s.pc.corrector_steps) == (0.2, 7)
  assert s.methods == ("als", "cas") and s.num_samples == 64
  cas_only = experiment.config_from_dict(
      {"sampling": {"method": "cas", "step_lr": 5e-6, "also_cas": False, "cas_step_lr": 0.3}})
  assert cas_only.sampling.cas.step_lr == 5e-6 and cas_only.sampling.methods == ("cas",)


def test_stored_config_of_the_current_layout_round_trips():
  import json
  config = experiment.config_from_dict({})
  config.sampling.cas.n_sigma = 5
  config.sampling.methods = ("pc",)
  again = experiment.config_from_dict(json.loads(config.to_json()))
  assert again.to_json() == config.to_json()
