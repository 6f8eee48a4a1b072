"""Slim export of a trained model: one msgpack file with the EMA parameters and the config.

A workdir holds the whole train state (optimizer moments, every EMA slot, the data-pipeline
state); to hand a model to someone else only the sampling parameters and the config that
describes the network, the noise ladder and the sampler are needed. `write` stores exactly those,
serialized with `flax.serialization.msgpack_serialize` in two layers:

    {"format": "score_jax.export", "version": 2, "sha256": <hex digest of body>, "body": <bytes>}
    body = {"config": <config JSON>, "step": int, "params": <the first EMA tree, float arrays>}

The digest covers every byte of the body and is checked before the body is parsed, so a damaged
file is refused rather than loaded with changed parameters; every field is then checked for its
type, and parameters that are not all finite are refused at export and at load. Version 1 files
(no digest) are refused with the command that re-exports them.

Why msgpack and not safetensors: both are pickle-free. What safetensors adds is a tensor file
PyTorch can open, but this tree is in Flax's layout (HWIO kernels, Flax module names) that only
score_jax's own networks consume, so that reach would be nominal; msgpack comes with flax (no new
dependency), keeps the tree's nesting, and the digest and the config sit in the header here just
as they would in safetensors' string metadata.

`write` takes the config as the opaque JSON text it stores (`Experiment.config_json`).
`load(path_or_url)` returns `(config, state)` like `score_jax.load_checkpoint`, the config read by
`stored_config` and checked by building its `Experiment`, where `state` carries `params` and
`ema_params`, so `make_sampler(config, state)` samples from it exactly as from the workdir it came
from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import urllib.parse
import urllib.request
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from score_jax import experiment, paths, stored_config

FORMAT = "score_jax.export"
VERSION = 2
_REEXPORT = "re-export it from its workdir: python main.py --mode=export --workdir=<run>"


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


def write(path: str | os.PathLike, config_json: str, state_or_params: Any, *,
          step: int | None = None) -> None:
  """Writes the sampling parameters and the config to one file at `path` (atomically).

  Args:
    path: the file to write.
    config_json: the run's config as JSON text (`Experiment.config_json`), stored as is.
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
  params = _plain(jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params))
  bad = _non_finite(params)
  if bad:
    raise ExportError(f"refusing to export non-finite parameters ({', '.join(bad[:3])}"
                      f"{', ...' if len(bad) > 3 else ''}); export an earlier checkpoint "
                      "(score_jax.export.write_workdir(workdir, path, step=N))")
  body = serialization.msgpack_serialize(
      {"config": config_json, "step": int(step or 0), "params": params})
  data = serialization.msgpack_serialize(
      {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(body).hexdigest(),
       "body": body})
  paths.write_bytes(path, data)


def _non_finite(params: dict) -> list[str]:
  """Paths of the leaves that hold a NaN or an infinity."""
  return ["/".join(k) for k, v in traverse_util.flatten_dict(params).items()
          if np.issubdtype(np.asarray(v).dtype, np.inexact) and not np.isfinite(v).all()]


def write_workdir(workdir: str, path: str | os.PathLike, *, step: int | None = None) -> None:
  """Exports the checkpoint at `step` (latest if None) of `workdir` to `path`."""
  config, state = experiment.load_checkpoint(workdir, step)
  write(path, experiment.build(config).config_json, state)


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
  if not paths.isfile(source):
    raise ExportError(f"{source}: no such export file")
  try:
    with paths.open_file(source, "rb") as f:
      return f.read()
  except OSError as e:
    raise ExportError(f"cannot read {source}: {' '.join(str(e).split())}") from None


def _restore(data: bytes, source: str, what: str) -> dict:
  try:
    payload = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types for corrupt or truncated input
    raise ExportError(f"{source} is not a score_jax export ({what}: {type(e).__name__}); "
                      "write one with score_jax.export.write") from None
  if not isinstance(payload, dict):
    raise ExportError(f"{source} is not a score_jax export ({what} is a "
                      f"{type(payload).__name__}, not a map)")
  return payload


