"""CIFAR-10 in the settings of EDM (Karras et al. 2022), unconditional, VE-style continuous noise.

UNTESTED ON A GPU: written from the paper and NVlabs/edm (`train.py`, `training/loss.py`
`EDMLoss`, `training/networks.py` `EDMPrecond`); only its config checks and a few CPU steps of a
shrunk copy have run. Deviations from the paper's run:
* Network: this codebase's DDPM UNet (`models/unet.py`) at EDM's DDPM++ sizes (128 channels,
  multipliers (2, 2, 2), 4 residual blocks per resolution, attention at 16 px, dropout 0.13),
  not DDPM++ itself (no resampling filters or skip rescaling).
* No augmentation pipeline (EDM: probability 0.12 with its augment labels); random x-flips only.
* The EMA is one fixed decay: EDM's half-life of 0.5 Mimg at batch 512 is 976.6 steps,
  0.5^(1 / 976.6) = 0.99929 (EDM also ramps the half-life up early in training).

Training: ln sigma ~ N(-1.2, 1.2^2), loss weight (sigma^2 + 0.5^2) / (0.5 sigma)^2, sigma_data
0.5 on data in [-1, 1], Adam lr 1e-3 (warm-up over 10 Mimg = 19531 steps), batch 512, 200 Mimg
= 390625 steps. Sampling: EDM's deterministic Heun on 18 rho = 7 levels from 80 to 0.002 (35 NFE)
from the prior N(0, 80^2 I). ALS and CAS step through the configured geometric ladder.

    python main.py --config=configs/cifar10_edm.py --workdir=runs/cifar10_edm
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "cifar10_edm"
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.data.num_channels = 3
  config.data.centered = True
  config.data.random_flip = True
  config.model.name = "unet"
  config.model.preconditioning = "edm"
  config.model.unet.ch = 128
  config.model.unet.ch_mult = (2, 2, 2)
  config.model.unet.num_res_blocks = 4
  config.model.unet.attn_resolutions = (16,)
  config.model.unet.dropout = 0.13
  config.model.unet.conditional = True
  config.noise.distribution = "log_normal"
  config.noise.p_mean = -1.2
  config.noise.p_std = 1.2
  config.noise.weighting = "edm"
  config.noise.sigma_data = 0.5
  config.noise.sigma_max = 80.0
  config.noise.sigma_min = 0.002
  config.noise.num_scales = 232  # the ladder of ALS/CAS and the loss's sigma bins (NCSNv2 CIFAR-10)
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 19531
  config.training.batch_size = 512
  config.training.num_train_steps = 390625
  config.training.log_every_steps = 1000
  config.training.eval_every_steps = 10000
  config.training.ckpt_every_steps = 10000
  config.training.ema_decays = (0.99929,)
  config.sampling.method = "heun"
  config.sampling.methods = ("heun",)
  config.sampling.heun.ladder = "karras"
  config.sampling.heun.num_steps = 18
  config.sampling.heun.rho = 7.0
  config.sampling.heun.s_churn = 0.0
  config.sampling.inpaint_examples = 0  # the train job inpaints with sampling.method; Heun does not
  config.sampling.num_samples = 50000
  config.sampling.batch_size = 500
  config.eval.num_samples = 50000
  return config
