"""NCSN on MNIST (Song & Ermon 2019, Section 5 and Appendix B; reference ermongroup/ncsn).

CondRefineNetDilated with ngf 64, conditional instance norm++, sigma 1 -> 0.01 over 10 geometric
levels, Adam lr 1e-3, batch 128, 200k steps; ALS with step_lr 2e-5 (epsilon = 2e-5 in the reference
code's convention), 100 steps per level, samples initialised U[0, 1], no final denoising (as in the
paper; set sampling.denoise=True for the Tweedie step). As the reference (ermongroup/ncsn
`anneal_runner.py`, config `anneal.yml`): training data uniformly dequantized
(x 255/256 + U/256) and samples drawn from the raw weights (no EMA; `sampling.use_ema=False`).

    python -m score_jax.prepare_data --dataset=mnist --manual_dir=../shared/data/mnist
    python main.py --config=configs/ncsn_mnist.py --workdir=runs/ncsn_mnist
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "ncsn_mnist"
  config.data.dataset = "mnist"
  config.data.image_size = 28
  config.data.num_channels = 1
  config.data.uniform_dequantization = True
  config.model.name = "ncsn"
  config.model.ncsn.ngf = 64
  config.noise.sigma_max = 1.0
  config.noise.sigma_min = 0.01
  config.noise.num_scales = 10
  config.optim.lr = 1e-3
  config.training.batch_size = 128
  config.training.num_train_steps = 200_000
  config.training.log_every_steps = 100
  config.training.eval_every_steps = 1000
  config.training.ckpt_every_steps = 5000
  config.sampling.method = "als"
  config.sampling.als.step_lr = 2e-5
  config.sampling.als.steps_per_sigma = 100
  config.sampling.denoise = False
  config.sampling.init = "uniform"
  config.sampling.use_ema = False
  config.sampling.methods = ("als",)
  config.sampling.num_samples = 100
  config.sampling.batch_size = 100
  return config
