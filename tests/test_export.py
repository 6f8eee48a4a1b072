"""score_jax.export: one file with the EMA parameters and the config; sampling from it is
bit-identical to sampling from the workdir it came from."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from configs import test as test_config
from score_jax import checkpoint, export, experiment, models
from score_jax.experiment import init_state


@pytest.fixture
def workdir(tmp_path) -> pathlib.Path:
  """A toy workdir written as training writes it, with EMA weights distinct from the params."""
  config = test_config.get_config()
  config.training.ema_decays = (0.999, 0.99)
  state = init_state(config, models.build(config))
  shift = lambda i: jax.tree.map(lambda a: a * (1.0 + 0.1 * (i + 1)), state.params)
  state = state.replace(step=jnp.int32(7), ema_params=tuple(shift(i) for i in range(2)))
  manager = checkpoint.create_writer(str(tmp_path / "run"), async_save=False)
  checkpoint.save(manager, 7, state, data_state={"kind": "toy", "step": 7},
                  config_json=config.to_json())
  checkpoint.wait(manager)
  manager.close()
  return tmp_path / "run"


def test_export_then_load_samples_bit_identically(workdir, tmp_path):
  path = tmp_path / "model.msgpack"
  export.write_workdir(str(workdir), path)
  config_w, state_w = experiment.load_checkpoint(str(workdir))
  config_e, state_e = export.load(path)
  assert config_e.to_json() == config_w.to_json()
  assert state_e.step == 7
  rng = jax.random.key(3)
  from_workdir = np.asarray(experiment.make_sampler(config_w, state_w)(rng, 16))
  from_export = np.asarray(experiment.make_sampler(config_e, state_e)(rng, 16))
  assert np.array_equal(from_workdir, from_export)
  assert np.isfinite(from_export).all()


def test_export_holds_the_first_ema_tree_and_no_optimizer_state(workdir, tmp_path):
  path = tmp_path / "model.msgpack"
  export.write_workdir(str(workdir), path)
  payload = serialization.msgpack_restore(path.read_bytes())
  assert set(payload) == {"format", "version", "config", "step", "params"}
  _, state = experiment.load_checkpoint(str(workdir))
  want = jax.tree.map(np.asarray, state.ema_params[0])
  jax.tree.map(np.testing.assert_array_equal, payload["params"], dict(want))
  n_bytes = sum(a.nbytes for a in jax.tree.leaves(want))
  assert path.stat().st_size < n_bytes + 16_384


def test_load_reads_file_urls(workdir, tmp_path):
  path = tmp_path / "model.msgpack"
  export.write_workdir(str(workdir), path)
  config, state = export.load(path.as_uri())
  assert config.name == "test" and state.ema_params[0] is state.params


@pytest.mark.parametrize("content, expect", [
    (b"not msgpack at all", "is not a score_jax export"),
    (serialization.msgpack_serialize({"format": "other"}), "no format tag"),
    (serialization.msgpack_serialize({"format": export.FORMAT, "version": 99}),
     "export version 99"),
])
def test_bad_files_give_one_line_errors(tmp_path, content, expect):
  path = tmp_path / "bad.msgpack"
  path.write_bytes(content)
  with pytest.raises(export.ExportError, match=expect) as info:
    export.load(path)
  assert "\n" not in str(info.value)


def test_params_that_do_not_fit_the_config_are_refused(tmp_path):
  config = test_config.get_config()
  params = init_state(config, models.build(config)).params
  config.model.mlp.hidden = 16
  path = tmp_path / "m.msgpack"
  export.write(path, config, params)
  with pytest.raises(export.ExportError, match="do not fit the network"):
    export.load(path)
