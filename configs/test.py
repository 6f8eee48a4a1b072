"""Tiny config for tests: 2-D mixture, small MLP, 4 noise levels, a few steps, few samples.

    python main.py --config=configs/test.py --workdir=/tmp/sj_test
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "test"
  config.model.mlp.hidden = 32
  config.model.mlp.num_layers = 2
  config.noise.sigma_min = 1.0
  config.noise.num_scales = 4
  config.training.batch_size = 64
  config.training.num_train_steps = 20
  config.training.log_every_steps = 10
  config.training.eval_every_steps = 10
  config.training.ckpt_every_steps = 10
  config.training.progress_bar = False
  config.training.async_checkpoint = False
  config.sampling.als.steps_per_sigma = 5
  config.sampling.num_samples = 64
  config.sampling.batch_size = 64
  config.sampling.als.step_lr = 0.1
  config.sampling.cas.step_lr = 1.0
  config.sampling.cas.n_sigma = 1
  config.sampling.methods = ("als", "cas")
  return config


def get_sweep():
  """Two noise schedules, for the sweep test."""
  return [{"noise.sigma_max": 10.0}, {"noise.sigma_max": 20.0, "noise.schedule": "linear"}]
