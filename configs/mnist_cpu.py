"""A CPU-sized NCSNv2 on MNIST for 2 CPU cores.

At 5000 steps both samplers draw recognizable digits (docs/mnist_cpu_{cas,als}_step5000.png; the
run's losses and times are in bench/NOTES.md).

The NCSNv2 architecture at ngf 16 (about 0.5M parameters) with the NCSN MNIST ladder (sigma 1 ->
0.01, 10 levels), Adam lr 1e-3 (the NCSN rate: fast progress matters more than the last nats here),
batch 64, EMA 0.999; ALS with step_lr 2e-5 and 100 steps per level, U[0, 1] init, final denoising,
and CAS (20 levels per trained interval, step_lr 3e-5) for comparison.

    python -m score_jax.prepare_data --dataset=mnist --manual_dir=../shared/data/mnist
    python main.py --config=configs/mnist_cpu.py --workdir=runs/mnist_cpu
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "mnist_cpu"
  config.data.dataset = "mnist"
  config.data.image_size = 28
  config.data.num_channels = 1
  config.model.name = "ncsnv2"
  config.model.ncsn.ngf = 16
  config.noise.sigma_max = 1.0
  config.noise.sigma_min = 0.01
  config.noise.num_scales = 10
  config.optim.lr = 1e-3
  config.training.batch_size = 64
  config.training.num_train_steps = 5000
  config.training.log_every_steps = 50
  config.training.eval_every_steps = 500
  config.training.ckpt_every_steps = 500
  config.training.ema_decays = (0.999,)
  config.sampling.method = "als"
  config.sampling.als.step_lr = 2e-5
  config.sampling.als.steps_per_sigma = 100
  config.sampling.denoise = True
  config.sampling.init = "uniform"
  config.sampling.methods = ("als", "cas")
  config.sampling.cas.step_lr = 3e-5
  config.sampling.cas.n_sigma = 20  # CAS: 20 levels per trained interval (200 steps; ALS takes 1000)
  config.sampling.num_samples = 64
  config.sampling.batch_size = 64
  return config
