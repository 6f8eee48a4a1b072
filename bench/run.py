"""score_jax benchmark: time, throughput, compile time, memory and FLOP/s of the main workloads.

    .venv/bin/python bench/run.py                 # every workload, table + bench/results.jsonl
    .venv/bin/python bench/run.py --only=toy_als_b64,ncsnv2_cifar_train_b16
    .venv/bin/python bench/run.py --list

Each workload runs in its own subprocess (so its peak host memory is its own, and device counts
can differ). Per workload: compile time (lower + compile), wall time per call (median of
`--repeats` timed calls after one warm-up, with min and max), throughput, XLA's cost-analysis FLOPs
of the compiled call, achieved FLOP/s as a fraction of the machine's peak, measured in the same run
by a large float32 matrix product. Results are appended to bench/results.jsonl with the machine
description; bench/RESULTS.md keeps the latest table per machine kind (rewritten by this script).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent


def machine() -> dict:
  import jax
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  dev = jax.devices()[0]
  accel = None if dev.platform == "cpu" else f"{dev.platform}: {dev.device_kind}"
  return {"cpu": cpu, "cores": os.cpu_count(), "accelerator": accel, "jax": jax.__version__,
          "backend": dev.platform}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--only", default="", help="comma-separated workload names, run in this order")
  p.add_argument("--list", action="store_true")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--workload", help=argparse.SUPPRESS)
  p.add_argument("--devices", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--kind", default=None, help="machine kind label for RESULTS.md (default: cpu model)")
  p.add_argument("--no-save", action="store_true")
  p.add_argument("--timeout", type=float, default=None,
                 help="seconds allowed per workload (compile included); a slower one is skipped")
  args = p.parse_args()
  sys.path.insert(0, str(REPO))
  sys.path.insert(0, str(HERE))

  if args.workload:  # child process: one workload, JSON on the last stdout line.
    import workloads
    result = workloads.run(args.workload, repeats=args.repeats)
    print("RESULT " + json.dumps(result))
    return

  import workloads
  names = workloads.names()
  if args.list:
    print("\n".join(names))
    return
  wanted = [n for n in args.only.split(",") if n]
  unknown = [n for n in wanted if n not in names]
  if unknown:
    p.error(f"unknown workload(s) {', '.join(unknown)} in --only; --list shows the names")
  selected = wanted or names  # in the order given, so the important ones can go first
  info = machine()
  peak = _child("matmul_peak", args.repeats, devices=1, timeout=args.timeout)
  peak_flops = peak["flops"] / peak["median_s"]
  print(f"machine: {info}; measured float32 matmul peak {peak_flops / 1e9:.1f} GFLOP/s "
        f"({peak['note']})", flush=True)
  kind = args.kind or info["accelerator"] or info["cpu"]
  stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  for name in selected:
    r = _child(name, args.repeats, devices=workloads.devices_of(name), timeout=args.timeout)
    if r is None:
      continue
    if r.get("flops"):
      r["fraction_of_peak"] = r["flops"] / r["median_s"] / r.get("local_peak_flops", peak_flops)
    print(_format_row(r), flush=True)
    if not args.no_save:  # row by row, so an interrupted run keeps what it measured
      with open(HERE / "results.jsonl", "a") as f:
        f.write(json.dumps({"time": stamp, "kind": kind, "machine": info, "peak_flops": peak_flops,
                            "peak_note": peak["note"], **r}) + "\n")
      _write_results_md()


def _child(name: str, repeats: int, devices: int | None, timeout: float | None = None
           ) -> dict | None:
  env = dict(os.environ)
  if devices and devices > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
  cmd = [sys.executable, str(HERE / "run.py"), f"--workload={name}", f"--repeats={repeats}"]
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    print(f"{name}: SKIPPED (over --timeout={timeout} s)", file=sys.stderr, flush=True)
    return None
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    print(f"{name}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None
  return json.loads(lines[-1][len("RESULT "):])


def _fmt(v, unit=""):
  if v is None:
    return "-"
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(v) >= scale:
      return f"{v / scale:.3g}{prefix}{unit}"
  return f"{v:.3g}{unit}"


HEADER = ("| workload | median (min-max) per call | throughput | compile | peak RSS | "
          "FLOPs/call | FLOP/s | matmul peak | % of peak | note |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def _format_row(r: dict, cpu_flops: float | None = None) -> str:
  """One table row. `cpu_flops`: FLOPs that XLA's CPU cost analysis counts for the same
  workload, used (marked with *) where the row's own count misses work (GPU convolutions)."""
  fl = r.get("flops")
  frac = r.get("fraction_of_peak")
  mark = ""
  if r.get("machine", {}).get("backend", "cpu") != "cpu":
    # An accelerator's own count misses its library calls (cuDNN convolutions): use the CPU
    # count of the same workload, or show none.
    fl, mark = cpu_flops, "*" if cpu_flops else ""
    frac = fl / r["median_s"] / r.get("local_peak_flops", r["peak_flops"]) if fl else None
  compile_s = "-" if r.get("compile_s") is None else f"{r['compile_s']:.2f} s"
  return (f"| {r['name']} | {r['median_s'] * 1e3:.3g} ms ({r['min_s'] * 1e3:.3g}-"
          f"{r['max_s'] * 1e3:.3g}) | {_fmt(r.get('throughput'))} {r.get('throughput_unit', '')} | "
          f"{compile_s} | {r['peak_rss_mb']:.0f} MB | {_fmt(fl)}{mark} | "
          f"{_fmt(fl / r['median_s'] if fl else None)}{mark} | "
          f"{_fmt(r.get('local_peak_flops') or r.get('peak_flops'))} | "
          f"{'-' if frac is None else f'{100 * frac:.1f}%'}{mark} | {r.get('note', '')} |")


