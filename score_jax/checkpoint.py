"""Checkpoints with Orbax: the only module that touches Orbax.

A checkpoint holds four items: `state` (the whole train state: step, params, optimizer state,
EMA params, and for adversarial runs the discriminator and its spectral-norm vectors), `data`
(the input pipeline's iterator state, JSON), `config` (the run's config, JSON) and `digest`
(JSON: a SHA-256 of every state leaf's bytes with its path, dtype and shape, and of the two JSON
items, plus a SHA-256 over the digest itself). Keys are never saved: they are derived from the
seed and the step.

Writers and readers are built apart. `create_writer` (training, under the workdir lock of
`score_jax.workdir_lock`) creates the directory, rotates old steps and cleans up temporary
directories left by a killed writer. `open_reader` (sampling, evaluation, notebooks) is read-only:
it never creates, deletes or renames anything under `checkpoints/`, so it can poll a directory
while a trainer writes into it. Saves are asynchronous and atomic (Orbax writes to
`<step>.orbax-checkpoint-tmp-*` and renames it when complete), so readers only see finalized
steps and a run killed at any moment, even mid-save, resumes from the last complete checkpoint.

The digest is written in the same atomic step as the arrays and checked on every restore. A step
that fails to read or to verify is damaged: `restore_newest` reports it in one line and falls back
to the newest intact step; a writer also moves it into `checkpoints/damaged/` (never deletes it),
a reader only skips it. A step without a digest is unverified, hence damaged, unless the caller
passes `allow_undigested` (checkpoints written before digests existed); a directory where no step
has one is refused before anything is moved. A state with a non-finite float leaf is never saved
(`NonFiniteStateError`), and one found on disk is damaged.

Rotation (`keep`) renames an old step into `checkpoints/rotated/` in one step and deletes it there
on the next save, so a reader never sees a half-deleted step. A reader whose step disappears while
it reads (its directory is gone) lists the steps again and takes the newest; one asked for an
exact step that is gone gets `MissingStepError`.

Restoring takes the shardings of a target state built on the current mesh, so a checkpoint
written on 8 devices restores onto 1 and vice versa.

A workdir may be a `gs://` URL. Orbax then needs `google-cloud-storage` (it asks the bucket's
layout) and writes arrays through TensorStore's own GCS driver, not through fsspec, so checkpoints
there need Cloud Storage itself, or a server speaking its JSON API that every client is pointed at
(tests/fake_gcs.py); a missing package is reported before anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import traceback
from typing import Any, Callable, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from score_jax import parallel, paths

PyTree = Any
T = TypeVar("T")

ITEMS = ("state", "data", "config", "digest")
DAMAGED_DIR = "damaged"
ROTATED_DIR = "rotated"
_DIGEST_FORMAT = 1
# Listing steps reads each step's metadata after listing the directory; a step rotated away in
# between fails the read, and listing again sees the directory as it is now.
_LIST_RETRIES = 16


def _drop_closed_loop_callbacks(previous: Callable[[Any], None]) -> Callable[[Any], None]:
  """An unraisable-exception hook that drops one harmless asyncio message, passing on the rest.

  Orbax runs each batch of TensorStore reads or writes on a temporary event loop and closes it
  as soon as one operation fails (an unreadable step, a full disk). The operations still in
  flight finish later, and their done-callbacks (`loop.call_soon_threadsafe`) find the loop
  closed: a RuntimeError with no one to raise it to, printed as a traceback per operation. The
  failure itself is raised where it happened, so these say nothing more.
  """

  def hook(info) -> None:
    e = info.exc_value
    frames = [f.name for f in traceback.extract_tb(info.exc_traceback)]
    if (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
        and "call_soon_threadsafe" in frames):
      return
    previous(info)

  return hook


sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored into the requested state."""


class DamagedCheckpointError(CheckpointError):
  """A step whose files cannot be read or do not match the digest saved with them."""


class MissingStepError(CheckpointError):
  """A requested step that is not (or no longer) on disk, e.g. removed by the writer's rotation."""


class UndigestedCheckpointError(DamagedCheckpointError):
  """A step without its digest: unverified, so read only when the caller allows it."""


