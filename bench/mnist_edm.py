"""MNIST: the ladder model against the continuous (EDM) model, every sampler against NFE.

Issue 31's comparison. Two workdirs trained for the same number of steps at the same batch and
network size (`configs/mnist_cpu.py`: NCSN's ladder sigma 1 -> 0.01; `configs/mnist_edm_cpu.py`:
ln sigma ~ N(P_mean, P_std^2), EDM preconditioning, sigma_max 16.88). For every row (a sampler
setting on one model) and every seed it draws `--num_samples` samples from the checkpoint's EMA
weights with per-example keys from `jax.random.key(seed)`, clips them to [0, 1], quantizes them to
8 bits, and measures them in the MNIST classifier's 128-d feature space
(`score_jax.eval.mnist_classifier`) against all 10000 test digits: the Frechet distance and KID
(100 subsets of 1000). The floor row measures `--num_samples` training digits the same way (three
disjoint sets), the distance a perfect sampler would reach at this sample count.

Rows are appended to `--out` (JSON lines) as they finish; a rerun skips the (model, row, seed)
triples already there, so the script can be interrupted and resumed. `--table` prints the stored
rows grouped as the README shows them (mean +- standard deviation over seeds).

    python -m score_jax.eval.mnist_classifier --manual_dir=../shared/data/mnist    # once
    python bench/mnist_edm.py --ladder=runs/mnist_cpu --edm=runs/mnist_edm_cpu --step=3000 \
        --manual_dir=../shared/data/mnist --out=bench/mnist_edm.jsonl
    python bench/mnist_edm.py --out=bench/mnist_edm.jsonl --table

bench/NOTES.md (section 24) and the README have the numbers.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

import jax  # noqa: E402
import numpy as np  # noqa: E402

from score_jax import experiment, image_data, noise  # noqa: E402
from score_jax.eval import feature_nets, metrics, mnist_classifier  # noqa: E402

# (model, label, method, overrides of the sampler's arguments, ALS/CAS/PC ladder length or None,
# seeds). Ordered by priority: an interrupted run has the rows the comparison needs most.
# The continuous model's ALS/CAS/PC ladder is chosen at sampling time (96 levels: NCSNv2's
# Technique 2 for D = 784 from 16.88 to 0.01); ALS's step size follows Technique 4 for its steps
# per level (`noise.step_lr_from_variance_recursion`).
SEEDS3 = (0, 1, 2)
ROWS = (
    ("edm", "heun N=5", "heun", {"num_steps": 5, "s_churn": 0.0}, None, SEEDS3),
    ("edm", "heun N=10", "heun", {"num_steps": 10, "s_churn": 0.0}, None, SEEDS3),
    ("edm", "heun N=18", "heun", {"num_steps": 18, "s_churn": 0.0}, None, SEEDS3),
    ("edm", "dpm_solver_pp_2m N=10", "dpm_solver_pp_2m", {"num_steps": 10}, None, SEEDS3),
    ("edm", "dpm_solver_pp_2m N=20", "dpm_solver_pp_2m", {"num_steps": 20}, None, SEEDS3),
    ("edm", "euler N=20", "euler", {"num_steps": 20}, None, SEEDS3),
    ("ladder", "als T=10", "als", {"steps_per_sigma": 10, "step_lr": 2e-5}, None, SEEDS3),
    ("ladder", "als T=3", "als", {"steps_per_sigma": 3, "step_lr": 2e-5}, None, SEEDS3),
    ("ladder", "heun N=10", "heun", {"num_steps": 10, "s_churn": 0.0}, None, SEEDS3),
    ("ladder", "dpm_solver_pp_2m N=10", "dpm_solver_pp_2m", {"num_steps": 10}, None, SEEDS3),
    ("edm", "als L=96 T=1", "als", {"steps_per_sigma": 1}, 96, SEEDS3),
    ("edm", "als L=96 T=5", "als", {"steps_per_sigma": 5}, 96, (0,)),
    ("edm", "adaptive rel_tol=0.05", "adaptive", {"rel_tol": 0.05}, None, (0,)),
    ("edm", "cas L=96", "cas", {"n_sigma": 1, "step_lr": 1.1e-5}, 96, (0,)),
    ("ladder", "cas n_sigma=5", "cas", {"n_sigma": 5, "step_lr": 3e-5}, None, (0,)),
    ("ladder", "euler N=10", "euler", {"num_steps": 10}, None, SEEDS3),
    ("ladder", "adaptive rel_tol=0.05", "adaptive", {"rel_tol": 0.05}, None, (0,)),
    ("ladder", "pc corrector 1", "pc", {"corrector_steps": 1}, None, (0,)),
    ("edm", "pc L=96 corrector 1", "pc", {"corrector_steps": 1}, 96, (0,)),
    ("edm", "heun N=3", "heun", {"num_steps": 3, "s_churn": 0.0}, None, SEEDS3),
    ("edm", "dpm_solver_pp_2m N=5", "dpm_solver_pp_2m", {"num_steps": 5}, None, SEEDS3),
    ("edm", "heun N=10 S_churn=10", "heun", {"num_steps": 10, "s_churn": 10.0}, None, SEEDS3),
    ("ladder", "als T=100", "als", {"steps_per_sigma": 100, "step_lr": 2e-5}, None, (0,)),
    ("edm", "als L=96 T=10", "als", {"steps_per_sigma": 10}, 96, (0,)),
)
KID_SUBSET = 1000


def done_keys(out: pathlib.Path) -> set[tuple]:
  if not out.exists():
    return set()
  rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
  return {(r["model"], r["label"], r["seed"]) for r in rows}


def quantized(x: np.ndarray) -> np.ndarray:
  return np.round(np.clip(x, 0.0, 1.0) * 255.0) / 255.0


def measure(features_fn, x: np.ndarray, ref: np.ndarray, ref_stats, seed: int) -> dict:
  finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
  f = np.asarray(features_fn(quantized(x[finite])))
  mu, sigma = metrics.feature_stats(f)
  fd = metrics.frechet_distance(mu, sigma, *ref_stats)
  kid, kid_std = metrics.kernel_inception_distance(
      f, ref, rng=jax.random.key(1000 + seed), subset_size=KID_SUBSET)
  return {"fd": float(fd), "kid": kid, "kid_subset_std": kid_std,
          "finite": int(finite.sum())}


def run(args) -> None:
  out = pathlib.Path(args.out)
  done = done_keys(out)
  params = mnist_classifier.load_checked(mnist_classifier.default_params_path())
  features_fn = feature_nets.classifier_features_fn(params)
  test = image_data.load_mnist_raw(args.manual_dir, "test")[0].astype(np.float32) / 255.0
  ref = np.asarray(features_fn(test.reshape(-1, 28, 28, 1)))
  ref_stats = metrics.feature_stats(ref)
  n = args.num_samples

  if ("data", "floor", 2) not in done:
    train = image_data.load_mnist_raw(args.manual_dir, "train")[0].astype(np.float32) / 255.0
    for seed in SEEDS3:
      row = {"model": "data", "label": "floor", "method": "training digits", "seed": seed,
             "nfe": 0, "n": n, **measure(features_fn, train[seed * n:(seed + 1) * n, ..., None],
                                         ref, ref_stats, seed)}
      with out.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
      print(row, flush=True)

  loaded = {}
  for model, label, method, overrides, levels, seeds in ROWS:
    if (args.only and model != args.only) or (args.labels and label not in args.labels):
      continue
    todo = [s for s in seeds if (model, label, s) not in done]
    if not todo:
      continue
    workdir = args.ladder if model == "ladder" else args.edm
    if model not in loaded:
      loaded[model] = experiment.load_checkpoint(workdir, args.step)
    config, state = loaded[model]
    config = config.copy_and_resolve_references()
    config.unlock()
    config.sampling.batch_size = args.batch_size
    overrides = dict(overrides)
    if levels is not None:
      config.noise.num_scales = levels
    if method == "als" and "step_lr" not in overrides:
      # Technique 4 (NCSNv2): the step size whose Langevin recursion keeps the variance ratio
      # near 1 at the last level, for this ladder's ratio gamma and T steps per level.
      sig = np.asarray(experiment.sigmas_from_config(config))
      overrides["step_lr"] = float(noise.step_lr_from_variance_recursion(
          float(sig[-1]), float(sig[0] / sig[1]), overrides["steps_per_sigma"]))
    sample = experiment.make_sampler(config, state, method=method, return_info=True,
                                     **overrides)
    for seed in todo:
      t0 = time.time()
      x, info = sample(jax.random.key(seed), n)
      seconds = time.time() - t0
      nfe = float(np.mean(info["nfe"]))
      row = {"model": model, "label": label, "method": method, "seed": seed, "nfe": nfe,
             "n": n, "step": args.step, "seconds": round(seconds, 1),
             **{k: v for k, v in overrides.items()},
             **measure(features_fn, np.asarray(x), ref, ref_stats, seed)}
      with out.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
      print(row, flush=True)


def table(out: pathlib.Path) -> None:
  rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
  groups: dict[tuple, list] = {}
  for r in rows:
    groups.setdefault((r["model"], r["label"]), []).append(r)

  def stat(vals):
    vals = np.asarray(vals, np.float64)
    if len(vals) == 1:
      return f"{vals[0]:.4g}"
    return f"{vals.mean():.4g} +- {vals.std(ddof=1):.2g}"

  print("| model | sampler | NFE | seeds | Frechet distance | KID |")
  print("|---|---|---|---|---|---|")
  order = {"data": 0, "ladder": 1, "edm": 2}
  for (model, label), rs in sorted(groups.items(),
                                   key=lambda kv: (order[kv[0][0]], kv[1][0]["method"],
                                                   np.mean([r["nfe"] for r in kv[1]]))):
    nfe = np.mean([r["nfe"] for r in rs])
    print(f"| {model} | {label} | {nfe:.4g} | {len(rs)} | {stat([r['fd'] for r in rs])} | "
          f"{stat([r['kid'] for r in rs])} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ladder", help="a trained configs/mnist_cpu.py workdir")
  parser.add_argument("--edm", help="a trained configs/mnist_edm_cpu.py workdir")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (None: newest)")
  parser.add_argument("--manual_dir", help="the MNIST idx files (../shared/data/mnist)")
  parser.add_argument("--num_samples", type=int, default=1000)
  parser.add_argument("--batch_size", type=int, default=500)
  parser.add_argument("--only", choices=("ladder", "edm"), help="rows of one model only")
  parser.add_argument("--labels", type=lambda v: v.split(","), help="comma-separated row labels "
                      "to run (default: every row)")
  parser.add_argument("--out", required=True, help="JSON-lines file of the rows")
  parser.add_argument("--table", action="store_true", help="only print the stored rows")
  args = parser.parse_args()
  if args.table:
    table(pathlib.Path(args.out))
    return
  missing = [f for f in ("ladder", "edm", "manual_dir") if getattr(args, f) is None]
  if missing:
    parser.error("--" + ", --".join(missing) + " required unless --table")
  run(args)


if __name__ == "__main__":
  main()
