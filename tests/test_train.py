"""Training system: device-count invariance, fused steps, non-finite guard, resume, restore."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S

from configs import test as test_config
from score_jax import checkpoint, experiment, models, parallel, steps, train
from score_jax.train_state import TrainState


def _setup(config):
  model = models.build(config)
  sigmas = experiment.sigmas_from_config(config)
  kwargs = experiment.loss_kwargs_from_config(config, model, sigmas)
  return model, sigmas, kwargs


def _batch(config, seed=0):
  it = experiment.iterator_from_config(config, split="train", seed=seed,
                                  batch_size=config.training.batch_size)
  return next(it)


def _run_steps(config, num_devices, batches, fused=None):
  model, _, kwargs = _setup(config)
  mesh = parallel.make_mesh(num_devices)
  state = parallel.replicate(experiment.init_state(config, model), mesh)
  step = functools.partial(steps.train_step, ema_decays=tuple(config.training.ema_decays), **kwargs)
  p_step = parallel.data_parallel(step, mesh, fused_steps=fused)
  rng = jax.random.key(config.seed)
  metrics = []
  if fused:
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    state, m = p_step(state, parallel.shard_batch(stacked, mesh, fused_steps=fused), rng)
    metrics = [jax.tree.map(lambda x, i=i: x[i], m) for i in range(fused)]
  else:
    for b in batches:
      state, m = p_step(state, parallel.shard_batch(b, mesh), rng)
      metrics.append(m)
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("level_sampling", ["uniform", "stratified"])
def test_one_and_eight_devices_agree(level_sampling):
  config = test_config.get_config()
  config.noise.level_sampling = level_sampling
  batches = [_batch(config, 0), _batch(config, 1)]
  s1, m1 = _run_steps(config, 1, batches)
  s8, m8 = _run_steps(config, 8, batches)
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["level_count"], b["level_count"])
    # The mean gradient, not N times it (Adam would hide a scale error; clipping would not).
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.ema_params), jax.tree.leaves(s8.ema_params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  assert int(s8.step) == 2


def test_fused_steps_equal_single_steps():
  config = test_config.get_config()
  batches = [_batch(config, 0), _batch(config, 1)]
  single, m_single = _run_steps(config, 8, batches)
  fused, m_fused = _run_steps(config, 8, batches, fused=2)
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(fused.params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose([m["loss"] for m in m_single], [m["loss"] for m in m_fused],
                             rtol=1e-6)


def test_nonfinite_step_keeps_state():
  config = test_config.get_config()
  good = _batch(config, 0)
  bad = {"x": np.full_like(good["x"], np.nan)}
  state, metrics = _run_steps(config, 8, [good, bad])
  reference, _ = _run_steps(config, 8, [good])
  assert float(metrics[0]["nonfinite"]) == 0.0 and float(metrics[1]["nonfinite"]) == 1.0
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):  # params, EMA, Adam, step
    np.testing.assert_array_equal(a, b)


def test_nonfinite_training_stops_and_keeps_last_checkpoint(tmp_path):
  config = test_config.get_config()
  train.train_and_evaluate(experiment.build(config), str(tmp_path))
  config.training.num_train_steps = 40
  config.optim.lr = 1e30  # parameters overflow within a few steps.
  with pytest.raises(train.TrainingError, match="non-finite"):
    train.train_and_evaluate(experiment.build(config), str(tmp_path))
  manager = checkpoint.open_reader(str(tmp_path))
  assert checkpoint.latest_step(manager) == 20
  manager.close()


def _params(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def test_resume_equals_uninterrupted(tmp_path):
  config = test_config.get_config()
  full = train.train_and_evaluate(experiment.build(config), str(tmp_path / "full"))
  config.training.num_train_steps = 10
  train.train_and_evaluate(experiment.build(config), str(tmp_path / "resumed"))
  config.training.num_train_steps = 20
  resumed = train.train_and_evaluate(experiment.build(config), str(tmp_path / "resumed"))
  assert int(resumed.step) == 20
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)


def test_restore_onto_other_device_count(tmp_path):
  config = test_config.get_config()
  state8 = train.train_and_evaluate(experiment.build(config), str(tmp_path), num_devices=8)
  model = models.build(config)
  target = parallel.replicate(experiment.init_state(config, model), parallel.make_mesh(1))
  manager = checkpoint.open_reader(str(tmp_path))
  restored, data_state = checkpoint.restore(manager, 20, target)
  manager.close()
  assert isinstance(restored, TrainState)
  assert data_state == {"kind": "toy", "step": 20}
  assert restored.params["Dense_0"]["kernel"].sharding.num_devices == 1 if "Dense_0" in \
      restored.params else True
  for a, b in zip(_params(state8), _params(restored)):
    np.testing.assert_array_equal(a, b)


def test_incompatible_checkpoint_is_refused(tmp_path):
  config = test_config.get_config()
  train.train_and_evaluate(experiment.build(config), str(tmp_path))
  config.model.mlp.hidden = 16
  with pytest.raises(checkpoint.CheckpointError, match="model"):
    train.train_and_evaluate(experiment.build(config), str(tmp_path))


def test_ema_starts_as_copy_and_tracks():
  config = test_config.get_config()
  config.training.ema_decays = (0.9, 0.0)
  state, _ = _run_steps(config, 8, [_batch(config, 0)])
  for p, e0, e1 in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params[0]),
                       jax.tree.leaves(state.ema_params[1])):
    np.testing.assert_allclose(e1, p, rtol=1e-6)  # decay 0: EMA equals the params.
  model, _, _ = _setup(config)
  init = experiment.init_state(config, model)
  for p0, p, e in zip(jax.tree.leaves(init.params), jax.tree.leaves(state.params),
                      jax.tree.leaves(state.ema_params[0])):
    np.testing.assert_allclose(e, 0.9 * np.asarray(p0) + 0.1 * p, rtol=1e-5, atol=1e-7)


def test_optimizer_warmup_and_clip():
  tx = experiment.make_optimizer(optimizer="adam", lr=1.0, beta1=0.9, beta2=0.999, eps=1e-8,
                            warmup_steps=10, grad_clip=1e-3)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  updates, _ = tx.update({"w": jnp.array([3.0, 4.0, 0.0])}, state, params)
  # Step 0 of a linear warm-up from 0 has learning rate 0.
  np.testing.assert_allclose(updates["w"], 0.0)
  with pytest.raises(ValueError, match="optim.optimizer"):
    experiment.make_optimizer(optimizer="sgd", lr=1.0, beta1=0.9, beta2=0.9, eps=1e-8)


_RUN_AHEAD = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from score_jax import parallel
mesh = parallel.make_mesh(8)
def body(w, batch, rng):
  g = jax.grad(lambda w: jnp.mean(jnp.tanh(batch @ w) ** 2))(parallel.per_device(w))
  return w - 0.01 * jax.lax.pmean(g, parallel.BATCH_AXIS), {"g": jax.lax.pmean(jnp.sum(g), parallel.BATCH_AXIS)}
step = parallel.data_parallel(body, mesh)
x = jax.device_put(np.ones((2048, 256), np.float32), NamedSharding(mesh, P(parallel.BATCH_AXIS)))
w, rng, window = jnp.zeros((256, 256)), jax.random.key(0), parallel.DispatchWindow()
for i in range(1500):
  w, metrics = step(w, x, rng)
  window.add(metrics)
print("finished", float(np.asarray(jax.device_get(metrics["g"]))))
"""