# How to opt in, for messages: the CLI flag and the library argument.
UNDIGESTED_HINT = ("checkpoints written before digests existed are read, unverified, with "
                   "--allow_undigested_checkpoints (allow_undigested=True)")


class NonFiniteStateError(RuntimeError):
  """A state with non-finite values, which is never saved."""


def checkpoint_dir(workdir: str) -> str:
  return paths.join(workdir, "checkpoints")


def create_writer(workdir: str, *, keep: int = 3, keep_every_steps: int | None = None,
                  async_save: bool = True) -> ocp.CheckpointManager:
  """The training run's manager for `<workdir>/checkpoints`.

  It keeps the last `keep` steps plus every `keep_every_steps`, creates the directory and removes
  the temporary directories of an unfinished save. Only the holder of the workdir lock may build
  one.
  """
  if keep < 1:
    raise ValueError(f"training.keep_checkpoints={keep} would delete every checkpoint; use >= 1")
  paths.check_url_support(workdir, checkpoints=True)
  # Rotation renames a step out of the listing in one step (into ROTATED_DIR, emptied on the
  # next save) rather than deleting its files one by one, so a reader never meets a step half
  # deleted that it would take for damaged. Cloud storage has no rename: there Orbax deletes.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, keep_period=keep_every_steps, create=True,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
      todelete_subdir=None if paths.is_url(workdir) else ROTATED_DIR)
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)
  _purge_rotated(manager)
  return manager


def _purge_rotated(manager: ocp.CheckpointManager, *, idle: bool = False) -> None:
  """Deletes the steps rotation moved into ROTATED_DIR (gone from every reader's listing).

  `idle`: no save is in flight, so ROTATED_DIR itself goes too (a save's rotation recreates it).
  """
  root = paths.join(manager.directory, ROTATED_DIR)
  if paths.is_url(root) or not os.path.isdir(root):
    return
  for name in os.listdir(root):
    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
  if idle:
    # OSError when not empty: another host's rotation of a shared directory refilled it.
    with contextlib.suppress(OSError):
      os.rmdir(root)


def damaged_steps(workdir: str) -> list[str]:
  """The names of the steps moved into `checkpoints/damaged/` (by a writer that found them
  damaged), sorted."""
  root = paths.join(checkpoint_dir(workdir), DAMAGED_DIR)
  return sorted(p.name for p in paths.as_path(root).iterdir()) if paths.isdir(root) else []


