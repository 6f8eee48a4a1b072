"""The config schema: every field's type and allowed values, declared once, and `validate`.

`FIELDS` maps each dotted field of `configs/default.py` to a `Field` (its type, range or choices);
a test checks the two hold the same fields, so a new field cannot go unchecked. `validate(config,
modes=...)` checks every value, then the rules that join fields (the noise ladder, the batch
split over devices, the network and the image size, and for every sampler the run's modes will
reach its own rules, e.g. the CAS step interval in which beta of Jolicoeur-Martineau et al. 2020,
Algorithm 2, is real; every other argument check of a reached sampler, by tracing it abstractly),
the sizes of the arrays a run holds whole against the host's memory, and for evaluations the
reference split's size, and raises `UsageError` naming the field, the value and the fix before any
work starts. The cross-field rules call the library's own argument checks (`noise`, `data`,
`image_data`, `models`), so the CLI's one-line errors and a library user's errors come from the
same code.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_flags

from score_jax import data, gan, toy


class UsageError(ValueError):
  """Bad input from the user (config, flags, paths); the CLI prints it in one line, exit 2."""


@dataclasses.dataclass(frozen=True)
class Field:
  """What one config field may hold.

  Attributes:
    kind: "int", "float", "bool", "str" or "tuple" (a tuple of `item` kinds).
    low, high: bounds of numbers (or of a tuple's items); None leaves a side open.
    open_low, open_high: whether the bound itself is excluded.
    choices: the allowed values (of a tuple's items, for tuples).
    optional: None is allowed (unset).
    item: kind of a tuple's items.
    min_len: fewest items of a tuple.
  """
  kind: str
  low: float | None = None
  high: float | None = None
  open_low: bool = False
  open_high: bool = False
  choices: tuple | None = None
  optional: bool = False
  item: str | None = None
  min_len: int = 0


def _int(low=None, high=None, **kw) -> Field:
  return Field("int", low, high, **kw)


def _pos_int(**kw) -> Field:
  return Field("int", 1, None, **kw)


def _float(low=None, high=None, **kw) -> Field:
  return Field("float", low, high, **kw)


def _pos_float(**kw) -> Field:
  return Field("float", 0.0, None, open_low=True, **kw)


def _choice(*choices: str, **kw) -> Field:
  return Field("str", choices=choices, **kw)


_BOOL = Field("bool")
_STR = Field("str")
_OPT_STR = Field("str", optional=True)
# Each sampler's sub-group `sampling.<name>` (its keyword arguments, `sampling.SAMPLERS`); the
# sampler names the config may choose are these sub-groups.
def _ladder_fields(name: str, *, churn: bool) -> dict[str, Field]:
  """The fields of a fixed-step ODE sampler's sub-group `sampling.<name>`: its ladder, and EDM's
  churn where the sampler takes it."""
  g = f"sampling.{name}."
  fields = {g + "ladder": _choice("trained", "geometric", "karras"),
            g + "num_steps": _int(2, optional=True), g + "rho": _pos_float(),
            g + "sigma_max": _pos_float(optional=True), g + "sigma_min": _pos_float(optional=True)}
  if churn:
    fields.update({g + "s_churn": _float(0.0), g + "s_tmin": _float(0.0),
                   g + "s_tmax": _float(0.0, optional=True), g + "s_noise": _float(0.0)})
  return fields


_SAMPLER_FIELDS: dict[str, Field] = {
    "sampling.als.step_lr": _pos_float(),
    "sampling.als.steps_per_sigma": _pos_int(),
    "sampling.cas.step_lr": _pos_float(optional=True),  # None: per-level sampling.cas.eta
    "sampling.cas.eta": Field("tuple", 0.0, 2.0, item="float", min_len=1, optional=True),
    "sampling.cas.n_sigma": _pos_int(),
    "sampling.pc.snr": _pos_float(),
    "sampling.pc.corrector_steps": _int(0),
    **_ladder_fields("euler", churn=True),
    **_ladder_fields("heun", churn=True),
    **_ladder_fields("dpm_solver_pp_2m", churn=False),
    "sampling.adaptive.sigma_max": _pos_float(optional=True),
    "sampling.adaptive.sigma_min": _pos_float(optional=True),
    "sampling.adaptive.abs_tol": _pos_float(),
    "sampling.adaptive.rel_tol": _pos_float(),
    "sampling.adaptive.h_init": _float(0.0, 1.0, open_low=True),
    "sampling.adaptive.safety": _float(0.0, 1.0, open_low=True),
    "sampling.adaptive.exponent": _pos_float(),
    "sampling.adaptive.h_max_factor": _float(1.0, open_low=True, optional=True),
    "sampling.adaptive.max_iters": _pos_int(),
    "sampling.adaptive.denoise": _BOOL,
    "sampling.adaptive.noise": _choice("brownian_tree", "redraw"),
}
_SAMPLER_NAMES = tuple(dict.fromkeys(name.split(".")[1] for name in _SAMPLER_FIELDS))


FIELDS: dict[str, Field] = {
    "name": _STR,
    "seed": _int(0),
    # data
    "data.dataset": _STR,  # checked against the toy and image registries (cross-field rules)
    "data.toy_dim": _pos_int(),
    "data.image_size": _pos_int(),
    "data.num_channels": _pos_int(),
    "data.data_dir": _OPT_STR,
    "data.manual_dir": _OPT_STR,
    "data.path": _OPT_STR,
    "data.split": _STR,
    "data.eval_split": _STR,
    "data.random_flip": _BOOL,
    "data.uniform_dequantization": _BOOL,
    "data.gaussian_dequantization": _BOOL,
    "data.centered": _BOOL,
    "data.num_workers": _int(0),
    "data.prefetch": _int(0),
    # model: shared settings, then one sub-group per network module
    "model.name": _choice("mlp", "ncsn", "ncsnv2", "ncsnv2_deeper", "ncsnv2_deepest", "unet"),
    "model.dtype": _choice("float32", "bfloat16"),
    "model.remat": _BOOL,
    "model.preconditioning": _choice("ncsn", "edm"),
    "model.mlp.hidden": _pos_int(),
    "model.mlp.num_layers": _pos_int(),
    "model.mlp.activation": _choice("softplus", "elu", "swish", "relu"),
    "model.ncsn.ngf": _pos_int(),
    "model.ncsn.nonlinearity": _choice("elu", "relu", "lrelu", "swish"),
    "model.ncsn.noise_embedding": _BOOL,
    "model.unet.ch": _pos_int(),
    "model.unet.ch_mult": Field("tuple", 1, None, item="int", min_len=1),
    "model.unet.num_res_blocks": _pos_int(),
    "model.unet.attn_resolutions": Field("tuple", 1, None, item="int"),
    "model.unet.dropout": _float(0.0, 1.0, open_high=True),
    "model.unet.conditional": _BOOL,
    "model.unet.input_range": _choice("centered", "unit"),
    # noise
    "noise.schedule": _choice("geometric", "linear"),
    "noise.sigma_max": _pos_float(),
    "noise.sigma_min": _pos_float(),
    "noise.num_scales": _int(2),
    "noise.level_sampling": _choice("uniform", "stratified", "antithetic"),
    "noise.weight_power": _float(),
    "noise.distribution": _choice("ladder", "log_uniform", "log_normal"),
    "noise.p_mean": _float(),
    "noise.p_std": _pos_float(),
    "noise.weighting": _choice("ncsn", "edm"),
    "noise.sigma_data": _pos_float(),
    # optim
    "optim.optimizer": _choice("adam", "adamw"),
    "optim.lr": _pos_float(),
    "optim.beta1": _float(-1.0, 1.0, open_high=True),
    "optim.beta2": _float(0.0, 1.0, open_high=True),
    "optim.eps": _pos_float(),
    "optim.weight_decay": _float(0.0),
    "optim.warmup_steps": _int(0),
    "optim.grad_clip": _pos_float(optional=True),
    # training
    "training.loss": _choice("dsm", "ssm"),
    "training.ssm_projection": _choice("gaussian", "rademacher"),
    "training.ssm_num_projections": _pos_int(),
    "training.batch_size": _pos_int(),
    "training.num_train_steps": _pos_int(),
    "training.steps_per_dispatch": _pos_int(),
    "training.log_every_steps": _pos_int(),
    "training.eval_every_steps": _pos_int(optional=True),
    "training.ckpt_every_steps": _pos_int(),
    "training.keep_checkpoints": _pos_int(),
    "training.keep_every_steps": _pos_int(optional=True),
    "training.ema_decays": Field("tuple", 0.0, 1.0, open_high=True, item="float", min_len=1),
    "training.distributed": _BOOL,
    "training.async_checkpoint": _BOOL,
    "training.progress_bar": _BOOL,
    # sampling: shared settings, then one sub-group per sampler
    "sampling.method": _choice(*_SAMPLER_NAMES),
    "sampling.methods": Field("tuple", item="str", choices=_SAMPLER_NAMES, min_len=1),
    "sampling.denoise": _BOOL,
    "sampling.use_ema": _BOOL,
    "sampling.init": _choice("uniform", "gaussian"),
    "sampling.num_samples": _pos_int(),
    "sampling.batch_size": _pos_int(),
    "sampling.save_every_levels": _pos_int(optional=True),
    "sampling.inpaint_examples": _int(0),
    **_SAMPLER_FIELDS,
    # adversarial
    "adversarial.enabled": _BOOL,
    "adversarial.gan_loss": _choice(*gan.GAN_LOSSES),
    "adversarial.lambda_dsm": _float(0.0),
    "adversarial.lambda_g": _float(0.0),
    "adversarial.lambda_d": _float(0.0),
    "adversarial.d_steps": _pos_int(),
    "adversarial.d_arch": _choice("biggan", "dcgan", "mlp"),
    "adversarial.d_ch": _pos_int(),
    "adversarial.d_lr": _pos_float(),
    "adversarial.d_beta1": _float(-1.0, 1.0, open_high=True),
    "adversarial.d_beta2": _float(0.0, 1.0, open_high=True),
    "adversarial.clamp": _BOOL,
    # eval
    "eval.num_samples": _pos_int(),
    "eval.batch_size": _pos_int(),
    "eval.begin_step": _int(0, optional=True),
    "eval.end_step": _int(0, optional=True),
    "eval.features": _choice("auto", "inception", "mnist_classifier", "toy"),
    "eval.inception_weights": _OPT_STR,
    "eval.mnist_classifier_weights": _OPT_STR,
    "eval.reference_stats": _OPT_STR,
    "eval.reference_split": _OPT_STR,
    "eval.reference_num_images": _pos_int(optional=True),
    "eval.sweep_step_lrs": Field("tuple", 0.0, None, open_low=True, item="float", min_len=1),
    "eval.sweep_steps_per_sigma": Field("tuple", 1, None, item="int", min_len=1),
    "eval.sweep_methods": Field("tuple", item="str", choices=_SAMPLER_NAMES, min_len=1),
    "eval.sweep_denoise": Field("tuple", item="bool", min_len=1),
    "eval.sweep_vmap": _BOOL,
    # likelihood
    "likelihood.trace": _choice("auto", "exact", "rademacher", "gaussian"),
    "likelihood.num_probes": _pos_int(),
    "likelihood.rtol": _pos_float(),
    "likelihood.atol": _pos_float(),
    "likelihood.num_examples": _pos_int(),
    "likelihood.repeats": _pos_int(),
    "likelihood.batch_size": _pos_int(),
    "likelihood.split": _STR,

    "eval.sweep_num_steps": Field("tuple", 2, None, item="int"),
    "eval.sweep_rel_tols": Field("tuple", 0.0, None, open_low=True, item="float"),
}

# The modes a config is validated for (`sweep` validates each of its runs for "train").
MODES = ("train", "sample", "eval", "sampler_sweep", "likelihood", "export")


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """The config's fields as `{dotted name: value}`."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


# numpy, JAX (keys) and tf.data (seeds) take Python ints as 64-bit integers; a larger one is an
# OverflowError deep inside whichever library meets it first.
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _type_ok(kind: str, value: Any) -> bool:
  if kind == "bool":
    return isinstance(value, bool)
  if kind == "int":
    return (isinstance(value, int) and not isinstance(value, bool)
            and _INT64[0] <= value <= _INT64[1])
  if kind == "float":
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  return isinstance(value, str)


def _range_text(field: Field) -> str:
  if field.high is None:
    return f"{'>' if field.open_low else '>='} {field.low}"
  if field.low is None:
    return f"{'<' if field.open_high else '<='} {field.high}"
  return (f"in {'(' if field.open_low else '['}{field.low}, {field.high}"
          f"{')' if field.open_high else ']'}")


def _in_range(field: Field, value: Any) -> bool:
  if field.low is not None and (value < field.low or (field.open_low and value == field.low)):
    return False
  if field.high is not None and (value > field.high or (field.open_high and value == field.high)):
    return False
  return True


def check_field(name: str, value: Any) -> None:
  """UsageError unless `value` is allowed for the field `name` (a dotted name in `FIELDS`)."""
  field = FIELDS.get(name)
  if field is None:
    raise UsageError(f"{name} is not a config field; see configs/default.py for the fields")
  if value is None:
    if not field.optional:
      raise UsageError(f"{name}=None: this field needs a value (see configs/default.py)")
    return
  if field.kind == "tuple":
    items = tuple(value) if isinstance(value, (tuple, list)) else None
    if items is None:
      raise UsageError(f"{name}={value!r} must be a tuple of {field.item}, e.g. "
                       f"--config.{name}='(...)'")
    if len(items) < field.min_len:
      raise UsageError(f"{name}={value!r} must hold at least {field.min_len} value(s)")
    for v in items:
      _check_value(name, field.item, field, v, f" (item {v!r})")
    return
  _check_value(name, field.kind, field, value, "")


def _check_value(name: str, kind: str, field: Field, value: Any, what: str) -> None:
  if not _type_ok(kind, value):
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
      raise UsageError(f"{name}={value!r}{what} does not fit a 64-bit integer; use a value in "
                       f"[-2**63, 2**63 - 1]")
    raise UsageError(f"{name}={value!r}{what} must be a finite {kind}")
  if field.choices is not None and value not in field.choices:
    raise UsageError(f"{name}={value!r}{what} is not allowed; use one of "
                     f"{', '.join(map(str, field.choices))}")
  if kind in ("int", "float") and not _in_range(field, value):
    raise UsageError(f"{name}={value!r}{what} must be {_range_text(field)}; set "
                     f"--config.{name} to such a value")


def sampler_methods(config: ml_collections.ConfigDict, modes: Iterable[str]) -> tuple[str, ...]:
  """The samplers that running `modes` on `config` reaches, in first-use order."""
  s = config.sampling
  methods: list[str] = []
  for mode in modes:
    if mode == "train":
      methods += list(s.methods)
      if s.inpaint_examples and config.data.dataset not in _toy_names():
        methods.append(s.method)
    elif mode in ("sample", "eval"):
      methods.append(s.method)
  return tuple(dict.fromkeys(methods))


def sampler_fix_hint(method: str) -> str:
  """What to change when sampler `method` diverged, naming only fields the schema has.

  Built from `FIELDS`, so a hint cannot name a field that was moved or removed.
  """
  for knob in ("step_lr", "snr", "rel_tol", "num_steps"):
    if f"sampling.{method}.{knob}" in FIELDS:
      return f"lower sampling.{method}.{knob}" if knob != "num_steps" else (
          f"raise sampling.{method}.num_steps")
  return f"change sampling.{method}.*"


def _toy_names() -> tuple[str, ...]:
  return tuple(toy.DATASETS)


def _wrap(field: str, fix: str, fn, *args, **kwargs):
  """Runs a library argument check; its ValueError becomes a UsageError naming `field`."""
  try:
    return fn(*args, **kwargs)
  except UsageError:
    raise
  except ValueError as e:
    raise UsageError(f"{field}: {' '.join(str(e).split())}{'; ' + fix if fix else ''}") from None


def check_data_source(config: ml_collections.ConfigDict) -> None:
  """UsageError unless the training split can be opened (prepared TFDS data, data.path)."""
  from score_jax import image_data  # local import: grain, for image datasets only
  d = config.data
  if not data.is_toy(d.dataset):
    _wrap("data", "", image_data._source, d.dataset, d.split, d.data_dir, d.path)


def validate(config: ml_collections.ConfigDict, *, modes: Iterable[str] = ("train",),
             num_devices: int | None = None) -> None:
  """Checks every value of `config` for a run of `modes`; raises UsageError on the first bad one.

  Args:
    config: a config with the fields of configs/default.py.
    modes: the CLI modes the run will reach ("train" also reaches the samplers of
      `sampling.methods`, "sample" and "eval" the one of `sampling.method`).
    num_devices: devices the training batch is split over; None: every local device.
  """
  modes = tuple(modes)
  unknown = [m for m in modes if m not in MODES]
  if unknown:
    raise UsageError(f"unknown mode(s) {unknown}; use {', '.join(MODES)}")
  values = leaves(config)
  for name in values:
    if name not in FIELDS:
      raise UsageError(f"{name} is not a config field; see configs/default.py for the fields")
  for name, value in values.items():
    check_field(name, value)
  _check_data_and_model(config)
  _check_sizes(config, modes)
  _check_noise(config)
  _check_training(config, num_devices)
  if config.adversarial.enabled:
    _check_adversarial(config)
  _check_samplers(config, modes)
  if "eval" in modes or "sampler_sweep" in modes:
    _check_reference_size(config)


def _memory_bytes() -> int:
  """The host's physical memory: every batch, sample set and feature set passes through it."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_sizes(config: ml_collections.ConfigDict, modes: tuple[str, ...]) -> None:
  """UsageError when an array the run holds whole cannot fit in memory.

  The sizes are products of fields (batch sizes and sample counts times one example's shape),
  each value of which may be in range while the product is absurd (data.toy_dim=10**9): the
  training batch, the samples of a sampling run (kept on the host to be written) and a batch of
  evaluation samples.
  """
  shape = _example_shape(config)
  example = math.prod(shape) * 4  # float32
  arrays = [("data.*", "one example", 1)]
  if "train" in modes:
    arrays.append(("training.batch_size", "a training batch", config.training.batch_size))
  if {"train", "sample"} & set(modes):
    arrays.append(("sampling.num_samples", "the samples of a sampling run",
                   config.sampling.num_samples))
  if {"eval", "sampler_sweep"} & set(modes):  # evaluations hold one batch of samples at a time
    arrays.append(("eval.batch_size", "a batch of evaluation samples", config.eval.batch_size))
  memory = _memory_bytes()
  for field, what, count in arrays:
    if count * example > memory:
      raise UsageError(
          f"{field}={count}: {what} of shape {shape} (data.dataset={config.data.dataset!r}, "
          f"data.toy_dim / image_size / num_channels) is {count * example / 2 ** 30:.1f} GiB, "
          f"more than this machine's {memory / 2 ** 30:.1f} GiB of memory; use smaller sizes")


def _example_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """One example's shape, without building a toy distribution of data.toy_dim dimensions.

  A toy's dimension follows data.toy_dim when it differs between dims 1 and 2 (gaussian,
  point_mass); the other toys have their own.
  """
  d = config.data
  if not data.is_toy(d.dataset):
    return (d.image_size, d.image_size, d.num_channels)
  one, two = toy.get_toy(d.dataset, dim=1).dim, toy.get_toy(d.dataset, dim=2).dim
  return (d.toy_dim,) if one != two else (one,)


def reference_split(config: ml_collections.ConfigDict) -> tuple[str, int]:
  """The split and image count of computed reference statistics.

  `eval.reference_split` (None: `data.eval_split`) and `eval.reference_num_images` (None:
  `eval.num_samples`). The papers' protocol: the 50k CIFAR-10 training images (the TTUR
  statistics of NCSNv2 and the adversarial/CAS paper), the CelebA test set.
  """
  ev = config.eval
  split = ev.reference_split or config.data.eval_split
  n = ev.reference_num_images or ev.num_samples
  if n < 2:
    raise ValueError(f"eval.reference_num_images={n}: reference statistics need at least 2 images")
  return split, int(n)


def _check_reference_size(config: ml_collections.ConfigDict) -> None:
  """UsageError when computed reference statistics would need more images than their split.

  Checked here rather than when the statistics are first needed, which is after the feature
  network is loaded and samples are drawn.
  """
  from score_jax import image_data  # local import: grain, for image datasets only
  d, ev = config.data, config.eval
  if data.is_toy(d.dataset) or ev.reference_stats:
    return
  split, n = _wrap("eval.reference_num_images", "", reference_split, config)
  try:
    available = image_data.num_records(dataset=d.dataset, split=split, data_dir=d.data_dir,
                                       path=d.path)
  except (ValueError, OSError):
    return  # unreadable data: the run reports it where it reads them (a cache may serve instead)
  if n > available:
    setting = "eval.reference_num_images" if ev.reference_num_images else "eval.num_samples"
    raise UsageError(f"{setting}={n} exceeds the {available} images of {d.dataset}/{split} (the "
                     f"reference statistics would repeat images); lower {setting} or give "
                     "eval.reference_stats")


def _check_data_and_model(config: ml_collections.ConfigDict) -> None:
  d, m = config.data, config.model
  _wrap("data.dataset", "", data.check_dataset, d.dataset)
  if data.is_toy(d.dataset):
    if m.name != "mlp":
      raise UsageError(f"model.name={m.name!r} is an image network; toy data "
                       f"data.dataset={d.dataset!r} need --config.model.name=mlp")
    return
  if m.name == "mlp":
    raise UsageError(f"model.name='mlp' is for toy data; {d.dataset} needs an image network: set "
                     "--config.model.name=ncsnv2 (or ncsn, unet)")
  if d.dataset in ("folder", "npz") and not d.path:
    raise UsageError(f"data.dataset={d.dataset!r} needs data.path (a folder of images or an "
                     ".npz); set --config.data.path")
  if d.uniform_dequantization and d.gaussian_dequantization:
    raise UsageError("data.uniform_dequantization and data.gaussian_dequantization are both True; "
                     "set at most one")
  from score_jax import image_data  # local import: grain, for image datasets only
  _wrap("data", "", image_data._check_shape, d.dataset, d.image_size, d.num_channels)
  if m.name == "unet":
    ch_mult = m.unet.ch_mult
    factor = 2 ** (len(ch_mult) - 1)
    if d.image_size % factor:
      raise UsageError(f"data.image_size={d.image_size}: the UNet with model.unet.ch_mult="
                       f"{ch_mult} halves it {len(ch_mult) - 1} times; use a multiple of "
                       f"{factor} or fewer entries in model.unet.ch_mult")
  else:
    from score_jax import models  # local import: Flax, for image networks only
    _wrap("data.image_size", f"pick an image size {m.name} can take", models.build, config)


def _check_noise(config: ml_collections.ConfigDict) -> None:
  # local import: SciPy; usage errors of the earlier checks stay fast
  from score_jax import noise
  n = config.noise
  if not n.sigma_max > n.sigma_min:
    raise UsageError(f"noise.sigma_max={n.sigma_max} must be > noise.sigma_min={n.sigma_min}")
  _wrap("noise", "", noise.ladder, n.schedule, n.sigma_max, n.sigma_min, n.num_scales)
  m = config.model
  if n.distribution != "ladder":
    if n.level_sampling != "uniform":
      raise UsageError(f"noise.level_sampling={n.level_sampling!r} draws ladder levels; "
                       f"noise.distribution={n.distribution!r} draws sigma: set "
                       "--config.noise.level_sampling=uniform")
    if m.name == "ncsn":
      raise UsageError(f"noise.distribution={n.distribution!r}: NCSN (v1) conditions its norms on "
                       "a level of the ladder; use --config.noise.distribution=ladder or an NCSNv2 "
                       "variant or the UNet")
  if m.preconditioning == "edm" and m.name == "ncsn":
    raise UsageError("model.preconditioning='edm' calls the network with c_noise: NCSN (v1)'s "
                     "level-conditional norms cannot take it; use ncsnv2 (or unet, mlp)")
  if m.ncsn.noise_embedding and m.preconditioning != "edm" and m.name.startswith("ncsnv2"):
    raise UsageError("model.ncsn.noise_embedding embeds EDM's c_noise: it needs "
                     "--config.model.preconditioning=edm")


def _check_training(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
  t = config.training
  available = jax.device_count()
  if num_devices is not None and not 1 <= num_devices <= available:
    raise UsageError(f"--num_devices={num_devices} must be in [1, {available}] (the devices "
                     "present)")
  devices = num_devices or available
  if t.batch_size % devices:
    raise UsageError(f"training.batch_size={t.batch_size} must be a positive multiple of the "
                     f"{devices} devices in use")
  if config.optim.optimizer == "adam" and config.optim.weight_decay:
    raise UsageError(f"optim.weight_decay={config.optim.weight_decay} needs "
                     "--config.optim.optimizer=adamw (adam has no decoupled weight decay)")


def _check_adversarial(config: ml_collections.ConfigDict) -> None:
  a = config.adversarial
  if config.training.loss != "dsm":
    raise UsageError(f"training.loss={config.training.loss!r}: adversarial training needs 'dsm' "
                     "(it denoises with the DSM forward pass)")
  if data.is_toy(config.data.dataset) and a.d_arch != "mlp":
    raise UsageError(f"adversarial.d_arch={a.d_arch!r} is for images; toy data need "
                     "--config.adversarial.d_arch=mlp")
  if not data.is_toy(config.data.dataset) and a.d_arch == "mlp":
    raise UsageError("adversarial.d_arch='mlp' is for toy data; use biggan or dcgan for images")


def _check_samplers(config: ml_collections.ConfigDict, modes: tuple[str, ...]) -> None:
  # local import: Flax and SciPy; usage errors of the earlier checks stay fast
  from score_jax import experiment, noise, samplers, sampling
  s = config.sampling
  if "sample" in modes or "train" in modes:
    if s.save_every_levels is not None and s.save_every_levels > config.noise.num_scales:
      raise UsageError(f"sampling.save_every_levels={s.save_every_levels} exceeds "
                       f"noise.num_scales={config.noise.num_scales}; use a smaller value or None")
  for method in sampler_methods(config, modes):
    if method == "cas":
      ladder = np.asarray(samplers.cas_ladder(experiment.sigmas_from_config(config),
                                              s.cas.n_sigma))
      if (s.cas.step_lr is None) == (s.cas.eta is None):
        raise UsageError("sampling.cas: set exactly one of step_lr and eta (the other None)")
      if s.cas.eta is not None:
        eta = np.asarray(s.cas.eta, np.float64)
        _wrap("sampling.cas.eta", f"give one value or {len(ladder)} (one per level)",
              samplers.check_cas_eta, ladder, eta.reshape(()) if eta.size == 1 else eta, "eta")
        continue
      low, high = noise.cas_step_lr_interval(ladder)
      _wrap("sampling.cas.step_lr", f"set --config.sampling.cas.step_lr in ({low:.4g}, "
            f"{high:.4g}) or change noise.* / sampling.cas.n_sigma", noise.check_cas_step_lr,
            ladder, s.cas.step_lr)
    if method in sampling.ODE_SAMPLERS:
      g = s[method]
      _wrap(f"sampling.{method}", "choose ladder='trained' with num_steps=None, or 'geometric'/"
            "'karras' with num_steps >= 2", sampling.sampling_ladder,
            experiment.sigmas_from_config(config), ladder=g.ladder, num_steps=g.num_steps,
            rho=g.rho, sigma_max=g.sigma_max, sigma_min=g.sigma_min)
    _wrap(f"sampling.{method}", f"fix the values of --config.sampling.{method}.*",
          _trace_sampler, config, method)


def _trace_sampler(config: ml_collections.ConfigDict, method: str) -> None:
  """Runs every argument check of sampler `method` with the config's arguments, computing nothing.

  The samplers check their arguments (e.g. EDM's s_tmin <= s_tmax, the adaptive solver's
  tolerances) on the host when they are traced; tracing the configured sampler abstractly
  (`jax.eval_shape`) with a one-unit MLP score network on one-dimensional data reaches all of
  those checks, present and future, before any work, without repeating them here.
  """
  # local import: Flax; usage errors of the earlier checks stay fast
  from score_jax import experiment, models, sampling
  net = models.NoiseConditionalMLP(hidden=1, num_layers=1)
  params = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 1)),
                                           jnp.ones((1,)))["params"])
  sample = sampling.make_sample_fn(net, experiment.sigmas_from_config(config), (1,),
                                   method=method, init=experiment.sampler_init(config, method),
                                   **experiment.sampler_kwargs(config, method))
  jax.eval_shape(lambda p: sample(p, jax.random.key(0), 1), params)


def define_config_file_flag(flag_values: Any, argv: list[str], help_text: str) -> None:
  """`--config=FILE.py[:ARG]` (locked, with its `--config.GROUP.FIELD=VALUE` overrides) on the
  absl `flag_values` of a command other than main.py's (`python -m score_jax.convert`), so that
  command reads config files without importing ml_collections itself."""
  config_flags.DEFINE_config_file("config", None, help_text, flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
