"""A/B of the NCSNv2 CPU training step: this tree against another checkout, interleaved.

    git archive <commit> | tar -x -C /tmp/before     # the code to compare against
    .venv/bin/python bench/cpu_ab.py --before=/tmp/before [--batch=16] [--repeats=7]

Each side is a worker subprocess that imports `score_jax` and `bench/workloads.py` from its own
tree, builds the CIFAR-10 NCSNv2 training step (`workloads._state_and_step`, one device) and runs
one warm-up step; then the parent asks the workers for one timed step at a time, alternating, so
both sides see the same machine load. A third side runs this tree with the fast CPU path off
(`score_jax.cpu.fast_path(False)`, XLA's own operations). Prints the median step time per side
and the ratios to this tree's; timings go to bench/NOTES.md, not to the code.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def worker(tree: str, batch: int, fast: bool) -> None:
  sys.path[:0] = [tree, str(pathlib.Path(tree) / "bench")]
  import contextlib

  import jax
  import workloads
  if fast:
    switch = contextlib.nullcontext()
  else:
    from score_jax import cpu
    switch = cpu.fast_path(False)
  with switch:  # read when the step is traced (its first call)
    _, _, state, step, data = workloads._state_and_step(workloads._ncsnv2_cifar_config(), batch)
    rng = jax.random.key(0)
    state = jax.block_until_ready(step(state, data, rng)[0])
  print("ready", flush=True)
  for _ in sys.stdin:
    t0 = time.perf_counter()
    state = jax.block_until_ready(step(state, data, rng)[0])
    print(json.dumps(time.perf_counter() - t0), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--before", required=True, help="a checkout of the code to compare against")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--worker", nargs=2, metavar=("TREE", "FAST"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args.worker[0], args.batch, args.worker[1] == "1")
  before = pathlib.Path(args.before)
  if not (before / "score_jax" / "__init__.py").is_file():
    sys.exit(f"--before={before} holds no score_jax package; extract a commit there first "
             "(git archive <commit> | tar -x -C DIR)")
  sides = {"before": (str(before), "1"), "after": (str(REPO), "1"),
           "after, fast path off": (str(REPO), "0")}
  procs = {}
  for name, (tree, fast) in sides.items():  # one at a time: compiling is what costs
    procs[name] = subprocess.Popen(
        [sys.executable, __file__, "--before", str(before), "--batch", str(args.batch),
         "--worker", tree, fast], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=tree)
    line = procs[name].stdout.readline()
    if line.strip() != "ready":
      sys.exit(f"the {name!r} worker failed to build its step (its stderr is above)")
  times = {name: [] for name in sides}
  for _ in range(args.repeats):
    for name, proc in procs.items():
      proc.stdin.write("step\n")
      proc.stdin.flush()
      times[name].append(json.loads(proc.stdout.readline()))
  for proc in procs.values():
    proc.stdin.close()
    proc.wait()
  after = statistics.median(times["after"])
  for name, ts in times.items():
    med = statistics.median(ts)
    print(f"NCSNv2 CIFAR-10 training step, batch {args.batch}, {name}: median {med:.3f} s "
          f"({med / after:.3f}x after; {' '.join(f'{t:.3f}' for t in ts)})")


if __name__ == "__main__":
  main()
