"""MNIST with continuous noise and EDM preconditioning, on the network of `mnist_cpu`.

The same NCSNv2 at ngf 16 (plus the c_noise embedding), batch, optimizer, EMA and number of steps
as `configs/mnist_cpu.py`
(so the two train in the same wall time on the 2-core CPU), trained as EDM trains (Karras et al.
2022): ln sigma ~ N(P_mean, 1.2^2), loss weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
D = c_skip x + c_out F(c_in x; c_noise). The NCSNv2 takes c_noise through a noise embedding
(`model.ncsn.noise_embedding`, 18,768 more parameters, 4 %): at equal steps it reached a lower
test loss than the unconditional F in 7 of 8 sigma bins (bench/NOTES.md, section 23).

Scales, from the 60000 training digits in [0, 1] (bench/NOTES.md, section 23):
* sigma_data = 0.308, the pixel standard deviation.
* P_mean = -1.2 + ln(0.308 / 0.5) = -1.68: EDM's CIFAR-10 value (sigma_data 0.5) moved with the
  data's scale.
* sigma_max = 16.88, the largest pairwise distance of the training digits (NCSNv2's
  Technique 1): the samplers start from the prior N(0, sigma_max^2 I) there.
* The samplers' ladder (ALS, CAS, and the loss's sigma bins): geometric from sigma_max to 0.01
  with 96 levels, NCSNv2's Technique 2 for D = 784; ALS 5 steps per level at Technique 4's step
  size; CAS on the same ladder. Heun: EDM's deterministic sampler, 18 levels (35 NFE).

    python -m score_jax.prepare_data --dataset=mnist --manual_dir=../shared/data/mnist
    python main.py --config=configs/mnist_edm_cpu.py --workdir=runs/mnist_edm_cpu
"""

from configs import mnist_cpu


def get_config():
  config = mnist_cpu.get_config()
  config.name = "mnist_edm_cpu"
  config.model.preconditioning = "edm"
  config.model.ncsn.noise_embedding = True
  config.noise.distribution = "log_normal"
  config.noise.p_mean = -1.68
  config.noise.p_std = 1.2
  config.noise.weighting = "edm"
  config.noise.sigma_data = 0.308
  config.noise.sigma_max = 16.88
  config.noise.sigma_min = 0.01
  config.noise.num_scales = 96
  config.sampling.method = "als"  # --mode=sample/eval and inpainting (ALS inpaints)
  config.sampling.methods = ("heun", "als")
  config.sampling.init = "gaussian"
  config.sampling.als.step_lr = 1.1e-5
  config.sampling.als.steps_per_sigma = 5
  config.sampling.cas.step_lr = 1.1e-5
  config.sampling.cas.n_sigma = 1
  config.sampling.heun.num_steps = 18
  config.sampling.heun.s_churn = 0.0
  return config