def _verified_body(data: bytes, source: str) -> dict:
  """The body of an export file after its format, version and digest are checked."""
  header = _restore(data, source, "header")
  if header.get("format") != FORMAT:
    raise ExportError(f"{source} is not a score_jax export (no format tag '{FORMAT}')")
  version = header.get("version")
  if version == 1:
    raise ExportError(f"{source} is export version 1, which carries no digest; {_REEXPORT}")
  if version != VERSION:
    raise ExportError(f"{source} is export version {version!r}; this score_jax reads version "
                      f"{VERSION}")
  digest, body = header.get("sha256"), header.get("body")
  if set(header) != {"format", "version", "sha256", "body"} or not isinstance(digest, str) or (
      not isinstance(body, bytes)):
    raise ExportError(f"{source}: damaged export header (fields {sorted(map(str, header))}); "
                      f"{_REEXPORT}")
  if hashlib.sha256(body).hexdigest() != digest:
    raise ExportError(f"{source}: damaged export file (its contents do not match their sha256 "
                      f"digest); {_REEXPORT}")
  payload = _restore(body, source, "body")
  if set(payload) != {"config", "step", "params"}:
    raise ExportError(f"{source}: export body has fields {sorted(map(str, payload))}, expected "
                      f"config, params, step; {_REEXPORT}")
  return payload


def _checked_params(params: Any, source: str) -> dict:
  """The parameter tree after checking it is a map of finite float arrays."""
  if not isinstance(params, dict) or not params:
    raise ExportError(f"{source}: 'params' is not a non-empty map of arrays")
  flat = traverse_util.flatten_dict(params)
  for key, leaf in flat.items():
    if not (isinstance(leaf, np.ndarray) and np.issubdtype(leaf.dtype, np.floating)):
      raise ExportError(f"{source}: parameter {'/'.join(map(str, key))} is a "
                        f"{type(leaf).__name__}, not a float array")
  bad = _non_finite(params)
  if bad:
    raise ExportError(f"{source}: {len(bad)} parameter arrays are not finite ({', '.join(bad[:3])})"
                      "; it cannot sample")
  return params


def load(path_or_url: str | os.PathLike) -> tuple[Any, ExportedState]:
  """Reads an export file (a path, a gs:// URL, or an http(s)/file URL) written by `write`.

  Returns:
    `(config, state)`: the stored config over the schema of configs/default.py
    (`stored_config.config_from_dict`), and an `ExportedState` whose `ema_params[0]` is the
    exported tree (arrays on the default device), checked against the parameter shapes of the
    network of `experiment.build(config)`.

  Raises:
    ExportError: the file is unreadable, not an export, of another version, damaged (digest
      mismatch), has a missing or mistyped field, holds non-finite parameters, or its parameters do
      not fit the network its config describes.
  """
  source = os.fspath(path_or_url)
  payload = _verified_body(_read_bytes(source), source)
  step = payload["step"]
  if not isinstance(step, int) or isinstance(step, bool) or step < 0:
    raise ExportError(f"{source}: 'step' is {step!r}, not a non-negative integer")
  if not isinstance(payload["config"], str):
    raise ExportError(f"{source}: 'config' is a {type(payload['config']).__name__}, not JSON text")
  try:
    stored = json.loads(payload["config"])
    if not isinstance(stored, dict):
      raise TypeError(f"a {type(stored).__name__}, not an object")
    config = stored_config.config_from_dict(stored)
  except Exception as e:  # bad JSON, or values the config schema refuses (several types)
    raise ExportError(f"{source}: its config is not a score_jax config ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:160]})") from None
  params = _checked_params(payload["params"], source)
  try:
    exp = experiment.build(config)
    model = exp.model
    x = jnp.zeros((1, *exp.example_shape), jnp.float32)
    want = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)}, x,
                           jnp.ones((1,), jnp.float32))["params"])
  except Exception as e:  # a config that names no buildable network fails in many ways
    raise ExportError(f"{source}: its config does not build a network ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:160]})") from None
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(want).items()}
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params).items()}
  if got != want:
    diff = sorted("/".join(k) for k in set(got) ^ set(want))
    diff += sorted("/".join(k) for k in set(got) & set(want) if got[k] != want[k])
    raise ExportError(f"{source}: its parameters do not fit the network of its config "
                      f"(model.name={exp.model_name!r}; differing: {', '.join(diff[:3])})")
  params = jax.tree.map(jnp.asarray, params)
  return config, ExportedState(params=params, step=step)
