"""Stored configs: the configs of older checkpoints and exports, and where moved fields went.

A checkpoint (or export file) stores its run's config as JSON. `config_from_dict` reads such a
config onto today's schema (configs/default.py), migrating the older layouts: the single-`step_lr`
sampling group and the flat `model` group. `check_compatible` compares a stored config with the
current one on the fields a checkpoint's state depends on. `moved_field_hint` and
`moved_flag_error` name today's field when a command line still names an old flat model field.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Container

import ml_collections

from score_jax import checkpoint, configs_dir

_DEFAULT_CONFIG = configs_dir() / "default.py"


def _default_config() -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("score_jax_default_config", _DEFAULT_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _migrate_sampling(stored: dict) -> dict:
  """A stored config's `sampling` group in the per-sampler layout.

  Configs stored before the per-sampler sub-groups had one `step_lr` whose meaning depended on
  `method`, `also_cas` and `cas_step_lr`, and one `steps_per_sigma` shared by ALS and PC.
  """
  s = dict(stored.get("sampling") or {})
  if not any(k in s for k in ("step_lr", "steps_per_sigma", "n_sigma", "snr", "also_cas",
                              "cas_step_lr")):
    return stored
  method = s.get("method", "als")
  step_lr, steps = s.pop("step_lr", None), s.pop("steps_per_sigma", None)
  also_cas, cas_step_lr = s.pop("also_cas", None), s.pop("cas_step_lr", None)
  n_sigma, snr = s.pop("n_sigma", None), s.pop("snr", None)
  als = {k: v for k, v in (("step_lr", step_lr), ("steps_per_sigma", steps)) if v is not None}
  cas_lr = step_lr if method == "cas" else (cas_step_lr if cas_step_lr is not None else step_lr)
  cas = {k: v for k, v in (("step_lr", cas_lr), ("n_sigma", n_sigma)) if v is not None}
  pc = {k: v for k, v in (("snr", snr), ("corrector_steps", steps)) if v is not None}
  s.update(als=als, cas=cas, pc=pc)
  if also_cas is not None:
    s["methods"] = [method] + (["cas"] if also_cas and method != "cas" else [])
  return {**stored, "sampling": s}


# The fields of the flat `model` group of older configs and the sub-group field each is now (a
# UNet's `model.ngf` became `model.unet.ch`): stored configs are read through this table, and the
# CLI names the new field when a flag still names an old one.
FLAT_MODEL_FIELDS = {
    "hidden": "mlp.hidden", "num_layers": "mlp.num_layers", "activation": "mlp.activation",
    "ngf": "ncsn.ngf", "nonlinearity": "ncsn.nonlinearity", "ch_mult": "unet.ch_mult",
    "num_res_blocks": "unet.num_res_blocks", "attn_resolutions": "unet.attn_resolutions",
    "dropout": "unet.dropout", "conditional": "unet.conditional",
}
_FLAT_UNET_FIELDS = {"ngf": "unet.ch"}  # where a UNet's flat field went instead


def moved_field_hint(name: str, prefix: str = "") -> str:
  """Where the old flat model field `name` (dotted, e.g. "model.ngf") is now, as a clause to
  append to an error, each new name written after `prefix` (e.g. "--config."); "" for other
  names."""
  group, _, key = name.partition(".")
  if group != "model" or key not in FLAT_MODEL_FIELDS:
    return ""
  hint = f"; it is now {prefix}model.{FLAT_MODEL_FIELDS[key]}"
  unet = _FLAT_UNET_FIELDS.get(key)
  return hint + (f" ({prefix}model.{unet} for the UNet)" if unet else "")


def moved_flag_error(argv: list[str], fields: Container[str]) -> str:
  """The one-line error for the first `--config.model.X=...` flag in `argv` that names an old flat
  model field (with the field it is now), or "" when there is none; every command checks its
  flags with it before ml_collections reports a bare AttributeError.

  Args:
    argv: the command line.
    fields: the dotted names of today's config fields (`config_schema.FIELDS`).
  """
  for arg in argv:
    if arg.startswith("--config."):
      key = arg[len("--config."):].split("=", 1)[0]
      if key not in fields:
        hint = moved_field_hint(key, prefix="--config.")
        if hint:
          return f"--config.{key} is not a config field{hint}"
  return ""


def _migrate_model(stored: dict) -> dict:
  """A stored config's `model` group in the per-network layout (`FLAT_MODEL_FIELDS`)."""
  m = dict(stored.get("model") or {})
  for key, new in FLAT_MODEL_FIELDS.items():
    if key in m:
      if m.get("name") == "unet":
        new = _FLAT_UNET_FIELDS.get(key, new)
      group, field = new.split(".")
      m[group] = {**(m.get(group) or {}), field: m.pop(key)}
  return {**stored, "model": m}


def config_from_dict(stored: dict) -> ml_collections.ConfigDict:
  """The schema of configs/default.py with the stored values written over it (locked, typed).

  Fields the schema no longer has are ignored; configs stored with the single-`step_lr`
  sampling group are read into the per-sampler sub-groups, and those with the flat `model` group
  into the per-network sub-groups (`FLAT_MODEL_FIELDS`).
  """
  config = _default_config()

  def assign(node: ml_collections.ConfigDict, values: dict):
    for key, value in values.items():
      if key not in node:
        continue
      if isinstance(value, dict):
        assign(node[key], value)
      else:
        if isinstance(node[key], tuple) and isinstance(value, list):
          value = tuple(value)
        node[key] = value

  assign(config, _migrate_model(_migrate_sampling(stored)))
  return config


# Fields whose change makes an existing checkpoint unusable for this run. A model trained on
# continuous noise learned no ladder: its noise.num_scales (the samplers' ladder) may change.
_COMPAT_FIELDS = (("model",), ("data", "dataset"), ("data", "toy_dim"), ("data", "image_size"),
                  ("data", "num_channels"), ("noise", "distribution"), ("noise", "num_scales"),
                  ("training", "ema_decays"), ("adversarial", "enabled"))


def check_compatible(stored: dict, config: ml_collections.ConfigDict | str, where: str) -> None:
  """Raises `checkpoint.CheckpointError` naming the first field that differs.

  `stored` is read as `config_from_dict` reads it, so a config stored in an older layout is
  compared field by field with the current one, `config` (or its JSON, `Experiment.config_json`).
  """
  stored = json.loads(config_from_dict(stored).to_json())
  current = json.loads(config if isinstance(config, str) else config.to_json())
  continuous = current["noise"]["distribution"] != "ladder"
  for path in _COMPAT_FIELDS:
    if continuous and path == ("noise", "num_scales"):
      continue
    a, b = stored, current
    for key in path:
      a = a.get(key) if isinstance(a, dict) else None
      b = b.get(key) if isinstance(b, dict) else None
    if a != b:
      name = ".".join(path)
      raise checkpoint.CheckpointError(
          f"{where} holds a checkpoint of an incompatible run ({name}: checkpoint {a!r}, "
          f"config {b!r}); use another --workdir or the checkpoint's config")
