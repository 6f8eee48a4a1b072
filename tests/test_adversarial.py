"""Adversarial score matching: equivalence to DSM at lambda_G = 0, device invariance, resume, CLI."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S, main_env, run_main

from configs import adversarial_toy
from configs import test as test_config
from score_jax import (checkpoint, config_schema, experiment, models, parallel, rng_streams, steps,
                       train)
from score_jax.train_state import AdversarialState

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(**adversarial_overrides):
  config = test_config.get_config()
  config.data.dataset = "eight_gaussians"
  config.optim.beta1 = 0.0
  config.optim.beta2 = 0.9
  config.adversarial.enabled = True
  config.adversarial.d_arch = "mlp"
  config.adversarial.d_ch = 16
  config.adversarial.d_lr = 1e-3
  for k, v in adversarial_overrides.items():
    config.adversarial[k] = v
  return config


def _batches(config, n=2):
  """`n` steps' data: a batch each, or `d_steps` batches stacked in reading order."""
  it = experiment.iterator_from_config(config, split="train", seed=0,
                                       batch_size=config.training.batch_size)
  m = experiment.batches_per_step(config)
  if m == 1:
    return [next(it) for _ in range(n)]
  return [_stack([next(it) for _ in range(m)]) for _ in range(n)]


def _stack(batches):
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _run(config, num_devices, batches, step=None, fused=None):
  model = models.build(config)
  kwargs = experiment.loss_kwargs_from_config(config, model, experiment.sigmas_from_config(config))
  mesh = parallel.make_mesh(num_devices)
  state = parallel.replicate(experiment.init_state(config, model), mesh)
  m = experiment.batches_per_step(config)
  p_step = parallel.data_parallel(step or experiment.step_fn_from_config(config, kwargs), mesh,
                                  fused_steps=fused, batches_per_step=m)
  rng = jax.random.key(config.seed)
  if fused:
    state, stacked = p_step(state, parallel.shard_batch(_stack(batches), mesh, fused_steps=fused,
                                                        batches_per_step=m), rng)
    return jax.device_get(state), [jax.tree.map(lambda x, i=i: x[i], jax.device_get(stacked))
                                   for i in range(fused)]
  metrics = []
  for b in batches:
    state, metrics_b = p_step(state, parallel.shard_batch(b, mesh, batches_per_step=m), rng)
    metrics.append(metrics_b)
  return jax.device_get(state), jax.device_get(metrics)


def test_nonfinite_step_keeps_both_networks():
  config = _config(d_steps=2)
  good, _ = _batches(config)
  bad = dict(good, x=np.full_like(good["x"], np.nan))
  state, metrics = _run(config, 8, [good, bad])
  reference, _ = _run(config, 8, [good])
  assert float(metrics[0]["nonfinite"]) == 0.0 and float(metrics[1]["nonfinite"]) == 1.0
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):  # score, disc, steps
    np.testing.assert_array_equal(a, b)


