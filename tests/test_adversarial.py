"""Adversarial score matching: equivalence to DSM at lambda_G = 0, device invariance, resume, CLI."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import main_env, run_main

from configs import adversarial_toy
from configs import test as test_config
from score_jax import config_schema, experiment, models, parallel, steps, train
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
  it = experiment.iterator_from_config(config, split="train", seed=0,
                                  batch_size=config.training.batch_size)
  return [next(it) for _ in range(n)]


def _run(config, num_devices, batches, step=None):
  model = models.build(config)
  kwargs = experiment.loss_kwargs_from_config(config, model, experiment.sigmas_from_config(config))
  mesh = parallel.make_mesh(num_devices)
  state = parallel.replicate(experiment.init_state(config, model), mesh)
  p_step = parallel.data_parallel(step or experiment.step_fn_from_config(config, kwargs), mesh)
  metrics = []
  for b in batches:
    state, m = p_step(state, parallel.shard_batch(b, mesh), jax.random.key(config.seed))
    metrics.append(m)
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
  plain, plain_metrics = _run(config, 8, batches)
  for a, b in zip(jax.tree.leaves(adv.score.params), jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose([m["loss"] for m in adv_metrics],
                             [m["loss"] for m in plain_metrics], rtol=1e-6)
  # The discriminator did train (2 updates per step) on its own draws.
  assert int(adv.disc.step) == 4
  assert all(np.isfinite(m["d_loss"]) and 0 <= m["d_acc_fake"] <= 1 for m in adv_metrics)


@pytest.mark.parametrize("gan_loss", ["lsgan", "rahinge"])
def test_one_and_eight_devices_agree(gan_loss):
  config = _config(gan_loss=gan_loss)
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


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
  config = _config()
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  config.training.num_train_steps = 10
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  config.training.num_train_steps = 20
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert isinstance(resumed, AdversarialState) and int(resumed.step) == 20
  for a, b in zip(jax.tree.leaves(jax.device_get(full)), jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.leaves(full.disc.spectral_stats)  # the power-iteration state is part of it


def test_toy_config_trains_and_samples_through_the_cli(tmp_path):
  assert adversarial_toy.get_config().adversarial.enabled
  args = ["--config.training.num_train_steps=40", "--config.training.log_every_steps=20",
          "--config.training.ckpt_every_steps=20", "--config.training.eval_every_steps=20",
          "--config.training.batch_size=64", "--config.training.progress_bar=False",
          "--config.training.async_checkpoint=False", "--config.sampling.num_samples=64",
          "--config.sampling.batch_size=64", "--config.sampling.als.steps_per_sigma=5"]
  proc = run_main("--config=configs/adversarial_toy.py", f"--workdir={tmp_path}", *args,
                  env=main_env(8, inherit=False), timeout=600)
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
