"""NCSNv2 on LSUN church_outdoor (Song & Ermon 2020; samples only, no published FID).

NCSNv2Deeper at 96 px (the size the reference README states), sigma 140 -> 0.01 over 788 levels,
Adam 1e-4, batch 128, 200k steps, EMA 0.999; ALS step_lr 4.9e-6, 4 steps per level, final
denoising. Test loss and reference statistics on the `validation` split (TFDS `lsun` has no
test split). Reference config: ermongroup/ncsnv2 `configs/church.yml`. Preparing LSUN needs
TensorFlow (requirements-prepare.txt). Residual and refine blocks are rematerialized to fit the
activations of 96 px batches.

    python main.py --config=configs/ncsnv2_church.py --workdir=runs/ncsnv2_church
"""

from configs import ncsnv2_cifar10


def get_config():
  config = ncsnv2_cifar10.get_config()
  config.name = "ncsnv2_church"
  config.data.dataset = "lsun/church_outdoor"
  config.data.image_size = 96
  config.data.eval_split = "validation"  # TFDS lsun has train and validation (300 images) only.
  config.model.name = "ncsnv2_deeper"
  config.model.remat = True
  config.noise.sigma_max = 140.0
  config.noise.num_scales = 788
  config.training.num_train_steps = 200_000
  config.sampling.als.step_lr = 4.9e-6
  config.sampling.als.steps_per_sigma = 4
  config.sampling.num_samples = 64
  config.sampling.batch_size = 64
  return config