def test_lambda_g_zero_gives_the_plain_dsm_update():
  config = _config(lambda_g=0.0, d_steps=2)
  batches = _batches(config)
  adv, adv_metrics = _run(config, 8, batches)
  assert isinstance(adv, AdversarialState)
  config.adversarial.enabled = False
  # The score network steps on the last of each step's d_steps batches (the reference's order).
  plain, plain_metrics = _run(config, 8, [{k: v[-1] for k, v in b.items()} for b in batches])
  for a, b in zip(jax.tree.leaves(adv.score.params), jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose([m["loss"] for m in adv_metrics],
                             [m["loss"] for m in plain_metrics], rtol=1e-6)
  # The discriminator did train (2 updates per step) on its own draws.
  assert int(adv.disc.step) == 4
  assert all(np.isfinite(m["d_loss"]) and 0 <= m["d_acc_fake"] <= 1 for m in adv_metrics)


@pytest.mark.parametrize("gan_loss,d_steps", [("lsgan", 1), ("rahinge", 1), ("lsgan", 2)])
def test_one_and_eight_devices_agree(gan_loss, d_steps):
  config = _config(gan_loss=gan_loss, d_steps=d_steps)
  batches = _batches(config)
  s1, m1 = _run(config, 1, batches)
  s8, m8 = _run(config, 8, batches)
  # With hinge losses some gradient entries are ~0 and Adam's g / (|g| + eps) turns their float
  # rounding (different summation order on 8 devices) into lr-sized steps; the metrics below,
  # gradient norms included, still agree to 1e-5, so the objective is the same.
  if gan_loss == "lsgan":
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for a, b in zip(m1, m8):
    for k in ("loss", "d_loss", "g_loss", "d_acc_fake", "grad_norm", "d_grad_norm"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a["level_d_count"], b["level_d_count"])


def _discriminator_by_hand(config, batch, order):
  """The step's discriminator updates on 8 devices, update k on batch `order[k]` of `batch`."""
  model = models.build(config)
  kwargs = experiment.loss_kwargs_from_config(config, model, experiment.sigmas_from_config(config))
  mesh = parallel.make_mesh(8)
  state = parallel.replicate(experiment.init_state(config, model), mesh)
  d_model = experiment.discriminator_from_config(config)
  a = config.adversarial

  def body(state, batch, rng):
    d_rng = rng_streams.fold(jax.random.fold_in(rng, state.step), "step.discriminator")
    for k, i in enumerate(order):
      state, _ = steps._d_update(state, {key: v[i] for key, v in batch.items()},
                                 jax.random.fold_in(d_rng, k), d_model=d_model,
                                 gan_loss=a.gan_loss, lambda_d=a.lambda_d, clamp=None,
                                 loss_kwargs=kwargs)
    return state.disc, {}

  p_body = parallel.data_parallel(body, mesh, batches_per_step=2, donate_state=False)
  disc, _ = p_body(state, parallel.shard_batch(batch, mesh, batches_per_step=2),
                   jax.random.key(config.seed))
  return jax.device_get(disc)


def test_each_discriminator_update_reads_its_own_batch():
  config = _config(d_steps=2)
  (batch,) = _batches(config, 1)
  assert not np.array_equal(batch["x"][0], batch["x"][1])
  state, _ = _run(config, 8, [batch])
  by_hand = _discriminator_by_hand(config, batch, order=(0, 1))
  for a, b in zip(jax.tree.leaves(state.disc), jax.tree.leaves(by_hand)):
    np.testing.assert_array_equal(a, b)
  # Reusing the first batch for both updates (the former behaviour) gives another discriminator.
  reused = _discriminator_by_hand(config, batch, order=(0, 0))
  assert max(float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(state.disc.params), jax.tree.leaves(reused.params))) > 1e-6


def test_d_steps_batches_must_be_stacked():
  config = _config(d_steps=2)
  unstacked = {k: v[0] for k, v in _batches(config, 1)[0].items()}
  mesh = parallel.make_mesh(8)
  with pytest.raises(ValueError, match=r"batches_per_step=2 it needs the leading axes \(2,\)"):
    parallel.shard_batch(unstacked, mesh, batches_per_step=2)
  model = models.build(config)
  kwargs = experiment.loss_kwargs_from_config(config, model, experiment.sigmas_from_config(config))
  p_step = parallel.data_parallel(experiment.step_fn_from_config(config, kwargs), mesh)
  state = parallel.replicate(experiment.init_state(config, model), mesh)
  with pytest.raises(ValueError, match="adversarial.d_steps=2 needs 2 batches stacked"):
    p_step(state, parallel.shard_batch(unstacked, mesh), jax.random.key(0))


def test_fused_steps_with_d_steps_equal_single_steps():
  config = _config(d_steps=2)
  batches = _batches(config)
  single, m_single = _run(config, 8, batches)
  fused, m_fused = _run(config, 8, batches, fused=2)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(fused)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  for a, b in zip(m_single, m_fused):
    for k in ("loss", "d_loss", "g_loss"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6)