class _ReadOnlyNotice(logging.Filter):
  """Drops Orbax's warning that a manager is read only: readers are read only by design, and the
  line would precede every reader's output."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_ReadOnlyNotice())


def open_reader(workdir: str) -> ocp.CheckpointManager:
  """A read-only manager for `<workdir>/checkpoints` that works while a trainer writes there.

  It never creates, deletes or renames anything (no temporary-directory cleanup, no rotation).

  Raises:
    CheckpointError: the directory does not exist or holds no finalized step.
    paths.CloudStorageError: a `gs://` workdir without the packages Orbax needs there.
  """
  paths.check_url_support(workdir, checkpoints=True)
  directory = checkpoint_dir(workdir)
  if not paths.isdir(directory):
    raise CheckpointError(f"no checkpoint in {directory} (the directory does not exist); train "
                          "first (python main.py --workdir=...) or pass the run's --workdir")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                         cleanup_tmp_directories=False,
                                         enable_async_checkpointing=False)
  for attempt in range(_LIST_RETRIES):
    try:
      manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)
      break
    except FileNotFoundError as e:
      if attempt == _LIST_RETRIES - 1:  # not a rotation: the directory itself went away
        raise CheckpointError(f"cannot list the checkpoints in {directory} ({e.strerror}: "
                              f"{e.filename}); pass the run's --workdir") from None
  if not manager.all_steps():
    manager.close()
    raise CheckpointError(f"no checkpoint in {directory}; train first "
                          "(python main.py --workdir=...) or pass the run's --workdir")
  return manager


# ------------------------------------------------------------------------------------ digests


def _host(x) -> np.ndarray:
  """One host copy of a leaf (a replicated array's local copy; no cross-host gather)."""
  if isinstance(x, jax.Array) and x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _leaf_digest(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _json_digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _leaves(state: PyTree) -> list[tuple[str, Any]]:
  return [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]]


def nonfinite_leaves(state: PyTree) -> list[str]:
  """The paths of the float leaves of `state` holding a NaN or an infinity."""
  bad = []
  for path, leaf in _leaves(state):
    a = _host(leaf)
    if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
      bad.append(path)
  return bad


def _shown(leaf_paths: list[str]) -> str:
  more = len(leaf_paths) - 3
  return ", ".join(leaf_paths[:3]) + (f" and {more} more" if more > 0 else "")


def _state_entries(state: PyTree) -> list[list]:
  entries = []
  for path, leaf in _leaves(state):
    a = _host(leaf)
    entries.append([path, str(a.dtype), list(a.shape), _leaf_digest(a)])
  return entries


def _seal(body: dict) -> dict:
  return {**body, "self": _json_digest(body)}


def make_digest(state: PyTree, data_state: dict, config: dict) -> dict:
  """The digest saved with a step: one entry `[path, dtype, shape, sha256]` per state leaf."""
  return _seal({"format": _DIGEST_FORMAT, "state": _state_entries(state),
                "data": _json_digest(data_state), "config": _json_digest(config)})


# ----------------------------------------------------------------------------------- saving


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, *, data_state: dict,
         config_json: str) -> None:
  """Starts saving `state` at `step` (asynchronously when the manager is async).

  The state is checked and digested on the host first; the digest is part of the same atomic save.

  Raises:
    NonFiniteStateError: a float leaf holds a NaN or an infinity; nothing is written.
  """
  bad = nonfinite_leaves(state)
  if bad:
    raise NonFiniteStateError(f"the state at step {step} is non-finite ({_shown(bad)}); it was "
                              "not saved")
  config = json.loads(config_json)
  digest = make_digest(state, data_state, config)
  _purge_rotated(manager)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(config),
      digest=ocp.args.JsonSave(digest)), force=True)


def latest_step(manager: ocp.CheckpointManager) -> int | None:
  return manager.latest_step()


