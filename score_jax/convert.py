"""Converts released PyTorch checkpoints of NCSN, NCSNv2 and the adversarial/CAS UNet to score_jax.

Sources and the reference files that define their module names:

- `ncsn`: NCSN v1 `CondRefineNetDilated` (ermongroup/ncsn `models/cond_refinenet_dilated.py`),
  conditional instance norm++ with one `embed.weight` row per noise level.
- `ncsnv2`, `ncsnv2_deeper`, `ncsnv2_deepest`: `NCSNv2`, `NCSNv2Deeper`, `NCSNv2Deepest`
  (ermongroup/ncsnv2 `models/ncsnv2.py`, `models/layers.py`, `models/normalization.py`); the same
  networks in AlexiaJM/AdversarialConsistentScoreMatching `models/ncsnv2.py` (no `sigmas` buffer).
- `ac_unet`: the DDPM-style UNet of AlexiaJM/AdversarialConsistentScoreMatching `models/UNet.py`
  (unconditional: its `temb_dense` layers exist but are never used, and are not converted). It
  sees its [0, 1] data unrescaled (`rescaled: false` in the AC configs), so the config needs
  `model.unet.input_range=unit`.

Checkpoint layouts (the runners' `torch.save(states, 'checkpoint.pth')`):

- NCSNv2 (`runners/ncsn_runner.py`) and AC (`runners/train_runner.py`): `[model.state_dict(),
  optimizer.state_dict(), epoch, step, ema_helper.state_dict()]`, the last element only with EMA.
  The model is wrapped in `torch.nn.DataParallel`, so its keys start with `module.`; the EMA
  shadow is keyed by parameter name without the prefix and holds parameters only; the model
  state_dict also holds buffers (NCSNv2's `sigmas`, checked against the config's ladder).
- NCSN v1 (`runners/anneal_runner.py`): `[model.state_dict(), optimizer.state_dict()]`.

Conversion is strict: every score_jax parameter is filled from exactly one tensor, every tensor of
the converted state_dict is used exactly once (or is a buffer that is checked, or a documented
unused layer), shapes are checked after the layout change (OIHW -> HWIO kernels, `(out, in)`
linear weights -> `(in, out)`), and any mismatch raises `ConversionError` in one line naming the
keys and the likely wrong `--source` or config field. Files are read by `torch_weights` without
torch and without running pickled code; pickles outside its allow-list are refused. Optimizer
states are not converted (score_jax starts a fresh optimizer).

    python -m score_jax.convert --source=ncsnv2 --checkpoint=checkpoint.pth \\
        --config=configs/ncsnv2_cifar10.py --workdir=runs/ncsnv2_cifar10_released

The conversion functions take the target run's `experiment.Experiment` (its network, ladder and
specs), never a config; `main` reads the config file and builds it once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from score_jax import checkpoint, config_schema, experiment, help_flags, paths, stored_config
from score_jax.eval import torch_weights
from score_jax.experiment import Experiment
from score_jax.train_state import TrainState

SOURCES = ("ncsn", "ncsnv2", "ncsnv2_deeper", "ncsnv2_deepest", "ac_unet")
# The score_jax `model.name` each source converts to.
MODEL_OF_SOURCE = {"ncsn": "ncsn", "ncsnv2": "ncsnv2", "ncsnv2_deeper": "ncsnv2_deeper",
                   "ncsnv2_deepest": "ncsnv2_deepest", "ac_unet": "unet"}
# Runner checkpoint list positions.
_MODEL, _OPTIMIZER, _EMA = 0, 1, 4
_KNOWN_ELEMENTS = {0: "model", 1: "optimizer", 4: "EMA shadow"}
_AC_DISCRIMINATOR = (5, 6)


class ConversionError(ValueError):
  """A checkpoint that does not convert to the requested score_jax model; one line."""


@dataclasses.dataclass(frozen=True)
class RunnerCheckpoint:
  """The tensors of a reference runner checkpoint, by list element.

  Attributes:
    model: element 0 (the model state_dict, `module.` prefix removed), parameters and buffers.
    ema: element 4 (the EMA shadow, parameters only), or None where the file has none.
    path: the file it was read from.
  """
  model: dict[str, np.ndarray]
  ema: dict[str, np.ndarray] | None
  path: str


def read_checkpoint(path: str | os.PathLike) -> RunnerCheckpoint:
  """Reads a runner checkpoint (`[model, optimizer, epoch, step(, ema)]`) or a bare state_dict.

  Raises:
    ConversionError: the file is missing, malformed, refers to a forbidden pickle global, or holds
      elements this converter does not take (an adversarial discriminator).
  """
  path = os.fspath(path)
  if not paths.isfile(path):
    raise ConversionError(f"--checkpoint={path}: no such file")
  try:
    flat = torch_weights.load_state_dict(path)
  except torch_weights.ForbiddenGlobalError as e:
    raise ConversionError(f"--checkpoint={path}: {_one_line(e)}") from None
  except Exception as e:  # truncated zips and pickles fail with many exception types
    raise ConversionError(f"--checkpoint={path} is not a readable PyTorch checkpoint "
                          f"({type(e).__name__}: {_one_line(e)[:200]}); is it truncated?") from None
  if not flat:
    raise ConversionError(f"--checkpoint={path} holds no tensors")
  elements: dict[int, dict[str, np.ndarray]] = {}
  bare: dict[str, np.ndarray] = {}
  for key, value in flat.items():
    head, _, rest = key.partition(".")
    if head.isdigit() and rest:
      elements.setdefault(int(head), {})[rest] = value
    else:
      bare[key] = value
  if bare and elements:
    raise ConversionError(f"--checkpoint={path} mixes a list of states with other keys "
                          f"(e.g. {_examples(bare)}); expected a runner checkpoint or a state_dict")
  if bare:
    return RunnerCheckpoint(model=_strip_module(bare), ema=None, path=path)
  if any(i in elements for i in _AC_DISCRIMINATOR):
    raise ConversionError(
        f"--checkpoint={path} holds adversarial discriminator states (elements 5-6); converting "
        "the BigGAN discriminator is not supported: convert the score network from a file "
        "without them (the released AC runner never saves the discriminator)")
  unknown = sorted(set(elements) - set(_KNOWN_ELEMENTS))
  if unknown or _MODEL not in elements:
    raise ConversionError(
        f"--checkpoint={path}: list elements with tensors are {sorted(elements)}; a runner "
        "checkpoint holds the model at 0, the optimizer at 1 and the EMA shadow at 4")
  return RunnerCheckpoint(model=_strip_module(elements[_MODEL]), ema=elements.get(_EMA),
                          path=path)


def _strip_module(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Removes `torch.nn.DataParallel`'s `module.` prefix where every key has it."""
  if state and all(k.startswith("module.") for k in state):
    return {k[len("module."):]: v for k, v in state.items()}
  return dict(state)


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())


