"""Consistent annealed sampling on the CIFAR-10 NCSNv2 model (Jolicoeur-Martineau et al. 2020).

Training as configs/ncsnv2_cifar10.py but with EMA 0.9999 (the paper's `cifar10_9999ema` setting);
sampling with CAS, step_lr 5.6e-6 (inside the CAS interval sigma_L^2 (1 -+ gamma) = (3.6e-6,
1.96e-4) for this ladder), one level per trained interval, final denoising. n_sigma > 1 samples a
finer ladder (see `get_sweep`, the paper's n_sigma study, each n_sigma with the step size the AC
recipe tuned for it: 5.6e-6 for n_sigma=1, 1.1e-6 for n_sigma=5, `tests/training_sampling_fid.sh`).
Reference config: AlexiaJM/AdversarialConsistentScoreMatching `configs/cifar10_9999ema.yml`
(non-adversarial).

FID anchor: none in the AC repository's `fids/cifar10_ncsnv2` (every CAS file there is
adversarial, `c_adv_*`; the one non-adversarial file, `nc_nadv_n1_5k`, is ALS). The protocol is
that of the AC recipe's final FIDs (`tests/training_sampling_fid.sh`: a 5,000-sample step-size
sweep, then `--fid_num_samples 10000` at the chosen checkpoint): 10,000 samples against the
statistics of the 50,000 CIFAR-10 training images.

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
  config.eval.num_samples = 10_000
  return config


def get_sweep():
  """CAS with finer ladders (levels per trained interval), each at its tuned step size."""
  return [{"sampling.cas.n_sigma": n, "sampling.cas.step_lr": lr}
          for n, lr in ((1, 5.6e-6), (5, 1.1e-6))]
