"""Which CPU-sized MNIST setting gives recognizable digits soonest? (a one-off probe, not a test)

Trains variants of configs/mnist_cpu.py with the project's own train step, model and samplers,
fed from an in-memory copy of the official MNIST training images (no grain/TFDS, so it runs on a
bare accelerator machine), and samples with ALS and CAS from the EMA params at snapshot steps.
Everything is written to one .npz (uint8 sample grids, losses, wall times) that
`--render` turns into one PNG per variant.

    python bench/mnist_probe.py --mnist_dir=../shared/data/mnist --out=/tmp/probe.npz
    python bench/mnist_probe.py --render=/tmp/probe.npz --out=/tmp/probe_png
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

T1_SIGMA_MAX = 15.96  # noise.sigma_max_from_data on 6000 MNIST training images (seed 0)
T1_LEVELS = 95  # noise.num_scales_from_ratio(15.96, 0.01, 784)
T1_STEP_LR = 1.1e-5  # noise.step_lr_from_variance_recursion(0.01, 1.0816, 5)

VARIANTS = {
    "base": {},
    "t1": {"noise.sigma_max": T1_SIGMA_MAX, "noise.num_scales": T1_LEVELS,
           "sampling.steps_per_sigma": 5, "sampling.step_lr": T1_STEP_LR,
           "sampling.n_sigma": 2, "sampling.cas_step_lr": 1.5e-5},
    "ngf32": {"model.ngf": 32},
    "t1_ngf32": {"model.ngf": 32, "noise.sigma_max": T1_SIGMA_MAX, "noise.num_scales": T1_LEVELS,
                 "sampling.steps_per_sigma": 5, "sampling.step_lr": T1_STEP_LR,
                 "sampling.n_sigma": 2, "sampling.cas_step_lr": 1.5e-5},
}


def load_mnist(mnist_dir: str) -> np.ndarray:
  with gzip.open(os.path.join(mnist_dir, "train-images-idx3-ubyte.gz")) as f:
    raw = np.frombuffer(f.read(), np.uint8, offset=16)
  return raw.reshape(-1, 28, 28, 1)


def config_for(overrides: dict):
  from configs import mnist_cpu
  config = mnist_cpu.get_config()
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def run_variant(name: str, images: np.ndarray, snapshots: list[int], deadline: float,
                results: dict, out: str) -> None:
  import functools
  import jax
  from score_jax import models, parallel, sample, train
  config = config_for(VARIANTS[name])
  model = models.build(config)
  sigmas = train.sigmas_from_config(config)
  b = config.training.batch_size
  mesh = parallel.make_mesh(1)
  state = parallel.replicate(train.init_state(config, model), mesh)
  kwargs = train.loss_kwargs_from_config(config, model, sigmas)
  step = functools.partial(train.train_step, ema_decays=tuple(config.training.ema_decays), **kwargs)
  p_step = parallel.data_parallel(step, mesh)
  rng = jax.random.key(config.seed)
  order = np.random.RandomState(config.seed)
  perm, pos = order.permutation(len(images)), 0
  t0, losses = time.perf_counter(), []
  for i in range(1, max(snapshots) + 1):
    if pos + b > len(perm):
      perm, pos = order.permutation(len(images)), 0
    x = images[perm[pos:pos + b]].astype(np.float32) / 255.0
    pos += b
    state, metrics = p_step(state, parallel.shard_batch({"x": x}, mesh), rng)
    if i % 100 == 0:
      losses.append(float(metrics["loss"]))
    if i in snapshots:
      train_s = time.perf_counter() - t0
      for method in ("als", "cas"):
        sampler = sample.make_sampler(config, state, method=method)
        s0 = time.perf_counter()
        x = np.asarray(sampler(jax.random.key(7), 64))
        results[f"{name}/{i}/{method}"] = np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)
        results[f"{name}/{i}/{method}_s"] = time.perf_counter() - s0
      results[f"{name}/{i}/train_s"] = train_s
      results[f"{name}/losses"] = np.asarray(losses)
      np.savez_compressed(out, **results)
      print(f"{name} step {i}: loss {float(metrics['loss']):.2f}, {train_s:.0f} s training", flush=True)
      t0 = time.perf_counter() - train_s
    if time.perf_counter() > deadline:
      print(f"{name}: stopped at step {i} (time budget)", flush=True)
      return


def render(path: str, out_dir: str) -> None:
  from PIL import Image
  data = np.load(path)
  os.makedirs(out_dir, exist_ok=True)
  keys = sorted({k.rsplit("/", 1)[0] for k in data.files if k.endswith("/als")})
  for key in keys:
    tiles = []
    for method in ("als", "cas"):
      x = data[f"{key}/{method}"][:64, :, :, 0]
      grid = x.reshape(8, 8, 28, 28).transpose(0, 2, 1, 3).reshape(224, 224)
      tiles.append(np.pad(grid, ((0, 0), (0, 8)), constant_values=128))
    Image.fromarray(np.concatenate(tiles, 1)).save(
        os.path.join(out_dir, key.replace("/", "_") + ".png"))
  print(json.dumps({k: float(data[k]) for k in data.files if k.endswith("_s")}, indent=1))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--mnist_dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
  p.add_argument("--out", required=True)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--snapshots", default="1500,2500,5000,10000")
  p.add_argument("--budget_s", type=float, default=60.0, help="wall seconds per variant")
  p.add_argument("--render", default=None, help="an .npz written by this script")
  args = p.parse_args()
  if args.render:
    return render(args.render, args.out)
  images = load_mnist(args.mnist_dir)
  snapshots = sorted(int(s) for s in args.snapshots.split(","))
  results: dict = {}
  for name in args.variants.split(","):
    run_variant(name, images, snapshots, time.perf_counter() + args.budget_s, results, args.out)


if __name__ == "__main__":
  main()
