"""score_jax.convert: parity with the reference networks on fixtures in the runners' formats, strict
mapping, and one-line errors (exit 2, nothing written) for bad input. No torch needed: the
fixtures were made by tools/make_convert_fixtures.py."""

import json
import os
import pathlib
import subprocess
import sys
import zipfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S

from configs import default
from score_jax import checkpoint, convert, experiment, models, stored_config
from score_jax.experiment import init_state
from score_jax.score import make_score_fn

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "convert"
REPO = pathlib.Path(__file__).resolve().parents[1]


def _meta(name: str) -> dict:
  with np.load(FIXTURES / f"{name}.npz") as d:
    return json.loads(str(d["meta"]))


def fixture_overrides(name: str) -> dict:
  """Dotted config overrides that describe fixture `name`'s network."""
  m = _meta(name)
  out = {"data.dataset": "cifar10", "model.name": convert.MODEL_OF_SOURCE[m["source"]],
         "data.image_size": m["image_size"],
         "data.num_channels": m["num_channels"], "noise.sigma_max": m["sigma_max"],
         "noise.sigma_min": m["sigma_min"], "noise.num_scales": m["num_scales"]}
  if "ch_mult" in m:
    out["model.unet.ch"] = m["ngf"]
    out["model.unet.ch_mult"] = tuple(m["ch_mult"])
    out["model.unet.attn_resolutions"] = tuple(m["attn_resolutions"])
    out["model.unet.input_range"] = "unit"
  else:
    out["model.ncsn.ngf"] = m["ngf"]
  return out


def fixture_config(name: str, **changes):
  config = default.get_config()
  for key, value in {**fixture_overrides(name), **changes}.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def cli_args(name: str, workdir, *, source=None, checkpoint=None, **changes) -> list[str]:
  args = ["convert", f"--source={source or _meta(name)['source']}",
          f"--checkpoint={checkpoint or FIXTURES / (name + '.pth')}",
          f"--config={REPO / 'configs' / 'default.py'}", f"--workdir={workdir}"]
  for key, value in {**fixture_overrides(name), **changes}.items():
    if isinstance(value, tuple):
      value = "(" + ",".join(map(str, value)) + ",)"
    args.append(f"--config.{key}={value}")
  return args


def network_outputs(name: str, config, param_sets, *, raw_output: bool = False) -> list:
  """score_jax's scores (or raw network outputs) on the fixture's inputs, one per parameter set
  (one compilation for all)."""
  with np.load(FIXTURES / f"{name}.npz") as d:
    x, sigma = jnp.asarray(d["x"]), jnp.asarray(d["sigma"])
  model = models.build(config)
  if raw_output:
    fn = lambda p, x, s: model.apply({"params": p}, x, s)
  else:
    fn = lambda p, x, s: make_score_fn(model, p)(x, s)
  jitted = jax.jit(fn)
  return [np.asarray(jitted(p, x, sigma)) for p in param_sets]


def assert_parity(got: np.ndarray, want: np.ndarray) -> None:
  """Within 1e-5 relative (to the largest reference value, so near-zero entries do not decide)."""
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("name", ["ncsn", "ncsnv2", "ncsnv2_deeper", "ncsnv2_deepest"])
def test_scores_match_the_reference(name):
  """EMA weights (the default) and raw weights (--no-ema), from the runner's checkpoint list."""
  config = fixture_config(name)
  source = _meta(name)["source"]
  exp = experiment.build(config)
  ema = convert.convert(source, FIXTURES / f"{name}.pth", exp, ema=True)
  raw = convert.convert(source, FIXTURES / f"{name}.pth", exp, ema=False)
  flat = flax.traverse_util.flatten_dict(ema)
  assert {k: v.shape for k, v in flat.items()} == convert._param_shapes(exp)
  assert all(v.dtype == np.float32 for v in flat.values())
  got_ema, got_raw = network_outputs(name, config, [ema, raw])
  with np.load(FIXTURES / f"{name}.npz") as d:
    assert_parity(got_ema, d["score_ema"])
    assert_parity(got_raw, d["score_raw"])


