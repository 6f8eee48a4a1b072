"""2-D benchmark toys (8 Gaussians, 25 Gaussians, swiss roll, two moons, checkerboard).

The data are scaled to a few units, so sigma runs from 10 down to 0.01 over 20 geometric levels
(Technique 1 of Song & Ermon 2020: sigma_max about the largest pairwise distance).

    python main.py --config=configs/two_d.py:eight_gaussians
    python main.py --config=configs/two_d.py:swiss_roll --mode=sweep   # the sigma_min sweep below
"""

from configs import default

_TOYS = ("eight_gaussians", "twenty_five_gaussians", "swiss_roll", "two_moons", "checkerboard")


def get_config(dataset: str = "eight_gaussians"):
  if dataset not in _TOYS:
    raise ValueError(f"configs/two_d.py:{dataset}: unknown toy; use one of {_TOYS}")
  config = default.get_config()
  config.name = f"two_d_{dataset}"
  config.data.dataset = dataset
  config.noise.sigma_max = 10.0
  config.noise.sigma_min = 0.01
  config.noise.num_scales = 20
  config.training.num_train_steps = 5000
  config.training.ckpt_every_steps = 2500
  config.sampling.als.step_lr = 2e-5
  config.sampling.als.steps_per_sigma = 100
  config.sampling.cas.step_lr = 8e-5
  config.sampling.cas.n_sigma = 1  # step_lr is set for the trained ladder itself
  config.sampling.init = "gaussian"
  return config


def get_sweep():
  """The smallest noise level trades sharpness for stability: sweep it.

  The CAS step keeps its ratio to sigma_L^2 (0.8, as 8e-5 at sigma_L = 0.01), so it stays inside
  the feasibility interval sigma_L^2 (1 -+ gamma) of every ladder.
  """
  return [{"noise.sigma_min": s, "sampling.cas.step_lr": 0.8 * s ** 2} for s in (0.1, 0.03, 0.01)]
