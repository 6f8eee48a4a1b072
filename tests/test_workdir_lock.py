"""The workdir writer lock: one holder, refusals change nothing, crashes release, stale holders."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from conftest import HANG_TIMEOUT_S

from score_jax import workdir_lock

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tree(root: pathlib.Path) -> list:
  return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns, p.stat().st_size)
                for p in root.rglob("*"))


def test_second_writer_is_refused_and_changes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with workdir_lock.WorkdirLock(str(workdir)) as lock:
    info = json.loads(pathlib.Path(lock.path).read_text())
    assert info["pid"] == os.getpid() and info["holder"] == "train"
    (workdir / "checkpoints").mkdir()
    before = _tree(tmp_path)
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=f"in use by train \\(pid {os.getpid()}"):
      workdir_lock.WorkdirLock(str(workdir)).acquire()
    assert _tree(tmp_path) == before
  # Released: the next writer gets it.
  with workdir_lock.WorkdirLock(str(workdir)):
    pass


def test_lock_that_made_the_workdir_removes_it_when_nothing_was_written(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path / "new")):
    assert (tmp_path / "new" / workdir_lock.LOCK_NAME).is_file()
  assert not (tmp_path / "new").exists()


def _holder_script(workdir, body: str) -> str:
  return textwrap.dedent(f"""
      import os, subprocess, sys
      sys.path.insert(0, {str(REPO)!r})
      from score_jax import workdir_lock
      lock = workdir_lock.WorkdirLock({str(workdir)!r}).acquire()
      """) + textwrap.dedent(body)


def test_a_killed_holder_releases_the_lock(tmp_path, capfd):
  workdir = tmp_path / "run"
  workdir.mkdir()
  subprocess.run([sys.executable, "-c", _holder_script(workdir, "os._exit(9)")], check=False,
                 timeout=HANG_TIMEOUT_S)
  with workdir_lock.WorkdirLock(str(workdir)):
    pass
  assert "did not exit cleanly; taking over" in capfd.readouterr().err


def test_stale_holder_is_named_with_how_to_clear_it(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  # The holder exits, but a child that inherited the locked file keeps the lock.
  body = """
      child = subprocess.Popen(["sleep", "30"], pass_fds=[lock._fd], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
      print(child.pid, flush=True)
      os._exit(0)
      """
  out = subprocess.run([sys.executable, "-c", _holder_script(workdir, body)],
                       capture_output=True, text=True, timeout=HANG_TIMEOUT_S, check=True).stdout
  child = int(out.split()[0])
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError, match="no longer running.*fuser") as e:
      workdir_lock.WorkdirLock(str(workdir)).acquire()
    assert "\n" not in str(e.value)
  finally:
    os.kill(child, 9)