def all_steps(manager: ocp.CheckpointManager) -> list[int]:
  return sorted(manager.all_steps())


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until pending asynchronous saves are complete."""
  manager.wait_until_finished()
  _purge_rotated(manager, idle=True)


# -------------------------------------------------------------------------------- restoring


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
  return paths.join(manager.directory, str(step))


def _damaged(manager, step: int, what: str,
             e: BaseException | None = None) -> DamagedCheckpointError:
  why = "" if e is None else f" ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})"
  return DamagedCheckpointError(f"checkpoint {step} in {manager.directory} is damaged: {what}{why}")


def _restore_json(manager, step: int, item: str):
  if not paths.isdir(paths.join(_step_path(manager, step), item)):
    return None
  try:
    return manager.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.JsonRestore()}))[item]
  except Exception as e:  # Orbax and its file layers raise many types for one unreadable file.
    raise _damaged(manager, step, f"its {item} item cannot be read", e) from None


def _has_digest(manager, step: int) -> bool:
  return paths.isdir(paths.join(_step_path(manager, step), "digest"))


def _digest(manager, step: int, allow_undigested: bool) -> dict | None:
  """The verified digest of `step`; None for a step without one, only with `allow_undigested`.

  A missing digest is indistinguishable from a removed one, so a step without it is unverified:
  it is read only on the caller's explicit choice (checkpoints written before digests existed).
  """
  if not _has_digest(manager, step):
    if not paths.isdir(paths.join(_step_path(manager, step), "state")):
      raise _damaged(manager, step, "it has no state")
    if allow_undigested:
      return None
    raise UndigestedCheckpointError(
        f"checkpoint {step} in {manager.directory} is unverified: it has no digest/ (written "
        f"before digests existed, or the digest was removed); {UNDIGESTED_HINT}")
  d = _restore_json(manager, step, "digest")
  body = {k: v for k, v in d.items() if k != "self"} if isinstance(d, dict) else None
  if body is None or d.get("self") != _json_digest(body) or body.get("format") != _DIGEST_FORMAT:
    raise _damaged(manager, step, "its digest does not verify")
  return body


def restore_config(manager: ocp.CheckpointManager, step: int, *,
                   allow_undigested: bool = False) -> dict:
  """The config dict stored with checkpoint `step`, checked against its digest.

  `allow_undigested`: read a step without a digest, unverified (see `restore`).
  """
  digest = _digest(manager, step, allow_undigested)
  config = _restore_json(manager, step, "config")
  if not isinstance(config, dict):
    raise _damaged(manager, step, "its config is missing")
  if digest is not None and _json_digest(config) != digest["config"]:
    raise _damaged(manager, step, "its config does not match its digest")
  return config


def restore(manager: ocp.CheckpointManager, step: int, target: PyTree, *,
            allow_undigested: bool = False) -> tuple[PyTree, dict]:
  """Restores `(state, data_state)` at `step` with the structure and shardings of `target`.

  Args:
    manager: a writer's or a reader's manager.
    step: the step to read.
    target: a state (or its abstract shapes) with the shardings to restore onto.
    allow_undigested: read a step without a digest, unverified; only for checkpoints written
      before digests existed (otherwise such a step is `UndigestedCheckpointError`, damaged).

  Raises:
    CheckpointError: the step holds another model's state.
    DamagedCheckpointError: a file cannot be read, or a value differs from the saved digest, or
      the step has no digest and `allow_undigested` is False.
  """
  digest = _digest(manager, step, allow_undigested)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  if digest is not None:
    want = [[p, str(np.dtype(a.dtype)), list(a.shape)] for p, a in _leaves(abstract)]
    have = [e[:3] for e in digest["state"]]
    if want != have:
      diff = next((f"{w} vs saved {h}" for w, h in zip(want, have) if w != h),
                  f"{len(want)} leaves vs saved {len(have)}")
      raise CheckpointError(f"checkpoint {step} in {manager.directory} does not match this model "
                            f"({diff}); use another --workdir")
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
  except Exception as e:  # Orbax and its file layers raise many types for one unreadable file.
    if digest is not None:
      raise _damaged(manager, step, "its state cannot be read", e) from None
    if isinstance(e, (ValueError, KeyError, TypeError)):
      raise CheckpointError(
          f"checkpoint {step} in {manager.directory} does not match this model "
          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); use another --workdir") from None
    raise _damaged(manager, step, "its state cannot be read", e) from None
  state, data_state = restored["state"], restored["data"]
  if digest is not None:
    got = _state_entries(state)
    bad = [g[0] for g, e in zip(got, digest["state"]) if g[3] != e[3]]
    if bad:
      raise _damaged(manager, step, f"{len(bad)} array(s) differ from the saved digest "
                     f"(first: {bad[0]})")
    if _json_digest(data_state) != digest["data"]:
      raise _damaged(manager, step, "its data-iterator state does not match its digest")
  bad = nonfinite_leaves(state)
  if bad:
    # A digest proves the bytes are the ones saved, not that saving them was right: `save`
    # refuses non-finite states, so one on disk (crafted, or older than that guard) is never
    # resumed, sampled from or named the last good checkpoint.
    raise _damaged(manager, step, f"it holds non-finite values ({_shown(bad)}), which training "
                   "never saves")
  return state, data_state


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Renames a damaged step into `checkpoints/damaged/` (a free name) and returns the new path."""
  root = paths.join(manager.directory, DAMAGED_DIR)
  paths.makedirs(root)
  dest, n = paths.join(root, str(step)), 1
  while paths.exists(dest):
    dest, n = paths.join(root, f"{step}.{n}"), n + 1
  paths.as_path(_step_path(manager, step)).rename(dest)
  manager.reload()
  return dest


def _relisted(manager: ocp.CheckpointManager) -> list[int]:
  """The finalized steps on disk now, re-read (a reader's list goes stale as the writer saves)."""
  for _ in range(_LIST_RETRIES):
    try:
      manager.reload()
      return all_steps(manager)
    except FileNotFoundError:
      continue  # a step rotated away between the directory listing and its metadata read
  manager.reload()
  return all_steps(manager)


