"""--mode=export writes the slim file; score_jax.load of it samples bit-identically to the
workdir it came from."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import score_jax
from conftest import HANG_TIMEOUT_S, xla_flags
from configs import test as test_config
from score_jax import checkpoint, models
from score_jax.experiment import init_state

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(*args) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
  env.pop("SCORE_JAX_DEBUG", None)
  return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=HANG_TIMEOUT_S)


def _workdir(root: pathlib.Path) -> pathlib.Path:
  """A toy workdir as training writes it, with EMA weights distinct from the params."""
  config = test_config.get_config()
  state = init_state(config, models.build(config))
  ema = jax.tree.map(lambda a: 0.9 * a, state.params)
  state = state.replace(step=jnp.int32(5), ema_params=(ema,))
  manager = checkpoint.create_writer(str(root / "run"), async_save=False)
  checkpoint.save(manager, 5, state, data_state={"kind": "toy", "step": 5},
                  config_json=config.to_json())
  checkpoint.wait(manager)
  manager.close()
  return root / "run"


def test_export_mode_then_load_samples_bit_identically(tmp_path):
  workdir = _workdir(tmp_path)
  path = tmp_path / "model.msgpack"
  proc = _main("--mode=export", f"--workdir={workdir}", f"--export_path={path}")
  assert proc.returncode == 0, proc.stderr
  assert "exported step 5" in proc.stdout and path.is_file()

  config_w, state_w = score_jax.load_checkpoint(str(workdir))
  config_e, state_e = score_jax.load(str(path))
  assert config_e.to_json() == config_w.to_json() and state_e.step == 5
  rng = jax.random.key(3)
  from_workdir = np.asarray(score_jax.make_sampler(config_w, state_w)(rng, 16))
  from_export = np.asarray(score_jax.make_sampler(config_e, state_e)(rng, 16))
  assert np.isfinite(from_export).all()
  assert np.array_equal(from_workdir, from_export)


def test_export_mode_rejects_an_unwritable_path_before_loading(tmp_path):
  workdir = _workdir(tmp_path)
  proc = _main("--mode=export", f"--workdir={workdir}",
               f"--export_path={tmp_path / 'missing' / 'model.msgpack'}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --export_path=")
  assert not (tmp_path / "missing").exists()
