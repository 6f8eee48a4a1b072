"""MNIST: Frechet distance in the MNIST-classifier space against NFE, for every sampler.

Runs `main.py --mode=sampler_sweep` on a trained `configs/mnist_cpu.py` workdir once per group of
settings (the sweep grid cannot vary CAS's `n_sigma`, so CAS gets one run per value), all with the
same protocol: `--num_samples` samples from the newest checkpoint's EMA weights, per-sample keys
from seed 0, against the first `--num_samples` test digits, features of `score_jax`'s MNIST
classifier (`eval.features=mnist_classifier`, the 128-d penultimate layer), samples clipped to
[0, 1] and quantized to 8 bits. The rows land in `<workdir>/sampler_sweep.jsonl` (a rerun reuses
finished rows); this script then prints the table of all of them, sorted by sampler and NFE, marks
the fewest NFE that match the quality of the config's own ALS setting, and plots the distance
against NFE, one line per sampler, to `<workdir>/mnist_nfe.png`.

    python -m score_jax.eval.mnist_classifier --manual_dir=../shared/data/mnist     # once
    .venv/bin/python bench/mnist_nfe.py --workdir=runs/mnist_cpu [--num_samples=500]
    .venv/bin/python bench/mnist_nfe.py --workdir=runs/mnist_edm_cpu --set noise.num_scales=10

bench/NOTES.md and the README have the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from score_jax import plots  # noqa: E402

METRIC = "fid_mnist"
RUNS = (  # cheapest first, so an interrupted run has the fast samplers' rows
    {"eval.sweep_methods": ("euler", "heun", "dpm_solver_pp_2m"), "eval.sweep_num_steps": (10, 25)},
    {"eval.sweep_methods": ("pc",), "eval.sweep_steps_per_sigma": (1,),
     "eval.sweep_denoise": (True,)},
    {"eval.sweep_methods": ("cas",), "eval.sweep_step_lrs": (3e-5,), "eval.sweep_denoise": (True,),
     "sampling.cas.n_sigma": 5},
    {"eval.sweep_methods": ("cas",), "eval.sweep_step_lrs": (3e-5,), "eval.sweep_denoise": (True,),
     "sampling.cas.n_sigma": 20},
    {"eval.sweep_methods": ("adaptive",), "eval.sweep_rel_tols": (0.1, 0.05)},
    {"eval.sweep_methods": ("als",), "eval.sweep_step_lrs": (2e-5,),
     "eval.sweep_steps_per_sigma": (10, 100), "eval.sweep_denoise": (True,)},
)
# The config's own ALS setting (step_lr 2e-5, 100 steps per level): the quality to match.
ANCHOR = {"method": "als", "step_lr": 2e-5, "steps_per_sigma": 100}


def flag(key: str, value) -> str:
  if isinstance(value, tuple):
    value = "(" + ",".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return f"--config.{key}={value}"


def setting(row: dict) -> str:
  knobs = ("step_lr", "steps_per_sigma", "n_sigma", "corrector_steps", "num_steps", "rel_tol")
  return ", ".join(f"{k}={row[k]:g}" for k in knobs if row.get(k) is not None)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a trained configs/mnist_cpu.py workdir")
  parser.add_argument("--num_samples", type=int, default=400)
  parser.add_argument("--batch_size", type=int, default=400)
  parser.add_argument("--table_only", action="store_true", help="only print the stored rows")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for every run, e.g. noise.num_scales=10 (the "
                      "ladder of ALS, CAS and PC on a model trained on continuous noise)")
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  common = {"eval.features": "mnist_classifier", "eval.num_samples": args.num_samples,
            "eval.batch_size": args.batch_size, "sampling.batch_size": args.batch_size,
            **dict(kv.split("=", 1) for kv in args.set)}
  if not args.table_only:
    for run in RUNS:
      cmd = [sys.executable, str(REPO / "main.py"), "--mode=sampler_sweep", f"--workdir={workdir}",
             *(flag(k, v) for k, v in {**common, **run}.items())]
      print("+", " ".join(cmd[1:]), flush=True)
      subprocess.run(cmd, check=True, cwd=REPO)
  rows = [json.loads(line) for line in (workdir / "sampler_sweep.jsonl").read_text().splitlines()]
  rows = [r for r in rows if "skipped" not in r and r.get("num_samples") == args.num_samples
          and r.get("features") == "mnist_classifier" and math.isfinite(r.get(METRIC, math.nan))]
  rows.sort(key=lambda r: (r["method"], r["nfe"]))
  anchor = [r for r in rows if all(r.get(k) == v for k, v in ANCHOR.items())]
  target = anchor[0][METRIC] if anchor else None
  print("| sampler | setting | NFE | FD (classifier) | KID (classifier) |\n|---|---|---|---|---|")
  for r in rows:
    mark = " *" if target is not None and r[METRIC] <= target else ""
    print(f"| {r['method']} | {setting(r)} | {r['nfe']:.0f} | {r[METRIC]:.1f}{mark} | "
          f"{r.get('kid_mnist', math.nan):.3g} |")
  if target is not None:
    matching = [r for r in rows if r[METRIC] <= target]
    best = min(matching, key=lambda r: r["nfe"])
    print(f"* at or below the config's ALS ({target:.1f} at {anchor[0]['nfe']:.0f} NFE); fewest "
          f"NFE doing so: {best['method']} ({setting(best)}) at {best['nfe']:.0f}")
  print(f"checkpoint step {rows[0]['step'] if rows else '?'}; {args.num_samples} samples")
  curves: dict[str, tuple[list, list]] = {}
  for r in rows:
    xs, ys = curves.setdefault(r["method"], ([], []))
    xs.append(float(r["nfe"]))
    ys.append(float(r[METRIC]))
  plots.save_lines(curves, str(workdir / "mnist_nfe.png"), xlabel="NFE per sample",
                   ylabel="Frechet distance (MNIST classifier)", logx=True)


if __name__ == "__main__":
  main()