def _examples(keys, n: int = 3) -> str:
  keys = sorted(keys)
  more = f" and {len(keys) - n} more" if len(keys) > n else ""
  return ", ".join(keys[:n]) + more


# ------------------------------------------------------------------------------------------------
# Layout changes: torch tensor -> score_jax array.

def _conv_kernel(w: np.ndarray) -> np.ndarray:
  """OIHW (torch `Conv2d.weight`) -> HWIO (flax `Conv` kernel)."""
  return np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w


def _linear_kernel(w: np.ndarray) -> np.ndarray:
  """`(out, in)` (torch `Linear.weight`, AC `Nin.weights`) -> `(in, out)` (flax `Dense`)."""
  return np.transpose(w) if w.ndim == 2 else w


def _nin_as_conv1x1(w: np.ndarray) -> np.ndarray:
  """AC `Nin.weights` `(out, in)` -> a 1x1 HWIO kernel `(1, 1, in, out)`."""
  return np.transpose(w)[None, None] if w.ndim == 2 else w


def _same(w: np.ndarray) -> np.ndarray:
  return w


Rule = tuple[str, Callable[[np.ndarray], np.ndarray]]


# ------------------------------------------------------------------------------------------------
# RefineNet family: score_jax parameter path -> reference state_dict key.

def _refinenet_stage_names(source: str, n: int) -> tuple[list[str], list[str]]:
  """Reference attribute names of the encoder stages and RefineBlocks, in score_jax order."""
  if source == "ncsnv2_deepest":
    return (["res1", "res2", "res3", "res31", "res4", "res5"],
            ["refine1", "refine2", "refine31", "refine3", "refine4", "refine5"])
  return [f"res{i + 1}" for i in range(n)], [f"refine{i + 1}" for i in range(n)]


