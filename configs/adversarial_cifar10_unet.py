"""Adversarial score matching with the DDPM UNet on CIFAR-10 (Jolicoeur-Martineau et al. 2020).

The AC UNet (ch 128, ch_mult (1, 2, 2, 2), 2 residual blocks, attention at 16 px, no noise-level
input, its [0, 1] data unrescaled (`model.unet.input_range=unit`), output sigma * score) with the
adversarial recipe of configs/adversarial_cifar10.py and two
discriminator steps per score step (the AC README's `--D_steps 2` for this model); CAS with 5
levels per trained interval at the AC recipe's tuned step_lr 1.05e-6 (5.45e-6 for n_sigma=1;
`tests/training_sampling_fid.sh`).

FID anchor: the AC repository's `fids/cifar10_unet/c_adv_n5_2k` at step_lr 1.06e-6, FID 17.78
with the final denoising (17.99 without), 2,000 samples against the CIFAR-10 training statistics
(the 50,000 training images here). FID falls as the sample count grows, so the anchor's count is
the default; the paper's final-table protocol is `--config.eval.num_samples=10000`.

    python main.py --config=configs/adversarial_cifar10_unet.py --workdir=runs/adv_cifar10_unet
"""

from configs import adversarial_cifar10


def get_config():
  config = adversarial_cifar10.get_config()
  config.name = "adversarial_cifar10_unet"
  config.model.name = "unet"
  config.model.unet.ch = 128
  config.model.unet.ch_mult = (1, 2, 2, 2)
  config.model.unet.num_res_blocks = 2
  config.model.unet.attn_resolutions = (16,)
  config.model.unet.conditional = False
  config.model.unet.input_range = "unit"
  config.adversarial.d_steps = 2
  config.sampling.cas.n_sigma = 5
  config.sampling.cas.step_lr = 1.05e-6
  config.eval.num_samples = 2_000
  return config
