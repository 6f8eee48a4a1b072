"""Adversarial score matching on LSUN church_outdoor 64 px (Jolicoeur-Martineau et al. 2020).

NCSNv2Deeper at 64 px (the AC repo's LSUN architecture, `configs/church.yml`), sigma 140 -> 0.01
over 788 levels, EMA 0.999, the adversarial recipe of configs/adversarial_cifar10.py with a 64 px
BigGAN discriminator; CAS with 5 levels per trained interval at the AC recipe's tuned step_lr
4.5e-7 (2.8e-6 for n_sigma=1; `tests/training_sampling_fid.sh`). Test loss on the `validation`
split (TFDS `lsun` has no test split). Preparing LSUN needs TensorFlow (requirements-prepare.txt).

FID anchor: the AC repository's `fids/churches_ncsnv2/c_adv_n5_5k` at step_lr 4.5e-7, FID 43.43
with the final denoising (43.92 without), 5,000 samples against the statistics of the
church_outdoor training set at 64 px (AC `evaluation/fid_score.py`:
`church_outdoor_train_fid_stats64.npz`, from the AC README's statistics download); here all
126,227 training images, or that file through `--config.eval.reference_stats`. The paper reports
samples only for LSUN.

    python main.py --config=configs/adversarial_church.py --workdir=runs/adversarial_church
"""

from configs import adversarial_cifar10


def get_config():
  config = adversarial_cifar10.get_config()
  config.name = "adversarial_church"
  config.data.dataset = "lsun/church_outdoor"
  config.data.image_size = 64
  config.data.eval_split = "validation"  # TFDS lsun has train and validation (300 images) only.
  config.model.name = "ncsnv2_deeper"
  config.noise.sigma_max = 140.0
  config.noise.num_scales = 788
  config.training.ema_decays = (0.999,)
  config.training.num_train_steps = 200_000
  config.sampling.cas.step_lr = 4.5e-7
  config.sampling.cas.n_sigma = 5
  config.eval.num_samples = 5_000
  config.eval.reference_split = "train"
  config.eval.reference_num_images = 126_227  # the whole church_outdoor train split
  return config