def _refinenet_leaf(leaf: str) -> Rule:
  if leaf == "kernel":
    return "weight", _conv_kernel
  if leaf in ("bias", "gamma", "alpha", "beta"):
    return leaf, _same
  if leaf == "embedding":
    return "embed.weight", _same
  raise KeyError(leaf)


def _refinenet_rule(path: tuple[str, ...], model: Any, source: str) -> Rule:
  """The reference key and layout change of one score_jax RefineNet parameter."""
  stages, refines = _refinenet_stage_names(source, len(model.encoder))
  top, leaf = path[0], path[-1]
  tail, fn = _refinenet_leaf(leaf)
  if top in ("begin_conv", "end_conv") and len(path) == 3:
    return f"{top}.{tail}", fn
  if top == "norm_out" and len(path) == 2:
    return f"normalizer.{tail}", fn
  m = re.fullmatch(r"res(\d+)_([01])", top)
  if m and len(path) in (2, 3, 4):
    s, j = int(m.group(1)) - 1, int(m.group(2))
    _, down, dilation = model.encoder[s]
    mean_pool = down and j == 0 and dilation == 1  # reference `ConvMeanPool`: `.conv` inside
    base = f"{stages[s]}.{j}"
    sub = path[1]
    if sub in ("norm1", "norm2") and len(path) == 3:
      return f"{base}.normalize{sub[-1]}.{tail}", fn
    if sub in ("conv1", "conv2", "shortcut") and len(path) == 4:
      inner = ".conv" if mean_pool and sub != "conv1" else ""
      return f"{base}.{sub}{inner}.{tail}", fn
    raise KeyError(path)
  m = re.fullmatch(r"refine(\d+)", top)
  if m:
    base = refines[int(m.group(1)) - 1]
    sub = path[1]
    rcu = re.fullmatch(r"adapt_(\d+)", sub)
    if rcu or sub == "output":
      prefix = f"{base}.adapt_convs.{rcu.group(1)}" if rcu else f"{base}.output_convs"
      unit = re.fullmatch(r"(conv|norm)_(\d+)_(\d+)", path[2])
      if unit is None:
        raise KeyError(path)
      i, j = int(unit.group(2)) + 1, int(unit.group(3)) + 1
      return f"{prefix}.{i}_{j}_{unit.group(1)}.{tail}", fn
    if sub == "crp":
      unit = re.fullmatch(r"(conv|norm)_(\d+)", path[2])
      if unit is None:
        raise KeyError(path)
      return f"{base}.crp.{unit.group(1)}s.{unit.group(2)}.{tail}", fn
    unit = re.fullmatch(r"msf_(conv|norm)_(\d+)", sub)
    if unit:
      return f"{base}.msf.{unit.group(1)}s.{unit.group(2)}.{tail}", fn
  raise KeyError(path)


# ------------------------------------------------------------------------------------------------
# AC UNet: the reference module list, walked as the reference builds it.

def _unet_modules(ch_mult: tuple[int, ...]) -> dict[str, tuple[str, str]]:
  """score_jax module name -> (reference key prefix, kind), following AC `models/UNet.py`.

  The reference places attention at level index 1 (and in the middle) and uses two residual
  blocks per level down and three up.
  """
  out: dict[str, tuple[str, str]] = {"conv_in": ("downblocks.0", "conv")}
  n = 1
  for level in range(len(ch_mult)):
    for i in range(2):
      out[f"down{level}_res{i}"] = (f"downblocks.{n}", "res")
      n += 1
      if level == 1:
        out[f"down{level}_attn{i}"] = (f"downblocks.{n}", "attn")
        n += 1
    if level != len(ch_mult) - 1:
      out[f"down{level}_pool"] = (f"downblocks.{n}", "conv")
      n += 1
  out.update({"mid_res0": ("middleblocks.0", "res"), "mid_attn": ("middleblocks.1", "attn"),
              "mid_res1": ("middleblocks.2", "res")})
  n = 0
  for level in reversed(range(len(ch_mult))):
    for i in range(3):
      out[f"up{level}_res{i}"] = (f"upblocks.{n}", "res")
      n += 1
      if level == 1:
        out[f"up{level}_attn{i}"] = (f"upblocks.{n}", "attn")
        n += 1
    if level != 0:
      out[f"up{level}_upsample"] = (f"upblocks.{n}.conv", "conv")
      n += 1
  out["norm_out"] = ("normalize", "norm")
  out["conv_out"] = ("out", "conv")
  return out


