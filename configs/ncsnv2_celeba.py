"""NCSNv2 on CelebA 64 px (Song & Ermon 2020, Table 1: FID 10.23 with denoising).

NCSNv2 at 64 px, sigma 90 -> 0.01 over 500 levels, Adam 1e-4, batch 128, 210k steps, EMA 0.999;
ALS step_lr 3.3e-6, 5 steps per level, final denoising. Reference config: ermongroup/ncsnv2
`configs/celeba.yml`. Preparing celeb_a needs TensorFlow (requirements-prepare.txt).

FID anchor: the paper's Table 1, FID 10.23 (best of the kept 5000-step checkpoints), 50,000
samples against the statistics of the 19,962 CelebA test images.

    python main.py --config=configs/ncsnv2_celeba.py --workdir=runs/ncsnv2_celeba
    python main.py --config=configs/ncsnv2_celeba.py --workdir=runs/ncsnv2_celeba --mode=eval
"""

from configs import ncsnv2_cifar10


def get_config():
  config = ncsnv2_cifar10.get_config()
  config.name = "ncsnv2_celeba"
  config.data.dataset = "celeb_a"
  config.data.image_size = 64
  config.noise.sigma_max = 90.0
  config.noise.num_scales = 500
  config.training.num_train_steps = 210_000
  config.sampling.als.step_lr = 3.3e-6
  # CelebA FIDs are against the test set (all 19,962 TFDS test images).
  config.eval.reference_split = "test"
  config.eval.reference_num_images = 19_962
  return config
