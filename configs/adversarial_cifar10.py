"""Adversarial score matching on CIFAR-10 (Jolicoeur-Martineau et al. 2020; AC README command).

NCSNv2 (ngf 128) on sigma 50 -> 0.01 over 232 levels, EMA 0.9999, Adam lr 1e-4 with beta =
(0, 0.9); BigGAN discriminator (ch 64, spectral norm) trained with Adamp lr 1e-4, beta =
(-0.5, 0.9); LSGAN losses, lambda_DSM = lambda_G = lambda_D = 1, one D step per score step,
denoised samples clamped to [0, 1]. Sampling: CAS, step_lr 5.6e-6, final denoising. Reference
config: AlexiaJM/AdversarialConsistentScoreMatching `configs/cifar10_9999ema.yml` with the README's
adversarial flags.

FID anchor: the paper's final table (the AC recipe's `--fid_num_samples 10000`, best of the kept
5000-step checkpoints), 10,000 samples against the statistics of the 50,000 CIFAR-10 training
images. The AC repository's `fids/cifar10_ncsnv2/c_adv_n1_5k` step-size sweep (best 14.28 with
denoising, at step_lr 5.73e-6) is on 5,000 samples: `--config.eval.num_samples=5000` to compare.

    python main.py --config=configs/adversarial_cifar10.py --workdir=runs/adversarial_cifar10
    python main.py --config=configs/adversarial_cifar10.py --workdir=runs/adversarial_cifar10 --mode=eval
"""

from configs import cas_cifar10


def get_config():
  config = cas_cifar10.get_config()
  config.name = "adversarial_cifar10"
  config.optim.lr = 1e-4
  config.optim.beta1 = 0.0
  config.optim.beta2 = 0.9
  config.adversarial.enabled = True
  config.adversarial.gan_loss = "lsgan"
  config.adversarial.d_arch = "biggan"
  config.adversarial.d_ch = 64
  config.adversarial.d_lr = 1e-4
  config.adversarial.d_beta1 = -0.5
  config.adversarial.d_beta2 = 0.9
  config.adversarial.d_steps = 1
  config.adversarial.clamp = True
  # The paper's final table: 10k samples (the AC recipe's --fid_num_samples 10000) against the
  # CIFAR-10 training statistics (inherited).
  config.eval.num_samples = 10_000
  return config
