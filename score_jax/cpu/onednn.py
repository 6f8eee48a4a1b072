"""oneDNN convolutions on CPU: a stride-1 'same' NHWC/HWIO convolution as one primitive.

Why (bench/NOTES.md, section 2): XLA:CPU in jax 0.10.2 runs float32 2-D convolutions in YNNPACK
(or Eigen), ~10-20% below oneDNN, the library PyTorch uses, on the 2-core CI machine. jaxlib's
x86 build carries oneDNN and XLA:CPU's runtime executes a `__onednn$convolution` custom call
(a `OneDnnConvolutionConfig` in the backend config, NHWC in and out) with it, but no pass in
the default pipeline emits that call for JAX programs. `conv_same` emits it directly.

The primitive lowers to the custom call on CPU for float32 operands when `available()` (a
one-time probe that compiles, runs and checks a small convolution; False where jaxlib lacks
oneDNN, e.g. on ARM), for bfloat16 operands when `available(jnp.bfloat16)` (the same probe, and
a CPU with native bf16 dot products, `avx512_bf16` or `amx_bf16`: there oneDNN's bf16
convolution runs ~2x its float32 one, 830-900 vs 405-450 GFLOP/s on the CI machine, accumulating
in float32 and rounding the output to bf16), and to `lax.conv_general_dilated` everywhere else
(GPU, TPU, float16, or with `SCORE_JAX_ONEDNN=0` in the environment at compile
time, the switch for A/B comparisons).
Its differentiation rules are `conv.py`'s (the map is bilinear: forward mode is the primitive
itself, and its transpose writes both gradients in forms XLA:CPU runs fast); `vmap` falls back to
the lax convolution.

Cost analysis: XLA counts no FLOPs for custom calls; `bench/workloads.py` adds them back.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from score_jax import parallel


TARGET = "__onednn$convolution"

conv_same_p = Primitive("onednn_conv_same")


def _lax_conv_same(x, w, *, dilation: int):
  pad = dilation * (w.shape[0] // 2)
  return lax.conv_general_dilated(x, w, (1, 1), [(pad, pad)] * 2,
                                  rhs_dilation=(dilation, dilation),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_same(x: jax.Array, w: jax.Array, dilation: int = 1) -> jax.Array:
  """Stride-1 NHWC/HWIO convolution with padding dilation * (k // 2) (odd square kernel)."""
  return conv_same_p.bind(*parallel.same_varying(x, w), dilation=dilation)


def _abstract_eval(x, w, *, dilation):
  del dilation
  return x.update(shape=x.shape[:3] + (w.shape[3],))  # x's sharding and varying axes


def backend_config(kernel_shape: tuple[int, ...], dilation: int) -> str:
  """The `BackendConfig` JSON for NHWC input/output and an HWIO kernel of `kernel_shape`.

  Convention of XLA's `ExecuteOneDnnConvolution` (jaxlib 0.10.2): dimension indices as they
  are, padding and strides as they are, `window_dilations` = dilation (oneDNN's is one less).
  The runtime reads the kernel's shape from its buffer; `filter.shape` and `window.size` are
  recorded for `flops` only (the runtime reads them only for prepacked weights, not used here).
  """
  k = kernel_shape[0]
  pad = dilation * (k // 2)
  return json.dumps({"onednn_conv_config": {
      "dims": 4,
      "input": {"data": {"batch_dim": 0, "feature_dim": 3, "spatial_dims": [1, 2]}},
      "kernel": {"filter": {"input_feature_dim": 2, "output_feature_dim": 3,
                            "spatial_dims": [0, 1], "shape": list(kernel_shape)}},
      "output": {"data": {"batch_dim": 0, "feature_dim": 3, "spatial_dims": [1, 2]}},
      "window": {"size": [k, k], "pad_left": [pad, pad], "pad_right": [pad, pad],
                 "strides": [1, 1], "window_dilations": [dilation, dilation]},
      "feature_groups": 1}})


def flops(hlo_text: str) -> float:
  """FLOPs of the oneDNN convolutions in a compiled module's text, counted as XLA's cost
  analysis counts a convolution (2 per multiply-add, taps that read padding excluded), which
  gives custom calls none. Like XLA's, a loop body counts once."""
  total = 0.0
  for line in hlo_text.splitlines():
    if f'custom_call_target="{TARGET}"' not in line:
      continue
    out = re.search(r"= (?:f32|bf16)\[(\d+),(\d+),(\d+),(\d+)\]", line)
    cfg = json.loads(re.search(r"backend_config=(\{.*\})\s*$", line).group(1))
    conv = cfg["onednn_conv_config"]
    k, _, cin, cout = (int(v) for v in conv["kernel"]["filter"]["shape"])
    d = int(conv["window"]["window_dilations"][0])
    pad = int(conv["window"]["pad_left"][0])
    b, h, w = (int(v) for v in out.groups()[:3])
    taps = [sum(1 for i in range(n) for t in range(k) if 0 <= i - pad + t * d < n) for n in (h, w)]
    total += 2.0 * b * cin * cout * taps[0] * taps[1]
  return total


def _custom_call_lowering(ctx, x, w, *, dilation):
  aval_x, aval_w = ctx.avals_in
  if not (aval_x.dtype == aval_w.dtype and enabled(_PROBE, aval_x.dtype)):
    return mlir.lower_fun(functools.partial(_lax_conv_same, dilation=dilation),
                          multiple_results=False)(ctx, x, w)
  # XLA's runtime reads the legacy (api_version 1) form: a JSON backend config, no attributes.
  return jax.ffi.ffi_lowering(TARGET, api_version=1,
                              backend_config=backend_config(aval_w.shape, dilation))(ctx, x, w)


def _batch(args, dims, *, dilation):
  out = jax.vmap(functools.partial(_lax_conv_same, dilation=dilation), in_axes=dims)(*args)
  return out, 0


def jit_impl(primitive: Primitive):
  """An eager implementation of `primitive`: bind it inside `jax.jit` (so its lowering runs),
  one jitted function per set of parameters, so that eager calls reuse their compilation."""
  @functools.cache
  def jitted(params: tuple):
    return jax.jit(functools.partial(primitive.bind, **dict(params)))

  def impl(*args, **params):
    return jitted(tuple(sorted(params.items())))(*args)
  return impl


conv_same_p.def_abstract_eval(_abstract_eval)
conv_same_p.def_impl(jit_impl(conv_same_p))
mlir.register_lowering(conv_same_p, mlir.lower_fun(_lax_conv_same, multiple_results=False))
mlir.register_lowering(conv_same_p, _custom_call_lowering, platform="cpu")
batching.primitive_batchers[conv_same_p] = _batch

_PROBE: dict[str, bool] = {}  # dtype name -> the custom call works for it here
# Tolerance of the probe against XLA's float32 convolution of the same (rounded) inputs.
_PROBE_TOL = {"float32": 1e-4, "bfloat16": 2e-2}


def enabled(flags: dict[str, bool], dtype) -> bool:
  """Whether a custom call probed into `flags` (see `probe`) lowers for `dtype` now: it passed
  its probe and `SCORE_JAX_ONEDNN` is not "0"."""
  return (os.environ.get("SCORE_JAX_ONEDNN", "1") != "0"
          and flags.get(jnp.dtype(dtype).name, False))


def _cpu_has_native_bf16() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
  except OSError:
    return False
  return "avx512_bf16" in flags or "amx_bf16" in flags


def probe(flags: dict[str, bool], dtype, ours: Callable, reference: Callable,
          shapes: Sequence[tuple[int, ...]], what: str, prepare: Callable | None = None) -> bool:
  """Whether a oneDNN custom call works here for `dtype`, tried once and recorded in `flags`
  (dtype name -> bool), which the call's lowering reads. Shared by this module and
  `onednn_wgrad`.

  `ours` (lowered with the custom call while the probe runs) must match `reference` run in
  float32 on the same random inputs of `shapes`, rounded to `dtype`, within `_PROBE_TOL`;
  bfloat16 also needs native bf16 dot products. `prepare` runs first (e.g. a build). Any failure
  means False, logged at INFO with the reason; float16 and other dtypes are always False.
  """
  name = jnp.dtype(dtype).name
  if name not in _PROBE_TOL:
    return False
  if name not in flags:
    flags[name] = False  # lowered as lax while probing, and if anything fails
    log = logging.getLogger(__name__)
    try:
      if name == "bfloat16" and not _cpu_has_native_bf16():
        raise RuntimeError("no native bf16 dot products (avx512_bf16/amx_bf16) on this CPU")
      if prepare is not None:
        prepare()
      # Usually first asked while a jitted function is being traced: run the probe eagerly.
      with jax.ensure_compile_time_eval():
        cpu = jax.devices("cpu")[0]
        rng = np.random.default_rng(0)
        args = [jax.device_put(rng.standard_normal(shape).astype(dtype), cpu) for shape in shapes]
        want = np.asarray(jax.jit(reference)(*(a.astype(jnp.float32) for a in args)))
        flags[name] = True
        got = jax.jit(ours)(*args)
        tol = _PROBE_TOL[name]
        flags[name] = bool(got.dtype == args[0].dtype and np.allclose(
            np.asarray(got, np.float32), want, rtol=tol, atol=tol * np.abs(want).max()))
      if not flags[name]:
        log.info("oneDNN %s %s gave wrong values; using XLA's", name, what)
    except Exception as e:  # noqa: BLE001 - any failure means: not usable here
      log.info("oneDNN %s %s unavailable, using XLA's: %r", name, what, e)
      flags[name] = False
  return flags[name]


def available(dtype=jnp.float32) -> bool:
  """Whether the oneDNN custom call runs `dtype` convolutions correctly (and, for bfloat16,
  natively) on this CPU; probed once per dtype, cached. False for other dtypes."""
  return probe(_PROBE, dtype, functools.partial(conv_same, dilation=2),
               functools.partial(_lax_conv_same, dilation=2), [(2, 6, 6, 3), (3, 3, 3, 4)],
               "convolutions")
