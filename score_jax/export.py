"""Slim export of a trained model: one msgpack file with the EMA parameters and the config.

A workdir holds the whole train state (optimizer moments, every EMA slot, the data-pipeline
state); to hand a model to someone else only the sampling parameters and the config that
describes the network, the noise ladder and the sampler are needed. `write` stores exactly those,
serialized with `flax.serialization.msgpack_serialize`:

    {"format": "score_jax.export", "version": 1, "config": <config JSON>, "step": int,
     "params": <the first EMA parameter tree, float32 arrays>}

`load(path_or_url)` returns `(config, state)` like `score_jax.load_checkpoint`, where `state`
carries `params` and `ema_params`, so `make_sampler(config, state)` samples from it exactly as
from the workdir it came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import urllib.parse
import urllib.request
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import serialization, traverse_util

FORMAT = "score_jax.export"
VERSION = 1


class ExportError(ValueError):
  """An export file that cannot be written or read; one line."""


@dataclasses.dataclass(frozen=True)
class ExportedState:
  """The part of a `TrainState` that sampling reads: one parameter tree, used as the EMA slot."""
  params: Any
  step: int = 0

  @property
  def ema_params(self) -> tuple[Any, ...]:
    return (self.params,)


def write(path: str | os.PathLike, config: ml_collections.ConfigDict, state_or_params: Any, *,
          step: int | None = None) -> None:
  """Writes the sampling parameters and `config` to one file at `path` (atomically).

  Args:
    path: the file to write.
    config: the run's config (stored as JSON).
    state_or_params: a `TrainState` / `AdversarialState` (its first EMA tree is exported) or a
      parameter tree.
    step: the training step recorded in the file; default: the state's step, else 0.
  """
  if hasattr(state_or_params, "ema_params"):
    params = state_or_params.ema_params[0]
    if step is None:
      step = int(jax.device_get(state_or_params.step))
  else:
    params = state_or_params
  params = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
  payload = {"format": FORMAT, "version": VERSION, "config": config.to_json(),
             "step": int(step or 0), "params": _plain(params)}
  data = serialization.msgpack_serialize(payload)
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".export-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_workdir(workdir: str, path: str | os.PathLike, *, step: int | None = None) -> None:
  """Exports the checkpoint at `step` (latest if None) of `workdir` to `path`."""
  from score_jax.experiment import load_checkpoint
  config, state = load_checkpoint(workdir, step)
  write(path, config, state)


def _plain(tree: Any) -> Any:
  """Nested plain dicts (FrozenDicts unfrozen) for msgpack."""
  if hasattr(tree, "items"):
    return {str(k): _plain(v) for k, v in tree.items()}
  return tree


def _read_bytes(path_or_url: str | os.PathLike) -> bytes:
  source = os.fspath(path_or_url)
  scheme = urllib.parse.urlparse(source).scheme
  if scheme in ("http", "https", "file"):
    try:
      with urllib.request.urlopen(source, timeout=120) as response:
        return response.read()
    except OSError as e:
      raise ExportError(f"cannot read {source}: {' '.join(str(e).split())}") from None
  if not os.path.isfile(source):
    raise ExportError(f"{source}: no such export file")
  with open(source, "rb") as f:
    return f.read()


def load(path_or_url: str | os.PathLike) -> tuple[ml_collections.ConfigDict, ExportedState]:
  """Reads an export file (a path, or an http(s)/file URL) written by `write`.

  Returns:
    `(config, state)`: the stored config over the schema of configs/default.py, and an
    `ExportedState` whose `ema_params[0]` is the exported tree (arrays on the default device),
    checked against the parameter shapes of `models.build(config)`.

  Raises:
    ExportError: the file is unreadable, not an export, of another version, or its parameters do
      not fit the network its config describes.
  """
  import jax.numpy as jnp
  from score_jax import models
  from score_jax.experiment import config_from_dict
  from score_jax.experiment import example_shape

  source = os.fspath(path_or_url)
  data = _read_bytes(source)
  try:
    payload = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types for corrupt or truncated input
    raise ExportError(f"{source} is not a score_jax export ({type(e).__name__}); "
                      "write one with score_jax.export.write") from None
  if not isinstance(payload, dict) or payload.get("format") != FORMAT:
    raise ExportError(f"{source} is not a score_jax export (no format tag '{FORMAT}')")
  if payload.get("version") != VERSION:
    raise ExportError(f"{source} is export version {payload.get('version')!r}; this score_jax "
                      f"reads version {VERSION}")
  config = config_from_dict(json.loads(payload["config"]))
  params = payload["params"]
  model = models.build(config)
  x = jnp.zeros((1, *example_shape(config)), jnp.float32)
  want = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)}, x,
                         jnp.ones((1,), jnp.float32))["params"])
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(want).items()}
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params).items()}
  if got != want:
    diff = sorted("/".join(k) for k in set(got) ^ set(want))
    diff += sorted("/".join(k) for k in set(got) & set(want) if got[k] != want[k])
    raise ExportError(f"{source}: its parameters do not fit the network of its config "
                      f"(model.name={config.model.name!r}; differing: {', '.join(diff[:3])})")
  params = jax.tree.map(jnp.asarray, params)
  return config, ExportedState(params=params, step=int(payload.get("step", 0)))