def test_generator_loss_moves_the_score_network():
  config = _config(lambda_g=1.0)
  batches = _batches(config, 1)
  adv, _ = _run(config, 8, batches)
  config.adversarial.enabled = False
  plain, _ = _run(config, 8, batches)
  diffs = [float(np.max(np.abs(a - b)))
           for a, b in zip(jax.tree.leaves(adv.score.params), jax.tree.leaves(plain.params))]
  assert max(diffs) > 1e-6


def test_denoised_samples_are_tweedie_and_clamped():
  metrics = {"x_tilde": jnp.full((2, 3), 0.5), "score": jnp.array([[1.0] * 3, [-30.0] * 3]),
             "sigma": jnp.array([0.2, 0.2])}
  np.testing.assert_allclose(steps.denoised_from(metrics, None)[:, 0], [0.54, -0.7],
                             rtol=1e-6)
  np.testing.assert_allclose(steps.denoised_from(metrics, (0.0, 1.0))[:, 0], [0.54, 0.0],
                             rtol=1e-6)


@pytest.mark.e2e
@pytest.mark.parametrize("d_steps", [1, 2])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, d_steps):
  config = _config(d_steps=d_steps)
  full = train.train_and_evaluate(experiment.build(config), str(tmp_path / "full"))
  config.training.num_train_steps = 10
  train.train_and_evaluate(experiment.build(config), str(tmp_path / "resumed"))
  manager = checkpoint.open_reader(str(tmp_path / "resumed"))
  _, data_state = checkpoint.restore(manager, 10, full)
  manager.close()
  assert data_state == {"kind": "toy", "step": 10 * d_steps}  # d_steps batches per step
  config.training.num_train_steps = 20
  resumed = train.train_and_evaluate(experiment.build(config), str(tmp_path / "resumed"))
  assert isinstance(resumed, AdversarialState) and int(resumed.step) == 20
  assert int(resumed.disc.step) == 20 * d_steps
  for a, b in zip(jax.tree.leaves(jax.device_get(full)), jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.leaves(full.disc.spectral_stats)  # the power-iteration state is part of it


def test_train_loop_feeds_d_steps_batches_per_step_fused_or_not(tmp_path):
  config = _config(d_steps=2)
  config.training.num_train_steps = config.training.log_every_steps = 4
  config.training.ckpt_every_steps = config.training.eval_every_steps = 4
  batches = _batches(config, 4)
  by_hand, _ = _run(config, 8, batches)
  single = train.train_and_evaluate(experiment.build(config), str(tmp_path / "single"))
  config.training.steps_per_dispatch = 2
  fused = train.train_and_evaluate(experiment.build(config), str(tmp_path / "fused"))
  for a, b, c in zip(jax.tree.leaves(by_hand), jax.tree.leaves(jax.device_get(single)),
                     jax.tree.leaves(jax.device_get(fused))):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)


@pytest.mark.e2e
def test_toy_config_trains_and_samples_through_the_cli(tmp_path):
  assert adversarial_toy.get_config().adversarial.enabled
  args = ["--config.training.num_train_steps=40", "--config.training.log_every_steps=20",
          "--config.training.ckpt_every_steps=20", "--config.training.eval_every_steps=20",
          "--config.training.batch_size=64", "--config.training.progress_bar=False",
          "--config.training.async_checkpoint=False", "--config.sampling.num_samples=64",
          "--config.sampling.batch_size=64", "--config.sampling.als.steps_per_sigma=5"]
  proc = run_main("--config=configs/adversarial_toy.py", f"--workdir={tmp_path}", *args,
                  env=main_env(8, inherit=False), timeout=HANG_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in records if "d_loss" in r]
  assert len(logged) == 2 and len(logged[0]["d_acc_fake_per_level"]) == 20
  assert (tmp_path / "samples" / "comparison_step40.png").is_file()


@pytest.mark.parametrize("override,message", [
    ({"d_arch": "biggan"}, "toy data need"),
    ({"gan_loss": "nope"}, "nope"),
])
def test_bad_adversarial_settings(override, message):
  config = _config(**override)
  with pytest.raises(ValueError, match=message):
    config_schema.validate(config)
