"""One writer per workdir: an exclusive OS lock on `<workdir>/train.lock`.

The lock is `fcntl.flock` on the file, so the kernel releases it when the holder exits, crashed or
killed included; the file's content (holder, host, pid, start time, JSON) only says who holds it.
A second writer fails with `WorkdirLockedError` before it creates, deletes or renames anything.
The file is opened without following symlinks and must be a regular file (`LockFileError`
otherwise, with the path left untouched): the holder's info is written into it.
The file is never deleted while the workdir holds anything else, since a process that opened the
old file would then lock a different one than a later process.

On cloud storage (`gs://...` workdirs) there are no OS locks: the lock is an object written with
its holder's info, checked before the run and deleted when the holder exits cleanly. It stops a
second writer started while the first runs, but the check and the write are two requests, so two
writers started at the same moment can both pass; and a holder that dies without cleaning up
leaves the object, which a later run on the same host takes over when the recorded pid is gone,
while a run on another host (after a preemption, say) is refused until the object is deleted.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import stat
import sys

from score_jax import paths

LOCK_NAME = "train.lock"


class WorkdirLockedError(ValueError):
  """Another process holds the workdir's writer lock."""


class LockFileError(ValueError):
  """The workdir's lock file is a symlink, a directory or another non-regular file."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read_holder(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 4096).decode() or "{}")
  except (OSError, ValueError):
    return {}


def raise_if_held(workdir: str) -> None:
  """Raises `WorkdirLockedError` if a writer holds `workdir` now; creates nothing.

  An early check (a command line can refuse before it makes anything); the writer still takes the
  lock itself.
  """
  lock = WorkdirLock(workdir)
  if os.path.lexists(lock.path) if paths.is_local(lock.path) else paths.exists(lock.path):
    lock._created_workdir = False
    lock.acquire(quiet=True)
    lock.release(clear=False)


class WorkdirLock:
  """The exclusive writer lock of one workdir; a context manager.

  Args:
    workdir: the run's directory (created when absent, once the lock is free).
    holder: a short description of the writer, e.g. "train".
  """

  def __init__(self, workdir: str, holder: str = "train"):
    self.workdir = paths.as_str(workdir)
    self.path = paths.join(self.workdir, LOCK_NAME)
    self._object = paths.is_url(self.workdir)
    self.holder = holder
    self._fd: int | None = None
    self._created_workdir = False

  def acquire(self, *, quiet: bool = False) -> "WorkdirLock":
    """Takes the lock or raises `WorkdirLockedError` having changed nothing on disk.

    Args:
      quiet: take it without recording this process as the holder (a probe).
    """
    if self._object:
      return self._acquire_object(quiet=quiet)
    if os.path.lexists(self.path):
      # Probe the existing file without O_CREAT: a refused writer must not create anything.
      fd = self._open(create=False)
    else:
      self._created_workdir = not os.path.isdir(self.workdir)
      os.makedirs(self.workdir, exist_ok=True)
      fd = self._open(create=True)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      info = _read_holder(fd)
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise WorkdirLockedError(self._refusal(info)) from None
    self._fd = fd
    if quiet:
      return self
    previous = _read_holder(fd)
    if previous.get("pid"):
      print(f"note: the previous writer of {self.workdir} (pid {previous['pid']} on "
            f"{previous.get('host')}, started {previous.get('start')}) did not exit cleanly; "
            "taking over", file=sys.stderr)
    info = self._info()
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)
    return self

  def _open(self, *, create: bool) -> int:
    """The lock file, opened read-write; never through a symlink, and only a regular file.

    The holder's info is written into it and truncated away at the end, so a symlink planted
    in a workdir received from someone else would make this process overwrite the link's target.
    """
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_CREAT if create else 0)
    try:
      fd = os.open(self.path, flags, 0o644)
    except OSError as e:
      if e.errno in (errno.ELOOP, errno.EISDIR):
        raise LockFileError(self._not_regular("a symlink" if e.errno == errno.ELOOP else
                                              "a directory")) from None
      raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      os.close(fd)
      raise LockFileError(self._not_regular("a special file"))
    return fd

  def _not_regular(self, what: str) -> str:
    return (f"{self.path} is {what}, not the regular file the workdir's writer lock must be; "
            "it was left untouched. Remove it (or use another --workdir) and rerun")

  def _info(self) -> dict:
    return {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
            "start": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

  def _acquire_object(self, *, quiet: bool) -> "WorkdirLock":
    """`acquire` for a workdir on object storage: a lock object holding the holder's info."""
    lock = paths.as_path(self.path)
    info = {}
    if lock.exists():
      try:
        info = json.loads(lock.read_text() or "{}")
      except ValueError:
        info = {}
    pid = info.get("pid")
    if pid:
      same_host_dead = (info.get("host") == socket.gethostname() and isinstance(pid, int)
                        and not _pid_alive(pid))
      if not same_host_dead:
        raise WorkdirLockedError(
            self._refusal(info) + f"; if that writer is gone, delete {self.path} and rerun")
      if not quiet:
        print(f"note: the previous writer of {self.workdir} (pid {pid} on {info.get('host')}, "
              f"started {info.get('start')}) did not exit cleanly; taking over", file=sys.stderr)
    if quiet:
      return self
    paths.write_text(self.path, json.dumps(self._info()))
    self._fd = -1
    return self

  def _refusal(self, info: dict) -> str:
    who = (f"{info.get('holder', 'a writer')} (pid {info.get('pid', '?')} on "
           f"{info.get('host', '?')}, started {info.get('start', '?')})")
    pid = info.get("pid")
    if info.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
      return (f"--workdir={self.workdir} is locked by {who}, which is no longer running, yet "
              f"{self.path} is still held (by a process it started?); find the holder with "
              f"`fuser -v {self.path}` and end it, then rerun")
    return (f"--workdir={self.workdir} is in use by {who}; wait for it to finish, stop it, or "
            "use another --workdir (sampling and evaluation may read it meanwhile)")

  def release(self, *, clear: bool = True) -> None:
    """Clears the holder info (unless not `clear`) and unlocks; a workdir this lock created and
    left empty goes."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    if self._object:
      if clear:
        paths.as_path(self.path).unlink(missing_ok=True)
      return
    if clear:
      os.ftruncate(fd, 0)
    if self._created_workdir and os.listdir(self.workdir) == [LOCK_NAME]:
      os.remove(self.path)
      os.rmdir(self.workdir)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
