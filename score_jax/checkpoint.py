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
a reader only skips it. A state with a non-finite float leaf is never saved
(`NonFiniteStateError`).

Restoring takes the shardings of a target state built on the current mesh, so a checkpoint
written on 8 devices restores onto 1 and vice versa.

A workdir may be a `gs://` URL. Orbax then needs `google-cloud-storage` (it asks the bucket's
layout) and writes arrays through TensorStore's own GCS driver, not through fsspec, so checkpoints
there need Cloud Storage itself, or a server speaking its JSON API that every client is pointed at
(tests/fake_gcs.py); a missing package is reported before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any, Callable, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from score_jax import paths

PyTree = Any
T = TypeVar("T")

ITEMS = ("state", "data", "config", "digest")
DAMAGED_DIR = "damaged"
_DIGEST_FORMAT = 1


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored into the requested state."""


class DamagedCheckpointError(CheckpointError):
  """A step whose files cannot be read or do not match the digest saved with them."""


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
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, keep_period=keep_every_steps, create=True,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


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
  manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)
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
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise NonFiniteStateError(f"the state at step {step} is non-finite ({shown}); it was not "
                              "saved")
  config = json.loads(config_json)
  digest = make_digest(state, data_state, config)
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


def _digest(manager, step: int) -> dict | None:
  """The verified digest of `step`, or None for a step saved before digests existed."""
  if not paths.isdir(paths.join(_step_path(manager, step), "digest")):
    if paths.isdir(paths.join(_step_path(manager, step), "state")):
      return None
    raise _damaged(manager, step, "it has no state")
  d = _restore_json(manager, step, "digest")
  body = {k: v for k, v in d.items() if k != "self"} if isinstance(d, dict) else None
  if body is None or d.get("self") != _json_digest(body) or body.get("format") != _DIGEST_FORMAT:
    raise _damaged(manager, step, "its digest does not verify")
  return body


def restore_config(manager: ocp.CheckpointManager, step: int) -> dict:
  """The config dict stored with checkpoint `step`, checked against its digest."""
  digest = _digest(manager, step)
  config = _restore_json(manager, step, "config")
  if not isinstance(config, dict):
    raise _damaged(manager, step, "its config is missing")
  if digest is not None and _json_digest(config) != digest["config"]:
    raise _damaged(manager, step, "its config does not match its digest")
  return config


def restore(manager: ocp.CheckpointManager, step: int, target: PyTree) -> tuple[PyTree, dict]:
  """Restores `(state, data_state)` at `step` with the structure and shardings of `target`.

  Raises:
    CheckpointError: the step holds another model's state.
    DamagedCheckpointError: a file cannot be read, or a value differs from the saved digest.
  """
  digest = _digest(manager, step)
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


def restore_newest(manager: ocp.CheckpointManager, restore_fn: Callable[[int], T], *,
                   move_damaged: bool, step: int | None = None) -> tuple[int, T] | None:
  """`(step, restore_fn(step))` for the newest step that restores intact, or None for no steps.

  Each damaged step met on the way is reported in one line on stderr; with `move_damaged` (a
  writer only) it is renamed into `checkpoints/damaged/`, never deleted. A step removed by the
  writer's rotation while a reader reads it is skipped silently.

  Args:
    manager: a writer's or a reader's manager.
    restore_fn: reads one step (e.g. `restore_config` then `restore`); raises
      `DamagedCheckpointError` for a damaged step.
    move_damaged: rename damaged steps aside (only the workdir's lock holder may).
    step: restore exactly this step (no fallback); None for the newest intact one.

  Raises:
    CheckpointError: `step` is not there or is damaged, or every step is damaged.
  """
  steps = all_steps(manager)
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"no checkpoint at step {step} in {manager.directory}; available "
                            f"steps: {steps}")
    return step, restore_fn(step)
  from score_jax import parallel
  damaged = []
  for s in reversed(steps):
    error = None
    try:
      result = restore_fn(s)
    except DamagedCheckpointError as e:
      error = e
    # Every process reads and verifies the step itself; a step is used only when it verified on
    # all of them, so they all resume from the same one.
    if parallel.all_processes(error is None):
      return s, result
    if error is None:
      error = _damaged(manager, s, "it failed to verify on another process")
    if not paths.isdir(_step_path(manager, s)):
      continue  # rotated away by the writer while this reader read it
    damaged.append(s)
    if move_damaged:
      # Process 0 moves it; the others wait for the move, then see the new layout.
      dest = _move_aside(manager, s) if parallel.is_main_process() else None
      parallel.sync(f"score_jax_moved_damaged_{s}")
      if dest is None:
        manager.reload()
      else:
        print(f"warning: {error}; moved to {dest}, using the next older step", file=sys.stderr)
    elif parallel.is_main_process():
      print(f"warning: {error}; skipped, using the next older step", file=sys.stderr)
  if damaged:
    raise CheckpointError(f"every checkpoint in {manager.directory} is damaged (steps "
                          f"{sorted(damaged)}); restore a copy or start a new --workdir")
  return None
