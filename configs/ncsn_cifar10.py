"""NCSN on CIFAR-10 (Song & Ermon 2019; reference ermongroup/ncsn): IS 8.87, FID 25.32 published.

CondRefineNetDilated with ngf 128, sigma 1 -> 0.01 over 10 levels, Adam lr 1e-3, batch 128, 200k
steps, random horizontal flips; ALS step_lr 2e-5, 100 steps per level, U[0, 1] init, no final
denoising (the paper's setting; the NCSNv2 paper reports FID 29.8 with denoising). As the
reference (ermongroup/ncsn `anneal_runner.py`, config `anneal.yml`): training data uniformly
dequantized (x 255/256 + U/256) and samples drawn from the raw weights (no EMA,
`sampling.use_ema=False`).

FID anchor: the NCSN row of the NCSNv2 paper's Table 1 / score_sde's Table 3 (IS 8.87, FID
25.32), 50,000 samples against the statistics of the 50,000 CIFAR-10 training images:

    python main.py --config=configs/ncsn_cifar10.py --workdir=runs/ncsn_cifar10 --mode=eval

    python -m score_jax.prepare_data --dataset=cifar10 --manual_dir=DIR_WITH_cifar-10-binary.tar.gz
    python main.py --config=configs/ncsn_cifar10.py --workdir=runs/ncsn_cifar10
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "ncsn_cifar10"
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.data.num_channels = 3
  config.data.random_flip = True
  config.data.uniform_dequantization = True
  config.model.name = "ncsn"
  config.model.ncsn.ngf = 128
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
  # The FID protocol of the paper: 50k samples against the statistics of the 50k training
  # images (the TTUR statistics), every 5000-step checkpoint kept so --mode=eval picks the best.
  config.training.keep_every_steps = 5000
  config.eval.num_samples = 50_000
  config.eval.reference_split = "train"
  config.eval.reference_num_images = 50_000
  return config
