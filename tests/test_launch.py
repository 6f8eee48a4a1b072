"""`score_jax.launch`: real child processes; status pass-through, ending the others, signals."""

import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO
from score_jax import launch

CHILD = str(REPO / "tests" / "fixtures" / "launch" / "child.py")
TIMEOUT = 300  # bounds a hang; never a speed expectation


def _launch(*args: str) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.Popen([sys.executable, "-m", "score_jax.launch", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(proc: subprocess.Popen, text: str, count: int) -> list[str]:
  """Reads stdout until `count` lines contain `text` (the event the test waits for)."""
  seen = []
  while sum(text in line for line in seen) < count:
    line = proc.stdout.readline()
    if not line:
      raise AssertionError(f"stdout ended before {count} lines with {text!r}: {seen}")
    seen.append(line)
  return seen


def test_all_succeed_prefixed_output_and_coordinator_flags():
  proc = _launch("--num_processes=3", "--devices_per_process=2", "--", CHILD, "ok")
  out, err = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == 0, err
  lines = sorted(out.splitlines())
  assert [line.split()[0] for line in lines] == ["[p0]", "[p1]", "[p2]"]
  addresses = {line.split(" at ")[1].split()[0] for line in lines}
  assert len(addresses) == 1 and addresses.pop().startswith("127.0.0.1:")
  assert all("--xla_force_host_platform_device_count=2" in line for line in lines)
  for i in range(3):
    assert f"[p{i}] hello from {i} of 3" in out


def test_failing_process_ends_the_others_and_its_status_passes_through():
  proc = _launch("--num_processes=3", "--", CHILD, "fail_p1")
  out, err = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == 3, (out, err)
  assert "[p1] failing" in err
  assert "process 1 exited with status 3" in err


def test_sigterm_is_forwarded_to_every_process():
  proc = _launch("--num_processes=2", "--", CHILD, "wait_term")
  try:
    _wait_for_lines(proc, "ready", 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
  finally:
    proc.kill()
  assert proc.returncode == 0, err
  for i in range(2):
    assert f"[p{i}] got signal {int(signal.SIGTERM)}" in out


def test_sigint_is_forwarded_and_an_unhandled_signal_gives_128_plus_it():
  proc = _launch("--num_processes=2", "--", CHILD, "wait_term")
  try:
    _wait_for_lines(proc, "ready", 2)
    proc.send_signal(signal.SIGINT)  # the child handles only SIGTERM: SIGINT's default ends it
    _, err = proc.communicate(timeout=TIMEOUT)
  finally:
    proc.kill()
  # Python ends an unhandled KeyboardInterrupt by killing itself with SIGINT.
  assert proc.returncode == 128 + signal.SIGINT, err
  assert "[p0]" in err and "[p1]" in err and "KeyboardInterrupt" in err


@pytest.mark.parametrize("argv, message", [
    (["--num_processes=0"], "--num_processes=0 must be >= 1"),
    (["--num_processes=2", "--devices_per_process=0"], "--devices_per_process=0 must be >= 1"),
    (["--num_processes=2", "--", "--process_id=1"], "--process_id after `--` is set by the launcher"),
])
def test_bad_flags_are_one_line_usage_errors(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    launch.parse_args(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_child_command():
  assert launch.child_command(["--config=x.py"])[1:] == ["-m", "score_jax", "--config=x.py"]
  assert launch.child_command(["-m", "mod", "a"])[1:] == ["-m", "mod", "a"]
  assert launch.child_command(["s.py", "a"])[1:] == ["s.py", "a"]


@pytest.mark.multihost
def test_two_processes_form_one_jax_job():
  proc = _launch("--num_processes=2", "--devices_per_process=4", "--", CHILD, "jax")
  out, err = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == 0, err
  # Each process contributes 4 rows of (its id + 1): 4 * 1 + 4 * 2.
  for i in range(2):
    assert f"[p{i}] process {i}/2 devices 4/8 sum 12.0" in out, out