_UNET_RES = {"norm1": "normalize0", "conv1": "conv0", "norm2": "normalize1", "conv2": "conv1",
             "shortcut": "nin"}
_UNET_ATTN = {"q": "Q", "k": "K", "v": "V", "proj_out": "OUT", "norm": "normalize"}
# Reference tensors that an unconditional UNet never uses (the time embedding MLP).
_UNET_UNUSED = re.compile(r"temb_dense\.\d+\.(weight|bias)")


def _unet_rule(path: tuple[str, ...], modules: dict[str, tuple[str, str]]) -> Rule:
  prefix, kind = modules[path[0]]
  leaf = path[-1]
  if kind == "conv" and len(path) == 2:
    return f"{prefix}.{'weight' if leaf == 'kernel' else leaf}", _conv_kernel
  if kind == "norm" and len(path) == 2:
    return f"{prefix}.{'weight' if leaf == 'scale' else leaf}", _same
  if kind == "res" and len(path) == 3:
    sub = _UNET_RES[path[1]]
    if sub == "nin":
      return f"{prefix}.nin.{'weights' if leaf == 'kernel' else leaf}", _nin_as_conv1x1
    if sub.startswith("normalize"):
      return f"{prefix}.{sub}.{'weight' if leaf == 'scale' else leaf}", _same
    return f"{prefix}.{sub}.{'weight' if leaf == 'kernel' else leaf}", _conv_kernel
  if kind == "attn" and len(path) == 3:
    sub = _UNET_ATTN[path[1]]
    if sub == "normalize":
      return f"{prefix}.normalize.{'weight' if leaf == 'scale' else leaf}", _same
    return f"{prefix}.{sub}.{'weights' if leaf == 'kernel' else leaf}", _linear_kernel
  raise KeyError(path)


# ------------------------------------------------------------------------------------------------


def _guess_source(keys) -> str | None:
  """The source whose module names these keys carry, from a few telltale names."""
  keys = set(keys)
  if any(k.startswith(("downblocks.", "upblocks.")) for k in keys):
    return "ac_unet"
  if any(k.endswith(".embed.weight") for k in keys):
    return "ncsn"
  if any(k.startswith("res31.") for k in keys):
    return "ncsnv2_deepest"
  if any(k.startswith("res5.") for k in keys):
    return "ncsnv2_deeper"
  if any(k.startswith("res4.") for k in keys):
    return "ncsnv2"
  return None


def _source_hint(source: str, keys) -> str:
  guess = _guess_source(keys)
  if any(k.endswith(("weight_orig", "weight_u", "weight_v")) for k in keys):
    return "the file has spectral-norm weights (model.spec_norm), which are not supported"
  if guess and guess != source:
    return f"the file looks like --source={guess}"
  if source == "ac_unet":
    return ("check --source and the config's model.unet.ch, model.unet.ch_mult, "
            "model.unet.attn_resolutions, data.num_channels, data.image_size, noise.num_scales")
  return ("check --source and the config's model.ncsn.ngf, data.num_channels, data.image_size, "
          "noise.num_scales")


