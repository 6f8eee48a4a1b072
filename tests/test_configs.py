"""Configs: every file in configs/ loads, validates and builds; sampler groups; stored configs."""

import importlib
import json
import pathlib

import pytest

from score_jax import experiment, sampling, stored_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_sampler_kwargs_are_the_samplers_own_arguments():
  config = stored_config.config_from_dict({})
  assert experiment.sampler_kwargs(config, "als") == {"step_lr": 0.0005, "steps_per_sigma": 100,
                                                      "denoise": True}
  assert experiment.sampler_kwargs(config, "cas") == {"step_lr": 0.00055, "n_sigma": 10,
                                                      "eta": None, "denoise": True}
  assert experiment.sampler_kwargs(config, "dpm_solver_pp_2m") == {
      "ladder": "karras", "num_steps": 25, "rho": 7.0, "sigma_max": None, "sigma_min": None}
  assert "denoise" not in experiment.sampler_kwargs(config, "heun")
  assert experiment.sampler_kwargs(config, "pc") == {"snr": 0.16, "corrector_steps": 100,
                                                     "denoise": True}
  with pytest.raises(ValueError, match="'ald' is unknown"):
    experiment.sampler_kwargs(config, "ald")


def test_only_the_annealed_chains_start_from_sampling_init():
  """ALS and CAS start where `sampling.init` says (U[0, 1] for NCSN images); PC, the ODE samplers
  and the adaptive solver discretize the VE SDE/ODE and start from its prior N(0, sigma_max^2)."""
  config = stored_config.config_from_dict({"sampling": {"init": "uniform"}})
  inits = {m: experiment.sampler_init(config, m) for m in sampling.SAMPLERS}
  assert inits == {m: "uniform" if m in ("als", "cas") else "gaussian" for m in sampling.SAMPLERS}


def test_stored_config_with_one_step_lr_loads_into_the_sampler_groups():
  old = {"sampling": {"method": "als", "step_lr": 2e-5, "steps_per_sigma": 7, "n_sigma": 20,
                      "snr": 0.2, "also_cas": True, "cas_step_lr": 3e-5, "num_samples": 64}}
  config = stored_config.config_from_dict(old)
  s = config.sampling
  assert (s.als.step_lr, s.als.steps_per_sigma) == (2e-5, 7)
  assert (s.cas.step_lr, s.cas.n_sigma) == (3e-5, 20)
  assert (s.pc.snr, s.pc.corrector_steps) == (0.2, 7)
  assert s.methods == ("als", "cas") and s.num_samples == 64
  cas_only = stored_config.config_from_dict(
      {"sampling": {"method": "cas", "step_lr": 5e-6, "also_cas": False, "cas_step_lr": 0.3}})
  assert cas_only.sampling.cas.step_lr == 5e-6 and cas_only.sampling.methods == ("cas",)


# The `model` group as configs stored it before the per-network sub-groups (every network's
# fields side by side), here with a 16-wide MLP.
FLAT_MODEL = {"name": "mlp", "hidden": 16, "num_layers": 2, "activation": "elu", "ngf": 64,
              "nonlinearity": "swish", "ch_mult": [1, 2], "num_res_blocks": 1,
              "attn_resolutions": [8], "dropout": 0.1, "conditional": True, "dtype": "float32",
              "remat": True}


def test_stored_config_with_the_flat_model_group_loads_into_the_network_groups():
  m = stored_config.config_from_dict({"model": FLAT_MODEL}).model
  assert (m.name, m.dtype, m.remat) == ("mlp", "float32", True)
  assert (m.mlp.hidden, m.mlp.num_layers, m.mlp.activation) == (16, 2, "elu")
  assert (m.ncsn.ngf, m.ncsn.nonlinearity) == (64, "swish")
  assert (m.unet.ch, m.unet.ch_mult, m.unet.num_res_blocks, m.unet.attn_resolutions,
          m.unet.dropout, m.unet.conditional) == (128, (1, 2), 1, (8,), 0.1, True)
  # A UNet's width was `ngf` too; it is `unet.ch` now.
  m = stored_config.config_from_dict({"model": {**FLAT_MODEL, "name": "unet"}}).model
  assert (m.unet.ch, m.ncsn.ngf) == (64, 128)


