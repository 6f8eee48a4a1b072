"""Consistent annealed sampling on the CIFAR-10 NCSNv2 model (Jolicoeur-Martineau et al. 2020).

Training as configs/ncsnv2_cifar10.py but with EMA 0.9999 (the paper's `cifar10_9999ema` setting);
sampling with CAS, step_lr 5.6e-6 (inside the CAS interval sigma_L^2 (1 -+ gamma) = (3.6e-6,
1.96e-4) for this ladder), one level per trained interval, final denoising. n_sigma > 1 samples a
finer ladder (see `get_sweep`, the paper's n_sigma study).

    python main.py --config=configs/cas_cifar10.py --workdir=runs/cas_cifar10
    python main.py --config=configs/cas_cifar10.py --workdir=runs/cas_cifar10 --mode=sample
"""

from configs import ncsnv2_cifar10


def get_config():
  config = ncsnv2_cifar10.get_config()
  config.name = "cas_cifar10"
  config.training.ema_decays = (0.9999,)
  config.sampling.method = "cas"
  config.sampling.methods = ("cas",)
  config.sampling.cas.step_lr = 5.6e-6
  config.sampling.cas.n_sigma = 1
  return config


def get_sweep():
  """CAS with finer ladders (levels per trained interval), as in the paper's Table 2."""
  return [{"sampling.cas.n_sigma": n} for n in (1, 5, 15)]
