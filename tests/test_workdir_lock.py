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


def _ltree(root: pathlib.Path) -> list:
  """`_tree` without following symlinks (a dangling one included)."""
  return sorted((str(p.relative_to(root)), p.lstat().st_mtime_ns, p.lstat().st_size)
                for p in root.rglob("*"))


@pytest.mark.parametrize("kind", ["symlink to a file", "dangling symlink", "directory", "fifo"])
def test_a_lock_file_that_is_not_a_regular_file_is_refused_untouched(tmp_path, kind):
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock_path = workdir / workdir_lock.LOCK_NAME
  target = tmp_path / "precious.txt"
  if kind == "symlink to a file":
    target.write_text("keep me\n")
    lock_path.symlink_to(target)
  elif kind == "dangling symlink":
    lock_path.symlink_to(target)
  elif kind == "directory":
    lock_path.mkdir()
  else:
    os.mkfifo(lock_path)
  before = _ltree(tmp_path)
  for attempt in (lambda: workdir_lock.raise_if_held(str(workdir)),
                  lambda: workdir_lock.WorkdirLock(str(workdir)).acquire()):
    with pytest.raises(workdir_lock.LockFileError, match="not the regular file") as e:
      attempt()
    assert "\n" not in str(e.value) and str(lock_path) in str(e.value)
    assert _ltree(tmp_path) == before
  if kind == "symlink to a file":
    assert target.read_text() == "keep me\n"
  else:
    assert not target.exists()


def test_command_line_refuses_a_symlinked_lock_file_in_one_line(tmp_path):
  from conftest import run_main
  workdir = tmp_path / "run"
  workdir.mkdir()
  target = tmp_path / "precious.txt"
  target.write_text("keep me\n")
  (workdir / workdir_lock.LOCK_NAME).symlink_to(target)
  before = _ltree(tmp_path)
  result = run_main("--config=configs/test.py", f"--workdir={workdir}", timeout=300)
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
  assert lines[0].startswith("error: ") and "is a symlink" in lines[0]
  assert _ltree(tmp_path) == before and target.read_text() == "keep me\n"
