"""Adversarial score matching on a 2-D toy (CPU-sized; Jolicoeur-Martineau et al. 2020, Sec. 4).

The 8-Gaussians ring of configs/two_d.py learned with DSM plus a least-squares GAN loss on the
denoised samples x + sigma^2 s(x, sigma), judged by a spectrally normalized MLP discriminator
(Adamp with beta = (-0.5, 0.9), as the paper's D); the score network uses Adam beta = (0, 0.9).

    python main.py --config=configs/adversarial_toy.py --workdir=runs/adversarial_toy
"""

from configs import two_d


def get_config():
  config = two_d.get_config("eight_gaussians")
  config.name = "adversarial_toy"
  config.optim.beta1 = 0.0
  config.optim.beta2 = 0.9
  config.training.num_train_steps = 3000
  config.training.ckpt_every_steps = 1000
  config.training.log_every_steps = 250
  config.training.eval_every_steps = 1000
  config.adversarial.enabled = True
  config.adversarial.gan_loss = "lsgan"
  config.adversarial.d_arch = "mlp"
  config.adversarial.d_ch = 128
  config.adversarial.d_lr = 1e-4
  config.adversarial.lambda_g = 0.1
  return config