def test_checkpoint_with_the_flat_model_group_loads_and_resumes(tmp_path):
  """A workdir written before the per-network groups: `load_checkpoint` reads it, and a run of
  the same network in the new layout may resume it (`check_compatible`), another may not."""
  import jax
  import numpy as np

  from configs import test as test_config
  from score_jax import checkpoint, models
  config = test_config.get_config()
  config.model.mlp.hidden, config.model.mlp.activation = 16, "elu"
  state = experiment.init_state(config, models.build(config))
  state = state.replace(step=jax.numpy.asarray(3, jax.numpy.int32))  # as training saves it
  stored = {**json.loads(config.to_json()), "model": FLAT_MODEL}
  manager = checkpoint.create_writer(str(tmp_path), async_save=False)
  checkpoint.save(manager, 3, state, data_state={}, config_json=json.dumps(stored))
  checkpoint.wait(manager)
  manager.close()

  loaded, restored = experiment.load_checkpoint(str(tmp_path))
  assert (loaded.model.mlp.hidden, loaded.model.mlp.activation) == (16, "elu")
  assert int(restored.step) == int(state.step)
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  manager = checkpoint.open_reader(str(tmp_path))
  try:
    raw = checkpoint.restore_config(manager, 3)
  finally:
    manager.close()
  assert "hidden" in raw["model"]  # the file keeps its layout; readers translate it
  stored_config.check_compatible(raw, loaded, "runs/x")
  loaded.model.mlp.hidden = 32
  with pytest.raises(checkpoint.CheckpointError, match="incompatible run.*model"):
    stored_config.check_compatible(raw, loaded, "runs/x")


def test_stored_config_of_the_current_layout_round_trips():
  config = stored_config.config_from_dict({})
  config.sampling.cas.n_sigma = 5
  config.sampling.methods = ("pc",)
  again = stored_config.config_from_dict(json.loads(config.to_json()))
  assert again.to_json() == config.to_json()


CONFIG_FILES = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_loads_validates_and_builds(name):
  """Each config file: default's fields only, valid for every mode, its state has shapes."""
  import jax

  from score_jax import cli, config_schema, models
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config()
  assert set(config_schema.leaves(config)) == set(config_schema.FIELDS)
  devices = jax.device_count()
  config.training.batch_size = -(-config.training.batch_size // devices) * devices
  config_schema.validate(config, modes=config_schema.MODES)
  for overrides in getattr(module, "get_sweep", lambda: [])():
    config_schema.validate(cli._apply_overrides(config, overrides), modes=("train",))
  model = models.build(config)
  state = jax.eval_shape(lambda: experiment.init_state(config, model))
  score = getattr(state, "score", state)
  assert jax.tree.leaves(score.params) and len(score.ema_params) == len(
      config.training.ema_decays)


def test_make_sampler_runs_each_sampler_and_names_a_wrong_argument():
  import jax
  import numpy as np

  from configs import test as test_config
  from score_jax import models
  config = test_config.get_config()
  state = experiment.init_state(config, models.build(config))
  small = {"als": {"steps_per_sigma": 2}, "cas": {"n_sigma": 1}, "pc": {"corrector_steps": 1}}
  for method, overrides in small.items():
    x = experiment.make_sampler(config, state, method=method, **overrides)(jax.random.key(0), 4)
    assert x.shape == (4, 2) and np.isfinite(np.asarray(x)).all(), method
  with pytest.raises(ValueError, match="steps_per_sigma is not an argument of the cas sampler"):
    experiment.make_sampler(config, state, method="cas", steps_per_sigma=3)