def check_experiment(source: str, exp: Experiment) -> None:
  """Raises ConversionError unless `exp` has the network `source` converts to."""
  if source not in SOURCES:
    raise ConversionError(f"--source={source!r} is unknown; use one of {', '.join(SOURCES)}")
  if exp.data.is_toy:
    raise ConversionError(f"data.dataset={exp.data.dataset!r} is a toy data set; the converted "
                          "networks are image networks: use an image config (e.g. "
                          "configs/ncsnv2_cifar10.py) or --config.data.dataset=cifar10")
  want = MODEL_OF_SOURCE[source]
  if exp.model_name != want:
    raise ConversionError(f"--source={source} converts to model.name={want!r} but the config has "
                          f"{exp.model_name!r}; use a {want} config or "
                          f"--config.model.name={want}")
  if source == "ac_unet":
    m = exp.model  # the UNet's hyperparameters are the model.unet group's
    if m.conditional:
      raise ConversionError("--source=ac_unet: the AC UNet is trained without a noise-level input; "
                            "set --config.model.unet.conditional=False")
    if m.input_range != "unit":
      raise ConversionError("--source=ac_unet: the AC UNet sees its [0, 1] data unrescaled; "
                            "set --config.model.unet.input_range=unit")
    if m.num_res_blocks != 2:
      raise ConversionError(f"--source=ac_unet: the AC UNet has 2 residual blocks per level; "
                            f"model.unet.num_res_blocks={m.num_res_blocks}, set it to 2")
    attn = (exp.data.image_size // 2,) if len(m.ch_mult) > 1 else ()
    if tuple(m.attn_resolutions) != attn:
      raise ConversionError(
          f"--source=ac_unet: the AC UNet has attention at level 1 ({attn or 'none'} px at "
          f"data.image_size={exp.data.image_size}); model.unet.attn_resolutions="
          f"{tuple(m.attn_resolutions)}, set it to {list(attn)}")


def build_experiment(config: Any) -> Experiment:
  """`experiment.build(config)`, a network the config cannot describe as a ConversionError."""
  try:
    return experiment.build(config)
  except ValueError as e:
    raise ConversionError(f"config: {_one_line(e)}") from None


def _param_shapes(exp: Experiment) -> dict[tuple[str, ...], tuple[int, ...]]:
  """The parameter shapes of `exp.model` by path (no compute)."""
  model = exp.model
  x = jnp.zeros((1, *exp.example_shape), jnp.float32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, jnp.ones((1,), jnp.float32))["params"])
  flat = flax.traverse_util.flatten_dict(shapes)
  return {k: tuple(v.shape) for k, v in flat.items()}


def _check_sigmas(buffer: np.ndarray, sigmas: Any, path: str) -> None:
  ladder = np.asarray(sigmas, np.float64)
  got = np.asarray(buffer, np.float64).reshape(-1)
  if got.shape != ladder.shape or not np.allclose(got, ladder, rtol=1e-4, atol=0.0):
    raise ConversionError(
        f"--checkpoint={path}: its sigmas buffer ({got.size} levels, {got[0]:.6g} -> "
        f"{got[-1]:.6g}) differs from the config's ladder ({ladder.size} levels, "
        f"{ladder[0]:.6g} -> {ladder[-1]:.6g}); set noise.sigma_max, noise.sigma_min, "
        "noise.num_scales and noise.schedule to the checkpoint's")


def convert(source: str, checkpoint_path: str | os.PathLike, exp: Experiment, *,
            ema: bool = True) -> dict[str, Any]:
  """score_jax parameters of `exp.model` from a reference PyTorch checkpoint.

  Args:
    source: one of `SOURCES`: the reference network the file holds.
    checkpoint_path: a runner checkpoint (`checkpoint.pth`, `checkpoint_<step>.pth`) or a bare
      model state_dict.
    exp: the target run (`experiment.build` of a config whose `model.name` is
      `MODEL_OF_SOURCE[source]` and whose model, data and noise fields describe the checkpoint's
      network: width, channels, image size, ladder).
    ema: take the EMA shadow where the file has one (the weights the reference samples with);
      False takes the raw model weights. Files without an EMA element give the raw weights.

  Returns:
    The nested parameter dict (numpy float32 arrays) with exactly the tree and shapes of
    `exp.model.init(...)["params"]`.

  Raises:
    ConversionError: unknown source, a config of another model, an unreadable or forbidden file,
      missing or unexpected keys, shape mismatches, or sigmas that differ from the config's.
  """
  check_experiment(source, exp)
  ckpt = read_checkpoint(checkpoint_path)
  return _convert_loaded(source, ckpt, exp, _param_shapes(exp), ema=ema)


