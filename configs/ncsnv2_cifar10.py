"""NCSNv2 on CIFAR-10 (Song & Ermon 2020, Table 1: FID 10.87 / IS 8.40 with denoising).

NCSNv2 (ngf 128, 29,694,083 parameters), sigma 50 -> 0.01 over 232 geometric levels (Techniques
1-2), Adam lr 1e-4 (eps 1e-8), batch 128, 300k steps, EMA 0.999 (Technique 5), random flips; ALS
step_lr 6.2e-6 with 5 steps per level (Technique 4) and the final denoising step. Reference
config: ermongroup/ncsnv2 `configs/cifar10.yml`.

FID anchor: the paper's Table 1, FID 10.87 (the best kept 5000-step checkpoint), 50,000 samples
against the statistics of the 50,000 CIFAR-10 training images.

    python -m score_jax.prepare_data --dataset=cifar10 --manual_dir=DIR_WITH_cifar-10-binary.tar.gz
    python main.py --config=configs/ncsnv2_cifar10.py --workdir=runs/ncsnv2_cifar10
    python main.py --config=configs/ncsnv2_cifar10.py --workdir=runs/ncsnv2_cifar10 --mode=eval
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "ncsnv2_cifar10"
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.data.num_channels = 3
  config.data.random_flip = True
  config.model.name = "ncsnv2"
  config.model.ncsn.ngf = 128
  config.noise.sigma_max = 50.0
  config.noise.sigma_min = 0.01
  config.noise.num_scales = 232
  config.optim.lr = 1e-4
  config.training.batch_size = 128
  config.training.num_train_steps = 300_000
  config.training.log_every_steps = 100
  config.training.eval_every_steps = 1000
  config.training.ckpt_every_steps = 5000
  config.training.ema_decays = (0.999,)
  config.sampling.method = "als"
  config.sampling.als.step_lr = 6.2e-6
  config.sampling.als.steps_per_sigma = 5
  config.sampling.denoise = True
  config.sampling.init = "uniform"
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
