"""score_jax.export: one file with the EMA parameters and the config; sampling from it is
bit-identical to sampling from the workdir it came from."""

import hashlib
import json
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
  header = serialization.msgpack_restore(path.read_bytes())
  assert set(header) == {"format", "version", "sha256", "body"}
  payload = serialization.msgpack_restore(header["body"])
  assert set(payload) == {"config", "step", "params"}
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
  export.write(path, config.to_json(), params)
  with pytest.raises(export.ExportError, match="do not fit the network"):
    export.load(path)


def _file(body: dict | bytes, **header) -> bytes:
  """An export file around `body`, with a correct digest unless `header` overrides fields."""
  if isinstance(body, dict):
    body = serialization.msgpack_serialize(body)
  fields = {"format": export.FORMAT, "version": export.VERSION,
            "sha256": hashlib.sha256(body).hexdigest(), "body": body}
  fields.update(header)
  return serialization.msgpack_serialize(fields)


def _good_body() -> dict:
  config = test_config.get_config()
  params = init_state(config, models.build(config)).params
  return {"config": config.to_json(), "step": 3,
          "params": jax.tree.map(np.array, dict(params))}


def _load_error(tmp_path, content: bytes) -> str:
  path = tmp_path / "bad.msgpack"
  path.write_bytes(content)
  with pytest.raises(export.ExportError) as info:
    export.load(path)
  assert "\n" not in str(info.value) and str(path) in str(info.value)
  return str(info.value)


def test_flipped_bytes_are_refused_by_the_digest(workdir, tmp_path):
  path = tmp_path / "model.msgpack"
  export.write_workdir(str(workdir), path)
  data = path.read_bytes()
  rng = np.random.default_rng(0)
  # 16 bytes anywhere in the file: in the body they break the digest, in the header its fields.
  for start in (len(data) // 2, len(data) - 40, *rng.integers(0, len(data) - 16, size=8)):
    flipped = bytearray(data)
    for i in range(start, start + 16):
      flipped[i] ^= 0xFF
    _load_error(tmp_path, bytes(flipped))
  assert "do not match their sha256" in _load_error(
      tmp_path, data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:])


def test_non_finite_parameters_are_refused_at_export_and_at_load(tmp_path):
  config = test_config.get_config()
  params = jax.tree.map(np.array, dict(init_state(config, models.build(config)).params))
  leaf = jax.tree.leaves(params)[0]
  leaf.flat[0] = np.nan
  with pytest.raises(export.ExportError, match="non-finite") as info:
    export.write(tmp_path / "nan.msgpack", config.to_json(), params)
  assert "\n" not in str(info.value)
  assert not (tmp_path / "nan.msgpack").exists()
  body = _good_body()
  jax.tree.leaves(body["params"])[-1].flat[0] = np.inf
  assert "not finite" in _load_error(tmp_path, _file(body))


def _garbled(body: dict, **changes) -> dict:
  body = dict(body)
  for key, value in changes.items():
    if value is _DROP:
      del body[key]
    else:
      body[key] = value
  return body


_DROP = object()


@pytest.mark.parametrize("case, expect", [
    ("no_config", "expected config, params, step"),
    ("config_not_json", "is not a score_jax config"),
    ("config_a_list", "is not a score_jax config"),
    ("config_wrong_type", "is not a score_jax config"),
    ("config_bytes", "not JSON text"),
    ("step_string", "'step' is"),
    ("step_negative", "'step' is"),
    ("params_list", "not a non-empty map"),
    ("params_string_leaf", "not a float array"),
    ("body_not_map", "body is a"),
    ("body_not_msgpack", "body: "),
    ("digest_int", "damaged export header"),
    ("extra_field", "damaged export header"),
    ("version_1", "re-export it"),
])
def test_garbled_fields_give_one_line_export_errors(tmp_path, case, expect):
  good = _good_body()
  config = json.loads(good["config"])
  bodies = {
      "no_config": _garbled(good, config=_DROP),
      "config_not_json": _garbled(good, config="{not json"),
      "config_a_list": _garbled(good, config="[1, 2]"),
      "config_wrong_type": _garbled(good, config=json.dumps({**config, "seed": "zero"})),
      "config_bytes": _garbled(good, config=b"{}"),
      "step_string": _garbled(good, step="7"),
      "step_negative": _garbled(good, step=-1),
      "params_list": _garbled(good, params=[1.0]),
      "params_string_leaf": _garbled(good, params={"dense": {"kernel": "x"}}),
  }
  if case in bodies:
    content = _file(bodies[case])
  elif case == "body_not_map":
    content = _file(serialization.msgpack_serialize([1, 2, 3]))
  elif case == "body_not_msgpack":
    content = _file(b"\xc1\xc1\xc1")
  elif case == "digest_int":
    content = _file(good, sha256=7)
  elif case == "extra_field":
    content = _file(good, note="x")
  else:
    content = serialization.msgpack_serialize({"format": export.FORMAT, "version": 1, **good})
  assert expect in _load_error(tmp_path, content)