def _convert_loaded(source: str, ckpt: RunnerCheckpoint, exp: Experiment, shapes, *,
                    ema: bool) -> dict[str, Any]:
  path = ckpt.path
  buffers = {k for k in ckpt.model if k == "sigmas"}
  if source == "ncsn" and buffers:
    raise ConversionError(f"--checkpoint={path} has a sigmas buffer, which NCSN v1 does not; "
                          f"{_source_hint(source, ckpt.model)}")
  if "sigmas" in buffers:
    _check_sigmas(ckpt.model["sigmas"], exp.sigmas, path)
  weights = ckpt.model
  if ema and ckpt.ema is not None:
    params_in_model = set(ckpt.model) - buffers
    if set(ckpt.ema) != params_in_model:
      raise ConversionError(
          f"--checkpoint={path}: the EMA shadow's keys differ from the model's parameters "
          f"(only in EMA: {_examples(set(ckpt.ema) - params_in_model) or 'none'}; only in model: "
          f"{_examples(params_in_model - set(ckpt.ema)) or 'none'}); use --no-ema for the raw "
          "weights")
    weights = ckpt.ema
  weights = {k: v for k, v in weights.items() if k not in buffers}

  if source == "ac_unet":
    modules = _unet_modules(tuple(exp.model.ch_mult))
    rule = lambda p: _unet_rule(p, modules)
    unused = {k for k in weights if _UNET_UNUSED.fullmatch(k)}
  else:
    rule = lambda p: _refinenet_rule(p, exp.model, source)
    unused = set()

  keys: dict[tuple[str, ...], Rule] = {}
  for p in shapes:
    try:
      keys[p] = rule(p)
    except KeyError:
      raise ConversionError(
          f"score_jax parameter {'/'.join(p)} has no counterpart in the --source={source} "
          "layout: the score_jax network's parameter tree changed; update score_jax/convert.py"
      ) from None
  wanted = [key for key, _ in keys.values()]
  if len(set(wanted)) != len(wanted):
    twice = sorted({k for k in wanted if wanted.count(k) > 1})
    raise ConversionError(f"reference tensors {_examples(twice)} would each fill two score_jax "
                          "parameters; update score_jax/convert.py")
  missing = [k for k in wanted if k not in weights]
  unexpected = set(weights) - set(wanted) - unused
  if missing or unexpected:
    raise ConversionError(
        f"--checkpoint={path} does not fit --source={source} with this config: "
        f"{len(missing)} missing ({_examples(missing) or 'none'}), {len(unexpected)} unexpected "
        f"({_examples(unexpected) or 'none'}); {_source_hint(source, weights)}")
  out: dict[tuple[str, ...], np.ndarray] = {}
  for p, (key, fn) in keys.items():
    value = fn(np.asarray(weights[key]))
    if tuple(value.shape) != shapes[p]:
      raise ConversionError(
          f"--checkpoint={path}: {key} has shape {tuple(weights[key].shape)}, which is "
          f"{tuple(value.shape)} in score_jax layout, but {'/'.join(p)} needs {shapes[p]}; "
          f"{_source_hint(source, weights)}")
    if not np.issubdtype(value.dtype, np.floating):
      raise ConversionError(f"--checkpoint={path}: {key} has dtype {value.dtype}, not floating")
    out[p] = np.asarray(value, np.float32)
  return flax.traverse_util.unflatten_dict(out)


# ------------------------------------------------------------------------------------------------
# Workdir writing and the CLI.

def write_workdir(exp: Experiment, params: dict[str, Any], workdir: str, *,
                  metadata: dict) -> None:
  """Writes `params` (as the params and every EMA slot) into a new score_jax workdir at step 0.

  The state has the structure `exp.train.init_state()` gives (a `TrainState` with a fresh
  optimizer state; adversarial runs add a freshly initialized discriminator), saved with the
  checkpoint writer training uses, so `score_jax.load_checkpoint(workdir)` and `main.py --mode=
  sample|eval` read it. `metadata` is stored as the data-pipeline state (JSON).
  """
  new_params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  ema = tuple(jax.tree.map(jnp.copy, new_params) for _ in exp.train.ema_decays)
  # TrainState.create as train_state.create_train_state does, without initializing the network.
  score_state = TrainState.create(apply_fn=exp.model.apply, params=new_params,
                                  tx=exp.train.optimizer, ema_params=ema)
  # The step as training saves it (int32); a Python int would be saved as int64.
  score_state = score_state.replace(step=jnp.asarray(0, jnp.int32))
  state = score_state
  if exp.train.adversarial:
    state = exp.train.init_state().replace(score=score_state)
  manager = checkpoint.create_writer(workdir, keep=1, async_save=False)
  try:
    checkpoint.save(manager, 0, state, data_state=dict(metadata, kind="converted"),
                    config_json=exp.config_json)
    checkpoint.wait(manager)
  finally:
    manager.close()


