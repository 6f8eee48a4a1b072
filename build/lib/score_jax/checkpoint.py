"""Checkpoints with Orbax: the only module that touches Orbax.

A checkpoint holds three items: `state` (the whole train state: step, params, optimizer state,
EMA params, and for adversarial runs the discriminator and its spectral-norm vectors), `data`
(the input pipeline's iterator state, JSON) and `config` (the run's config, JSON). Keys are never
saved: they are derived from the seed and the step.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it), so a run
killed at any moment, even mid-save, resumes from the last complete checkpoint. Restoring takes
the shardings of a target state built on the current mesh, so a checkpoint written on 8 devices
restores onto 1 and vice versa.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored into the requested state."""


def create_manager(workdir: str, *, keep: int = 3, keep_every_steps: int | None = None,
                   async_save: bool = True) -> ocp.CheckpointManager:
  """A manager for `<workdir>/checkpoints` keeping the last `keep` plus every `keep_every_steps`."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, keep_period=keep_every_steps, create=True,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "data", "config"))


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, *, data_state: dict,
         config_json: str) -> None:
  """Starts saving `state` at `step` (asynchronously when the manager is async)."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(json.loads(config_json))), force=True)


def latest_step(manager: ocp.CheckpointManager) -> int | None:
  return manager.latest_step()


def all_steps(manager: ocp.CheckpointManager) -> list[int]:
  return sorted(manager.all_steps())


def restore_config(manager: ocp.CheckpointManager, step: int) -> dict:
  """The config dict stored with checkpoint `step`."""
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def restore(manager: ocp.CheckpointManager, step: int, target: PyTree) -> tuple[PyTree, dict]:
  """Restores `(state, data_state)` at `step` with the structure and shardings of `target`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
        f"checkpoint {step} in {manager.directory} does not match this model "
        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); use another --workdir") from None
  return restored["state"], restored["data"]


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until pending asynchronous saves are complete."""
  manager.wait_until_finished()
