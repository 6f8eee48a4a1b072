"""NCSN on CelebA 32 px (Song & Ermon 2019; reference ermongroup/ncsn).

Images center-cropped to 140 px and resized to 32; otherwise the CIFAR-10 setting: ngf 128,
sigma 1 -> 0.01 over 10 levels, Adam 1e-3, batch 128, 200k steps; ALS step_lr 2e-5, 100 steps.
Preparing celeb_a uses TFDS's own builder, which needs TensorFlow (requirements-prepare.txt).

    python -m score_jax.prepare_data --dataset=celeb_a --manual_dir=DIR_WITH_CELEBA_FILES
    python main.py --config=configs/ncsn_celeba.py --workdir=runs/ncsn_celeba
"""

from configs import ncsn_cifar10


def get_config():
  config = ncsn_cifar10.get_config()
  config.name = "ncsn_celeba"
  config.data.dataset = "celeb_a"
  config.eval.reference_split = "test"  # CelebA FIDs are against the test set (all 19,962 images).
  config.eval.reference_num_images = 19_962
  return config
