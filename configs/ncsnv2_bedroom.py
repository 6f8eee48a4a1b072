"""NCSNv2 on LSUN bedroom 128 px (Song & Ermon 2020; samples only, no published FID).

NCSNv2Deeper at 128 px, sigma 190 -> 0.01 over 1086 levels, Adam 1e-4, batch 128, 150k steps,
EMA 0.999; ALS step_lr 1.8e-6, 3 steps per level, final denoising; `validation` as the evaluation
split (inherited). Reference config: ermongroup/ncsnv2 `configs/bedroom.yml`. Preparing LSUN needs
TensorFlow (requirements-prepare.txt).

    python main.py --config=configs/ncsnv2_bedroom.py --workdir=runs/ncsnv2_bedroom
"""

from configs import ncsnv2_church


def get_config():
  config = ncsnv2_church.get_config()
  config.name = "ncsnv2_bedroom"
  config.data.dataset = "lsun/bedroom"
  config.data.image_size = 128
  config.noise.sigma_max = 190.0
  config.noise.num_scales = 1086
  config.training.num_train_steps = 150_000
  config.sampling.als.step_lr = 1.8e-6
  config.sampling.als.steps_per_sigma = 3
  return config
