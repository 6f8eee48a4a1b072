"""The benchmark driver (bench/run.py) keeps working: names, order, and a real short run."""
import os
import subprocess
import sys

import pytest
from conftest import HANG_TIMEOUT_S, REPO

RUN = REPO / "bench" / "run.py"


def _run(*args: str, timeout: float = HANG_TIMEOUT_S) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one device, as the bench runs
  return subprocess.run([sys.executable, str(RUN), *args], env=env, capture_output=True,
                        text=True, timeout=timeout, cwd=REPO)


def test_unknown_workload_is_a_clear_error():
  proc = _run("--only=toy_als_b64,toy_als_b9999")
  assert proc.returncode == 2
  assert "unknown workload(s) toy_als_b9999" in proc.stderr and "--list" in proc.stderr


@pytest.mark.e2e  # the driver, its peak measurement and two workloads: three JAX processes
def test_short_run_prints_rows_in_the_given_order_and_saves_nothing():
  results = REPO / "bench" / "results.jsonl"
  before = results.read_bytes()
  proc = _run("--only=toy_train_b128,toy_als_b64", "--repeats=1", "--no-save")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [l for l in proc.stdout.splitlines() if l.startswith("| toy_")]
  assert [r.split("|")[1].strip() for r in rows] == ["toy_train_b128", "toy_als_b64"]
  for row in rows:  # time, FLOPs and a fraction of the measured peak were all filled in
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1].endswith(")") and cells[5] != "-" and cells[8].endswith("%"), row
  assert results.read_bytes() == before