def restore_newest(manager: ocp.CheckpointManager, restore_fn: Callable[[int], T], *,
                   move_damaged: bool, step: int | None = None,
                   allow_undigested: bool = False) -> tuple[int, T] | None:
  """`(step, restore_fn(step))` for the newest step that restores intact, or None for no steps.

  Each damaged step met on the way is reported in one line on stderr; with `move_damaged` (a
  writer only) it is renamed into `checkpoints/damaged/`, never deleted. A step that the writer's
  rotation removes while it is read (its directory is gone) is not damaged: the steps are listed
  again and the newest one is tried, so a reader polling a training run always gets a step.

  Args:
    manager: a writer's or a reader's manager.
    restore_fn: reads one step (e.g. `restore_config` then `restore`); raises
      `DamagedCheckpointError` for a damaged step.
    move_damaged: rename damaged steps aside (only the workdir's lock holder may).
    step: restore exactly this step (no fallback); None for the newest intact one.
    allow_undigested: the caller reads steps without a digest (`restore_fn` passes it on);
      without it, a directory where no step has a digest is refused before anything is moved.

  Raises:
    MissingStepError: `step` is not there, or was rotated away while it was read.
    UndigestedCheckpointError: no step has a digest and `allow_undigested` is False.
    CheckpointError: `step` is damaged, or every step is damaged.
  """
  if step is not None:
    steps = all_steps(manager)
    if step not in steps:
      raise MissingStepError(f"no checkpoint at step {step} in {manager.directory}; available "
                             f"steps: {steps}")
    try:
      return step, restore_fn(step)
    except Exception:
      if paths.isdir(_step_path(manager, step)):
        raise
    raise MissingStepError(f"checkpoint {step} in {manager.directory} was removed while it was "
                           "read (the writer keeps only training.keep_checkpoints steps)") from None
  steps = all_steps(manager)
  present = [s for s in steps if paths.isdir(_step_path(manager, s))]
  if present and not allow_undigested and not any(_has_digest(manager, s) for s in present):
    # Before moving anything: a whole run without digests is an old run or a tampered one,
    # and either way the choice is the user's.
    raise UndigestedCheckpointError(
        f"no checkpoint in {manager.directory} has a digest (steps {present}); they are "
        f"unverified and were left in place; {UNDIGESTED_HINT}")
  damaged: list[int] = []
  gone: set[int] = set()
  reasons: list[str] = []
  skipped: list[str] = []
  while True:
    candidates = [s for s in steps if s not in damaged and s not in gone]
    if not candidates:
      break
    s = candidates[-1]
    error, result = None, None
    try:
      result = restore_fn(s)
    except Exception as e:
      if paths.isdir(_step_path(manager, s)) and not isinstance(e, DamagedCheckpointError):
        raise
      error = e
    # Every process reads and verifies the step itself; a step is used only when it verified on
    # all of them, so they all resume from the same one.
    if parallel.all_processes(error is None):
      if parallel.is_main_process():
        for line in skipped:
          print(line, file=sys.stderr)
      return s, result
    # Rotated away by the writer while this reader read it: the newest step now is newer. Asked
    # of process 0 alone, before it moves anything aside, so every process takes the same branch.
    if parallel.from_main(lambda: not paths.isdir(_step_path(manager, s))):
      gone.add(s)
      steps = _relisted(manager)
      continue
    if error is None:
      error = _damaged(manager, s, "it failed to verify on another process")
    damaged.append(s)
    reasons.append(str(error))
    if move_damaged:
      # Process 0 moves it; the others wait for the move, then see the new layout.
      dest = _move_aside(manager, s) if parallel.is_main_process() else None
      parallel.sync(f"score_jax_moved_damaged_{s}")
      if dest is None:
        manager.reload()
      else:
        print(f"warning: {error}; moved to {dest}, using the next older step", file=sys.stderr)
    else:
      # A reader changes nothing on disk: its skips are reported once it has a step, and when
      # none is left the one error line carries the newest step's reason.
      skipped.append(f"warning: {error}; skipped, using the next older step")
  if damaged:
    raise CheckpointError(f"every checkpoint in {manager.directory} is damaged (steps "
                          f"{sorted(damaged)}; the newest: {reasons[0]}); restore a copy or start "
                          "a new --workdir")
  return None