def test_dispatch_window_prevents_the_run_ahead_deadlock():
  """1500 pmean steps dispatched back to back on 8 simulated devices. Without the window XLA:CPU
  deadlocks in the all-reduce (see `parallel.MAX_STEPS_IN_FLIGHT`)."""
  import os
  import subprocess
  import sys

  from conftest import REPO, xla_flags
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
  try:
    out = subprocess.run([sys.executable, "-c", _RUN_AHEAD], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    pytest.fail("the 8-device step loop hung despite parallel.DispatchWindow")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "finished" in out.stdout


def test_dispatch_window_bounds_pending_steps():
  window = parallel.DispatchWindow(limit=2)
  for i in range(5):
    window.add(jnp.asarray(i))
    assert len(window._pending) <= 2
  with pytest.raises(ValueError, match="at least one step"):
    parallel.DispatchWindow(limit=0)


def test_preemption_watch_of_one_process_sees_sigterm_and_restores_the_handler():
  import os
  import signal
  before = signal.getsignal(signal.SIGTERM)
  watch = parallel.PreemptionWatch()
  try:
    assert not watch.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watch.should_stop(2)
  finally:
    watch.close()
  assert signal.getsignal(signal.SIGTERM) == before


def test_from_main_returns_the_value_or_raises_the_error_of_process_0():
  from score_jax import workdir_lock

  def refuse():
    raise workdir_lock.WorkdirLockedError("held by someone")

  with pytest.raises(workdir_lock.WorkdirLockedError, match="held by someone"):
    parallel.from_main(refuse)
  assert parallel.from_main(lambda: 7) == 7
  assert parallel.all_processes(True) and not parallel.all_processes(False)