def _has_checkpoints(workdir: str) -> bool:
  d = paths.as_path(workdir) / "checkpoints"
  return d.is_dir() and any(d.iterdir())


_USAGE = f"""\
usage: python -m score_jax.convert --source=SOURCE --checkpoint=FILE.pth --config=FILE.py
                                   --workdir=NEW_DIR [--no-ema]

Converts a released PyTorch checkpoint of NCSN, NCSNv2 or the adversarial/CAS UNet into a new
score_jax workdir (step 0; sample or evaluate it with main.py --workdir=NEW_DIR).

sources (--source), the network each converts to (model.name of --config):
{chr(10).join(f"  {s:<15} {MODEL_OF_SOURCE[s]}" for s in SOURCES)}

example:
  python -m score_jax.convert --source=ncsnv2 --checkpoint=checkpoint.pth \\
      --config=configs/ncsnv2_cifar10.py --workdir=runs/ncsnv2_cifar10_released
"""


def main(argv: list[str]) -> int:
  """`python -m score_jax.convert`: one-line errors on stderr with exit status 2."""
  moved = stored_config.moved_flag_error(argv, config_schema.FIELDS)
  if moved:
    print(f"error: {moved}", file=sys.stderr)
    return 2
  fv = flags.FlagValues()
  argv = ["--noema" if a == "--no-ema" else a for a in argv]
  config_schema.define_config_file_flag(fv, argv, "score_jax config describing the network.")
  flags.DEFINE_string("source", None, f"Reference network: {' | '.join(SOURCES)}.", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint (.pth) to convert.", flag_values=fv)
  flags.DEFINE_string("workdir", None, "New score_jax workdir to write.", flag_values=fv)
  flags.DEFINE_boolean("ema", True, "Use the EMA weights where present (--no-ema: raw weights).",
                       flag_values=fv)
  # The multi-host flags `score_jax.launch` appends: conversion is one process's job.
  flags.DEFINE_string("coordinator_address", None, "Refused: conversion runs in one process.",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Refused above 1: conversion runs in one process.",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "Refused: conversion runs in one process.",
                       flag_values=fv)
  own = ("config", "source", "checkpoint", "workdir", "ema")
  help_flags.define(lambda: _USAGE, lambda: [fv[n] for n in own], fv)
  try:
    fv(argv)
    config = fv.config
    if config is None:
      raise ConversionError("--config=CONFIG is required (e.g. configs/ncsnv2_cifar10.py)")
    config.get("name")
  except flags.Error as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  except Exception as e:  # ml_collections reports bad config files/overrides with many types
    print(f"error: --config: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
    return 2
  if (fv.num_processes or 1) > 1:
    print(f"error: --num_processes={fv.num_processes}: conversion reads one file and writes one "
          "workdir in one process; run `python -m score_jax.convert` without score_jax.launch "
          "(any workdir it writes is read by multi-process jobs)", file=sys.stderr)
    return 2
  try:
    for name in ("source", "checkpoint", "workdir"):
      if not fv[name].value:
        raise ConversionError(f"--{name} is required")
    workdir = fv.workdir
    if _has_checkpoints(workdir):
      raise ConversionError(f"--workdir={workdir} already holds checkpoints; give a new workdir")
    if fv.source not in SOURCES:
      raise ConversionError(f"--source={fv.source!r} is unknown; use one of {', '.join(SOURCES)}")
    exp = build_experiment(config)
    check_experiment(fv.source, exp)
    ckpt = read_checkpoint(fv.checkpoint)
    shapes = _param_shapes(exp)
    params = _convert_loaded(fv.source, ckpt, exp, shapes, ema=fv.ema)
    used = "EMA" if fv.ema and ckpt.ema is not None else "raw"
    write_workdir(exp, params, workdir, metadata=dict(
        source=fv.source, checkpoint=paths.as_str(fv.checkpoint), weights=used))
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(int(np.prod(s)) for s in shapes.values())
  print(json.dumps({"workdir": workdir, "source": fv.source, "weights": used, "parameters": n}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
