"""Starts N local processes of one multi-host JAX job on this machine (tests, laptops).

  python -m score_jax.launch --num_processes=2 --devices_per_process=4 -- \\
      --config=configs/test.py --workdir=runs/mh

runs `python -m score_jax <flags>` (the command line of `main.py`) as processes 0..N-1 of one job:
each gets `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I` appended (a
free port on the loopback), `JAX_PLATFORMS=cpu` and `XLA_FLAGS` with
`--xla_force_host_platform_device_count=K` unless `--platform` names another backend, so the job
sees N x K devices, the way a pod of N hosts with K chips each does. After `--`, `-m MODULE ...`
or `SCRIPT.py ...` runs that instead of `score_jax` (with the same three flags appended).

Every output line is prefixed with `[pI]` (stdout to stdout, stderr to stderr). SIGINT and
SIGTERM are forwarded to every process (they run in their own session, so a terminal's Ctrl-C
reaches them once, through here). When one process fails, the others get SIGTERM, then SIGKILL
after `--grace_seconds`, and the launcher exits with the failing process's status (128 + signal
for a process killed by a signal); when all succeed it exits 0.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m score_jax.launch",
      description="Runs N local processes of one multi-host JAX job (score_jax's command line by "
                  "default). Everything after `--` is the processes' command line: main.py flags, "
                  "or `-m MODULE args` / `SCRIPT.py args`.",
      epilog="example: python -m score_jax.launch --num_processes=2 --devices_per_process=4 -- "
             "--config=configs/test.py --workdir=runs/mh")
  p.add_argument("--helpfull", action="help", help="the same as --help")
  p.add_argument("--num_processes", type=int, required=True, help="processes to start (N >= 1)")
  p.add_argument("--devices_per_process", type=int, default=1,
                 help="simulated CPU devices per process (K >= 1; ignored with --platform)")
  p.add_argument("--port", type=int, default=None,
                 help="the coordinator's port on 127.0.0.1 (default: a free one)")
  p.add_argument("--platform", default="cpu",
                 help="JAX_PLATFORMS of the processes; other than cpu, XLA_FLAGS is left alone")
  p.add_argument("--grace_seconds", type=float, default=30.0,
                 help="after a failure, how long the other processes get between SIGTERM and "
                      "SIGKILL")
  return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """`(options, child_args)`; SystemExit(2) with one line on bad input."""
  argv = list(argv)
  if "--" in argv:
    cut = argv.index("--")
    own, child = argv[:cut], argv[cut + 1:]
  else:
    own, child = argv, []
  parser = _parser()
  args = parser.parse_args(own)
  if args.num_processes < 1:
    parser.error(f"--num_processes={args.num_processes} must be >= 1")
  if args.devices_per_process < 1:
    parser.error(f"--devices_per_process={args.devices_per_process} must be >= 1")
  if args.port is not None and not 0 < args.port < 65536:
    parser.error(f"--port={args.port} must be in 1..65535")
  for a in child:
    if a.split("=", 1)[0] in ("--coordinator_address", "--num_processes", "--process_id"):
      parser.error(f"{a.split('=', 1)[0]} after `--` is set by the launcher; drop it")
  return args, child


def child_command(child_args: list[str]) -> list[str]:
  """The Python command line of one process (before the coordinator flags)."""
  if child_args[:1] == ["-m"]:
    return [sys.executable, *child_args]
  if child_args and child_args[0].endswith(".py") and not child_args[0].startswith("-"):
    return [sys.executable, *child_args]
  return [sys.executable, "-m", "score_jax", *child_args]


def child_env(process_id: int, devices: int, platform: str) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS=platform, SCORE_JAX_PROCESS_ID=str(process_id))
  if platform == "cpu":
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count=")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
  # Lines reach the launcher as they are written, not when a buffer fills.
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _pump(stream: IO[bytes], out: IO[str], prefix: str, lock: threading.Lock) -> None:
  for raw in iter(stream.readline, b""):
    line = raw.decode(errors="replace").rstrip("\n")
    with lock:
      out.write(f"{prefix} {line}\n")
      out.flush()
  stream.close()


def _exit_status(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def run(argv: Sequence[str]) -> int:
  """Runs the job; returns the launcher's exit status."""
  args, child_args = parse_args(argv)
  port = args.port or free_port()
  base = child_command(child_args)
  procs: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []
  exits: queue.Queue = queue.Queue()
  write_lock = threading.Lock()

  def forward(signum, _frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    for i in range(args.num_processes):
      cmd = [*base, f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={args.num_processes}", f"--process_id={i}"]
      p = subprocess.Popen(cmd, env=child_env(i, args.devices_per_process, args.platform),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
      procs.append(p)
      for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
        t = threading.Thread(target=_pump, args=(stream, out, f"[p{i}]", write_lock), daemon=True)
        t.start()
        pumps.append(t)
      threading.Thread(target=lambda i=i, p=p: exits.put((i, p.wait())), daemon=True).start()

    status = 0
    running = len(procs)
    deadline = None
    while running:
      try:
        i, code = exits.get(timeout=None if deadline is None else
                            max(deadline - time.monotonic(), 0.0))
      except queue.Empty:  # the grace period is over
        for p in procs:
          if p.poll() is None:
            p.kill()
        deadline = None
        continue
      running -= 1
      if code != 0 and status == 0:
        status = _exit_status(code)
        with write_lock:
          print(f"[launch] process {i} exited with status {status}; ending the others",
                file=sys.stderr, flush=True)
        for p in procs:
          if p.poll() is None:
            p.terminate()
        deadline = time.monotonic() + args.grace_seconds
    for t in pumps:
      t.join()
    return status
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    for p in procs:
      if p.poll() is None:
        p.kill()


def main(argv: Sequence[str] | None = None) -> int:
  return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
