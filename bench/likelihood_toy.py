"""Toy NLL through the probability-flow ODE: plain DSM against adversarial score matching.

Trains two score models on the NCSN two-mode mixture with the repository's own entry point
(`main.py --config=configs/adversarial_toy.py`, same network, optimizer, noise ladder and steps;
the only difference is `adversarial.enabled`), then measures on the same held-out mixture samples:
* the model's NLL, -log p_{sigma_min}(x) from `likelihood.log_prob` (exact trace, rtol = atol =
  1e-5, prior N(0, sigma_max^2 I)), in nats per example (2-D data);
* the exact score through the same protocol (what a perfect model would get from this estimator,
  prior error included);
* the truth: -log of the mixture convolved with N(0, sigma_min^2 I).

    .venv/bin/python bench/likelihood_toy.py [--steps 2000] [--root /tmp/likelihood_toy]

bench/NOTES.md has the numbers.
"""

import argparse
import json
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from score_jax import likelihood as lik  # noqa: E402
from score_jax import models, toy  # noqa: E402
from score_jax.experiment import load_checkpoint  # noqa: E402
from score_jax.score import make_score_fn  # noqa: E402

SIGMA_MAX, SIGMA_MIN = 10.0, 0.01  # the ladder of configs/two_d.py (adversarial_toy's base)


def train(workdir: pathlib.Path, adversarial: bool, steps: int) -> None:
  overrides = [
      "--config.data.dataset=ncsn_mixture", f"--config.training.num_train_steps={steps}",
      f"--config.training.ckpt_every_steps={steps}", f"--config.training.eval_every_steps={steps}",
      f"--config.adversarial.enabled={adversarial}"]
  cmd = [sys.executable, str(REPO / "main.py"), f"--config={REPO / 'configs/adversarial_toy.py'}",
         f"--workdir={workdir}", "--mode=train", *overrides]
  subprocess.run(cmd, check=True, cwd=REPO)


def nll(score_fn, x) -> tuple[np.ndarray, dict]:
  fn = jax.jit(lambda x: lik.log_prob(score_fn, x, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX))
  logp, info = fn(x)
  return -np.asarray(logp), info


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--root", default="/tmp/likelihood_toy")
  parser.add_argument("--num", type=int, default=2000)
  args = parser.parse_args()
  root = pathlib.Path(args.root)
  mix = toy.ncsn_mixture()
  x = mix.sample(jax.random.key(2026), args.num)
  truth = -np.asarray(mix.log_prob(x, SIGMA_MIN))
  exact, _ = nll(mix.score, x)
  rows = [{"model": "truth", "nll_mean": float(truth.mean())},
          {"model": "exact score, same protocol", "nll_mean": float(exact.mean()),
           "nll_se": float(exact.std(ddof=1) / np.sqrt(len(exact)))}]
  for name, adversarial in (("dsm", False), ("adversarial", True)):
    workdir = root / name
    if not (workdir / "checkpoints").is_dir():
      train(workdir, adversarial, args.steps)
    config, state = load_checkpoint(str(workdir))
    if (config.noise.sigma_max, config.noise.sigma_min) != (SIGMA_MAX, SIGMA_MIN):
      raise ValueError(f"{workdir} was trained on sigma {config.noise.sigma_max}..."
                       f"{config.noise.sigma_min}, not {SIGMA_MAX}...{SIGMA_MIN}")
    score_fn = make_score_fn(models.build(config), state.ema_params[0])
    model_nll, info = nll(score_fn, x)
    rows.append({"model": name, "steps": args.steps, "nll_mean": float(model_nll.mean()),
                 "nll_se": float(model_nll.std(ddof=1) / np.sqrt(len(model_nll))),
                 "excess_over_exact_mean": float((model_nll - exact).mean()),
                 "excess_over_exact_se": float((model_nll - exact).std(ddof=1)
                                               / np.sqrt(len(x))),
                 "nfe_mean": float(jnp.mean(info["nfe"])),
                 "all_converged": bool(jnp.all(info["success"]))})
  protocol = {"data": "ncsn_mixture", "num_examples": args.num, "sigma_min": SIGMA_MIN,
              "sigma_max": SIGMA_MAX, "trace": "exact", "rtol": 1e-5, "atol": 1e-5,
              "prior": "N(0, sigma_max^2 I)", "units": "nats per example (D = 2)",
              "measured": "density of the data convolved with N(0, sigma_min^2 I)"}
  for row in rows:
    print(json.dumps({**row, **protocol}))


if __name__ == "__main__":
  main()
