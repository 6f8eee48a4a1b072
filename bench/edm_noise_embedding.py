"""NCSNv2 under EDM preconditioning: unconditional F or a c_noise embedding (bench/NOTES.md).

Trains `configs/mnist_edm_cpu.py`'s network twice from the same initial weights, data order and
noise draws, once unconditional (`model.ncsn.noise_embedding=False`) and once with the c_noise
embedding, then reports each one's EDM-weighted DSM loss on test digits per sigma bin, with the
same noise draws for both, and the seconds per training step.

    python bench/edm_noise_embedding.py --steps=300 [--mnist_dir=../shared/data/mnist]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import mnist_edm_cpu  # noqa: E402
from score_jax import experiment, idx, losses, models, noise  # noqa: E402
from score_jax.score import make_score_fn  # noqa: E402
from score_jax.train_state import param_count  # noqa: E402

MNIST = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _digits(mnist_dir: pathlib.Path, split: str) -> np.ndarray:
  name = "train" if split == "train" else "t10k"
  x = idx.read_idx(mnist_dir / f"{name}-images-idx3-ubyte.gz")
  return (x.astype(np.float32) / 255.0)[..., None]


def run(embedding: bool, steps: int, batch: int, eval_n: int, mnist_dir: pathlib.Path) -> dict:
  config = mnist_edm_cpu.get_config()
  config.model.ncsn.noise_embedding = embedding
  model = models.build(config)
  sigmas = experiment.sigmas_from_config(config)
  dist = experiment.noise_distribution_from_config(config)
  kw = dict(distribution=dist, weighting=config.noise.weighting,
            sigma_data=config.noise.sigma_data)
  x_train, x_test = _digits(mnist_dir, "train"), _digits(mnist_dir, "test")[:eval_n]
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.ones((1,)))["params"]
  opt = optax.adam(config.optim.lr)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, x, rng):
    loss_fn = lambda p: losses.dsm_loss(make_score_fn(model, p, train=True), x, sigmas, rng,
                                        **kw)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params, x, rng):
    return losses.dsm_loss(make_score_fn(model, params), x, sigmas, rng, **kw)[1]

  order = np.random.default_rng(0).permutation(len(x_train))
  params, opt_state, _ = step(params, opt_state, x_train[order[:batch]], jax.random.key(1))
  start = time.time()
  for k in range(1, steps):
    xb = x_train[order[(k * batch) % len(order):][:batch]]
    params, opt_state, loss = step(params, opt_state, xb, jax.random.fold_in(jax.random.key(1), k))
  jax.block_until_ready(params)
  sec = (time.time() - start) / max(steps - 1, 1)
  sums, counts = 0.0, 0.0
  for r in range(4):  # the same 4 x eval_n noise draws for both networks
    m = evaluate(params, x_test, jax.random.fold_in(jax.random.key(2), r))
    sums, counts = sums + np.asarray(m["level_loss_sum"]), counts + np.asarray(m["level_count"])
  return dict(params=param_count(params), sec_per_step=sec, per_bin=sums / np.maximum(counts, 1),
              counts=counts, loss=float(sums.sum() / counts.sum()), sigmas=np.asarray(sigmas))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--eval_n", type=int, default=1000)
  p.add_argument("--mnist_dir", default=str(MNIST), help="the four MNIST files")
  a = p.parse_args()
  results = {e: run(e, a.steps, a.batch, a.eval_n, pathlib.Path(a.mnist_dir))
             for e in (False, True)}
  sig = results[False]["sigmas"]
  print(f"{'':>22} {'unconditional':>14} {'embedding':>10}")
  for e in (False, True):
    r = results[e]
    print(f"{'embedding' if e else 'unconditional'}: {r['params']:,} params, "
          f"{r['sec_per_step']:.3f} s/step, test loss {r['loss']:.4f}")
  groups = np.array_split(np.arange(len(sig)), min(8, len(sig)))
  for g in groups:
    u, e = (results[k]["per_bin"][g] @ results[k]["counts"][g] / max(results[k]["counts"][g].sum(),
                                                                       1) for k in (False, True))
    print(f"sigma {sig[g[0]]:8.3f} .. {sig[g[-1]]:8.3f}: {u:14.4f} {e:10.4f}")


if __name__ == "__main__":
  main()