def test_unet_outputs_match_the_reference_which_does_not_rescale_its_input():
  """The AC UNet applies its first conv to the [0, 1] data as they are (AC `models/UNet.py`,
  `rescaled: false`); the fixture's inputs span [-1, 1], so [0, 1] and the range 2x - 1 makes."""
  config = fixture_config("ac_unet")
  ema = convert.convert("ac_unet", FIXTURES / "ac_unet.pth", experiment.build(config))
  raw = convert.convert("ac_unet", FIXTURES / "ac_unet.pth", experiment.build(config), ema=False)
  got_ema, got_raw = network_outputs("ac_unet", config, [ema, raw], raw_output=True)
  with np.load(FIXTURES / "ac_unet.npz") as d:
    x, want_ema, want_raw = d["x"], d["score_ema"], d["score_raw"]
  assert x.min() < 0.0 < x.max() and not config.data.centered
  assert_parity(got_ema, want_ema)
  assert_parity(got_raw, want_raw)
  # The DDPM range instead (2x - 1 inside, the converter's old network) is far off.
  centered = fixture_config("ac_unet", **{"model.unet.input_range": "centered"})
  off = network_outputs("ac_unet", centered, [ema], raw_output=True)[0]
  assert np.abs(off - want_ema).max() > 0.1 * np.abs(want_ema).max()


def test_unet_names_and_shapes_convert_strictly():
  """Every UNet parameter is filled and every reference tensor but the unused time MLP is used."""
  config = fixture_config("ac_unet")
  params = convert.convert("ac_unet", FIXTURES / "ac_unet.pth", experiment.build(config),
                           ema=False)
  flat = flax.traverse_util.flatten_dict(params)
  assert ("down1_attn0", "q", "kernel") in flat and ("down0_pool", "kernel") in flat
  # The reference Nin shortcut `(out, in)` becomes a 1x1 HWIO kernel.
  assert flat[("up1_res0", "shortcut", "kernel")].shape == (1, 1, 64, 32)


def restore_workdir(workdir) -> tuple:
  """`(config, state)` of a workdir's latest checkpoint, restored as `experiment.load_checkpoint`
  does (stored config over the schema, `experiment.init_state`'s structure as the target), with the
  target built abstractly: initializing a RefineNet eagerly takes minutes on a loaded CPU."""
  manager = checkpoint.open_reader(str(workdir))
  try:
    step = checkpoint.latest_step(manager)
    config = stored_config.config_from_dict(checkpoint.restore_config(manager, step))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
        jax.eval_shape(lambda: init_state(config, models.build(config))))
    state, _ = checkpoint.restore(manager, step, target)
  finally:
    manager.close()
  return config, state


def test_cli_writes_a_workdir_that_restores_as_training_writes_it(tmp_path, capsys):
  workdir = tmp_path / "out"
  assert convert.main(cli_args("ncsnv2", workdir)) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["weights"] == "EMA"
  config, state = restore_workdir(workdir)
  assert config.model.name == "ncsnv2" and config.model.ncsn.ngf == 4
  want = convert.convert("ncsnv2", FIXTURES / "ncsnv2.pth",
                         experiment.build(fixture_config("ncsnv2")))
  for tree in (state.params, state.ema_params[0]):
    got = jax.tree.map(np.asarray, flax.core.unfreeze(tree))
    jax.tree.map(np.testing.assert_array_equal, got, want)
  assert int(state.step) == 0