def _write_results_md() -> None:
  """bench/RESULTS.md: per machine kind, the latest measurement of each workload."""
  latest: dict[str, dict[str, dict]] = {}
  with open(HERE / "results.jsonl") as f:
    for line in f:
      r = json.loads(line)
      rows = latest.setdefault(r["kind"], {})
      if r["time"] >= rows.get(r["name"], {}).get("time", ""):
        rows[r["name"]] = r
  cpu_flops = {n: r["flops"] for rows in latest.values() for n, r in rows.items()
               if r.get("machine", {}).get("backend") == "cpu" and r.get("flops")}
  out = ["# Benchmark results", "",
         "Written by `bench/run.py`: per machine kind, the latest measurement of each workload. "
         "See bench/NOTES.md for what was tried and why. FLOPs are XLA's cost analysis of the "
         "compiled call; it counts a loop body (lax.scan) once, so samplers and fused steps "
         "report the body's FLOPs times the loop's iterations. On GPUs the cost analysis misses "
         "the convolutions that run as cuDNN calls: their FLOPs (marked *) are the CPU count of "
         "the same workload, and '-' where no CPU row exists.", ""]
  for kind, rows in sorted(latest.items()):
    first = min(r["time"] for r in rows.values())
    last = max(r["time"] for r in rows.values())
    r0 = rows[max(rows, key=lambda n: rows[n]["time"])]
    out += [f"## {kind}", "", f"Runs {first} to {last}; {r0['machine']}; measured float32 matmul "
            f"peak at the start of the latest run {r0['peak_flops'] / 1e9:.1f} GFLOP/s "
            f"({r0.get('peak_note', '4096^2')}). '% of peak' is against the 'matmul peak' "
            "column: the same matmul timed in the workload's own process right after it (rows "
            "measured before 2026-11-26T04:20Z have none and use the run's "
            "peak).", "",
            HEADER]
    out += [_format_row(r, cpu_flops.get(n)) for n, r in rows.items()]
    out.append("")
  (HERE / "RESULTS.md").write_text("\n".join(out))


if __name__ == "__main__":
  main()
