"""Adversarial score matching on MNIST, CPU-sized (configs/mnist_cpu.py + a BigGAN discriminator).

DSM plus lambda_G times the LSGAN generator loss of a spectrally normalized BigGAN discriminator
(ch 16) on the clamped denoised samples; score network Adam beta = (0, 0.9), D Adamp (-0.5, 0.9).

    python main.py --config=configs/adversarial_mnist.py --workdir=runs/adversarial_mnist
"""

from configs import mnist_cpu


def get_config():
  config = mnist_cpu.get_config()
  config.name = "adversarial_mnist"
  config.optim.beta1 = 0.0
  config.optim.beta2 = 0.9
  config.adversarial.enabled = True
  config.adversarial.d_arch = "biggan"
  config.adversarial.d_ch = 16
  config.adversarial.d_lr = 1e-4
  return config