def test_cli_no_ema_takes_the_raw_weights(tmp_path, capsys):
  workdir = tmp_path / "out"
  assert convert.main(cli_args("ncsnv2", workdir) + ["--no-ema"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["weights"] == "raw"


def _forbidden_pickle(path: pathlib.Path) -> None:
  """A zip checkpoint whose data.pkl calls `os.system` (never executed: the reader refuses it)."""
  payload = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", payload)
    z.writestr("archive/version", "3\n")


def _truncated(path: pathlib.Path) -> None:
  data = (FIXTURES / "ncsnv2.pth").read_bytes()
  path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case, expect", [
    ("unknown_source", "--source='ncsn3' is unknown"),
    ("wrong_source", "looks like --source=ncsn"),
    ("shape_mismatch", "has shape"),
    ("truncated", "not a readable PyTorch checkpoint"),
    ("forbidden_global", "forbidden global 'os.system'"),
    ("wrong_sigmas", "sigmas buffer"),
    ("model_name", "converts to model.name='ncsnv2'"),
    ("old_field", "--config.model.ngf is not a config field; it is now --config.model.ncsn.ngf"),
    ("unet_range", "set --config.model.unet.input_range=unit"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, case, expect):
  workdir = tmp_path / "out"
  if case == "unknown_source":
    args = cli_args("ncsnv2", workdir, source="ncsn3")
  elif case == "wrong_source":  # an NCSN v1 file converted as NCSNv2
    args = cli_args("ncsn", workdir, source="ncsnv2", **{"model.name": "ncsnv2"})
  elif case == "shape_mismatch":
    args = cli_args("ncsnv2", workdir, **{"model.ncsn.ngf": 8})
  elif case == "truncated":
    _truncated(tmp_path / "t.pth")
    args = cli_args("ncsnv2", workdir, checkpoint=tmp_path / "t.pth")
  elif case == "forbidden_global":
    _forbidden_pickle(tmp_path / "f.pth")
    args = cli_args("ncsnv2", workdir, checkpoint=tmp_path / "f.pth")
  elif case == "wrong_sigmas":
    args = cli_args("ncsnv2", workdir, **{"noise.sigma_max": 2.0})
  elif case == "unet_range":  # the AC UNet converted into a network that rescales its input
    args = cli_args("ac_unet", workdir, **{"model.unet.input_range": "centered"})
  elif case == "old_field":  # a flag of the flat model group of older configs
    args = cli_args("ncsnv2", workdir, **{"model.ngf": 32})
  else:
    args = cli_args("ncsnv2", workdir, **{"model.name": "ncsn"})
  assert convert.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert expect in err, err
  assert not workdir.exists()


def test_no_tensors_left_over_are_reported_by_name(tmp_path):
  """A tensor the network does not have (here: an extra layer) is an unexpected key."""
  ckpt = convert.read_checkpoint(FIXTURES / "ncsnv2.pth")
  model_sd = dict(ckpt.model, **{"extra.weight": np.zeros((2, 2), np.float32)})
  ckpt = convert.RunnerCheckpoint(model=model_sd, ema=None, path="x.pth")
  exp = experiment.build(fixture_config("ncsnv2"))
  with pytest.raises(convert.ConversionError, match=r"1 unexpected \(extra.weight\)"):
    convert._convert_loaded("ncsnv2", ckpt, exp, convert._param_shapes(exp), ema=True)


def test_runner_layout_is_read_by_element():
  ckpt = convert.read_checkpoint(FIXTURES / "ncsnv2.pth")
  assert "sigmas" in ckpt.model and not any(k.startswith("module.") for k in ckpt.model)
  assert ckpt.ema is not None and set(ckpt.ema) == set(ckpt.model) - {"sigmas"}
  assert convert.read_checkpoint(FIXTURES / "ncsn.pth").ema is None


def test_module_entry_point_exits_2(tmp_path):
  """`python -m score_jax.convert` itself: exit status 2 and one line on stderr."""
  _forbidden_pickle(tmp_path / "f.pth")
  args = cli_args("ncsnv2", tmp_path / "out", checkpoint=tmp_path / "f.pth")[1:]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "score_jax.convert", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
  assert not (tmp_path / "out").exists()


def test_more_than_one_process_is_refused_in_one_line(tmp_path, capsys):
  """Under `score_jax.launch` every process would write the same workdir: refused, exit 2."""
  workdir = tmp_path / "out"
  flags = ["--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=1"]
  assert convert.main(cli_args("ncsnv2", workdir) + flags) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --num_processes=2") and err.count("\n") == 1, err
  assert not workdir.exists()
