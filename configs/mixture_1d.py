"""The 1-D two-component Gaussian mixture of the score-matching tutorials (see score_jax.toy).

    python main.py --config=configs/mixture_1d.py
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "mixture_1d"
  config.data.dataset = "mixture_1d"
  config.noise.sigma_max = 10.0
  config.noise.sigma_min = 0.1
  config.noise.num_scales = 10
  config.sampling.als.step_lr = 1e-3
  config.sampling.cas.n_sigma = 5
  config.sampling.cas.step_lr = 0.003  # eta = 0.3: feasible on the finer ladders of get_sweep too
  config.sampling.denoise = False  # denoising at sigma 0.1 shrinks the 0.5-std modes' variance
  return config


def get_sweep():
  return [{"noise.num_scales": n} for n in (5, 10, 20)]
