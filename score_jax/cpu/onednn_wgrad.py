"""The weight gradient of a stride-1 'same' convolution in oneDNN's backward-weights primitive.

Why (bench/NOTES.md, section 2): after the forward and input-gradient convolutions moved to
oneDNN (`onednn.py`), the rest of the gap to PyTorch's CPU training step was the weight gradient.
PyTorch runs it in oneDNN's backward-weights primitive; XLA:CPU has no such call and runs it as
a convolution in Eigen (`conv._weight_grad`), with transposes around it: on the 2-core CI
machine 13-16 ms against oneDNN's 10-13 ms per 4.8 GFLOP NCSNv2 convolution.

How: `onednn_wgrad.cc`, an XLA FFI handler, is compiled on first use with the system's C++
compiler against the oneDNN 3.2 wheels pinned in requirements.txt (`onednn-cpu-gomp` and
`onednn-devel-cpu-gomp`, x86-64 Linux) and jaxlib's FFI headers, into `score_jax.cache_dir()`
(`$SCORE_JAX_CACHE`, else `~/.cache/score_jax`), named by a hash of everything that goes into
it; a file lock lets concurrent processes share one build. A cached library is loaded only if
this installation built it: its SHA-256 is recorded beside the source (`RECORDS`), not in the
cache, and the bytes loaded are the bytes checked (`build`, `_load`). `make venv` builds it once and says
whether it works (`available()`).

`weight_grad_p` lowers to the FFI call on CPU when `available()` (a one-time build, load and
probe against the lax form), and to `lax.conv_general_dilated` everywhere else: GPU, TPU, no
wheels (ARM, macOS), no compiler, a failed build or probe (logged at INFO with the reason), or
`SCORE_JAX_ONEDNN=0` at compile time, the switch shared with `onednn.py`. float32, and bfloat16
where `available(jnp.bfloat16)` (the probe and a CPU with native bf16, as for `onednn.py`:
oneDNN accumulates in float32 and rounds the gradient to bf16 once). Its derivatives and `vmap`
use the lax form (the map is bilinear in x and g).

Threads: the wheels are oneDNN's GNU OpenMP build; each call runs an OpenMP team on the XLA
thread that reaches it, of the cores (or `OMP_NUM_THREADS`) divided by the devices that run the
call at once (`_threads`). Do not set `OMP_WAIT_POLICY=ACTIVE`: spinning OpenMP threads take the
cores from XLA's pool (the b16 step 4.1 s instead of 2.5 s).

Cost analysis: XLA counts no FLOPs for custom calls; `flops` adds them back (bench/workloads.py).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

import score_jax
from score_jax import parallel
from score_jax.cpu import onednn

TARGET = "score_jax_onednn_weight_grad"
SOURCE = pathlib.Path(__file__).with_name("onednn_wgrad.cc")

weight_grad_p = Primitive("onednn_weight_grad")

def _lax_weight_grad(x, g, *, kernel_size: int, dilation: int):
  """dL/dw[i, j, c, o] = sum_{n,h,w} x_pad[n, h + i d, w + j d, c] g[n, h, w, o] as one lax
  convolution: x's channels as its batch, x's batch as its features, g as the kernel."""
  pad = dilation * (kernel_size // 2)
  return lax.conv_general_dilated(x, g, (dilation, dilation), [(pad, pad)] * 2,
                                  dimension_numbers=("CHWN", "IHWO", "HWNC"))


def weight_grad(x: jax.Array, g: jax.Array, kernel_size: int, dilation: int = 1) -> jax.Array:
  """The HWIO kernel gradient `[k, k, c, o]` of a stride-1 'same' NHWC convolution (odd k,
  padding dilation * (k // 2)) from its input x `[b, h, w, c]` and output gradient g
  `[b, h, w, o]`; under `shard_map`, per device (no reduction over devices)."""
  if kernel_size % 2 != 1 or x.ndim != 4 or g.shape[:3] != x.shape[:3]:
    raise ValueError(f"weight_grad needs an odd kernel_size and x [b, h, w, c], g [b, h, w, o] "
                     f"with the same b, h, w; got {kernel_size}, {x.shape}, {g.shape}")
  x, g = parallel.same_varying(x, g)
  return weight_grad_p.bind(x, g, kernel_size=kernel_size, dilation=dilation,
                            threads=_threads(x))


def _threads(x) -> int:
  """OpenMP threads per call: the cores (or `OMP_NUM_THREADS`) divided by the number of calls
  XLA runs at once, one per device of the mesh axes x varies over. Simulated CPU devices share
  the cores: with 8 of them on 2 cores, 2 threads per call made a tiny MNIST run take 81 s
  against 45 s with 1."""
  concurrent = parallel.concurrent_calls(x)
  budget = re.match(r"\s*(\d+)", os.environ.get("OMP_NUM_THREADS", ""))
  if budget:
    cores = int(budget.group(1))
  else:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, cores // concurrent)


def _abstract_eval(x, g, *, kernel_size, dilation, threads):
  del dilation, threads
  return x.update(shape=(kernel_size, kernel_size, x.shape[3], g.shape[3]))


def _lax_lowering(ctx, x, g, *, kernel_size, dilation, threads):
  del threads
  return mlir.lower_fun(functools.partial(_lax_weight_grad, kernel_size=kernel_size,
                                          dilation=dilation), multiple_results=False)(ctx, x, g)


def _cpu_lowering(ctx, x, g, *, kernel_size, dilation, threads):
  aval_x, aval_g = ctx.avals_in
  if not (aval_x.dtype == aval_g.dtype and onednn.enabled(_PROBE, aval_x.dtype)):
    return _lax_lowering(ctx, x, g, kernel_size=kernel_size, dilation=dilation, threads=threads)
  return jax.ffi.ffi_lowering(TARGET)(ctx, x, g, dilation=np.int64(dilation),
                                      threads=np.int64(threads))


def _jvp(primals, tangents, *, kernel_size, dilation, threads):
  f = functools.partial(_lax_weight_grad, kernel_size=kernel_size, dilation=dilation)
  _, tangent = jax.jvp(f, primals, tuple(ad.instantiate_zeros(t) for t in tangents))
  return weight_grad_p.bind(*primals, kernel_size=kernel_size, dilation=dilation,
                            threads=threads), tangent


def _batch(args, dims, *, kernel_size, dilation, threads):
  del threads
  f = functools.partial(_lax_weight_grad, kernel_size=kernel_size, dilation=dilation)
  return jax.vmap(f, in_axes=dims)(*args), 0


weight_grad_p.def_abstract_eval(_abstract_eval)
weight_grad_p.def_impl(onednn.jit_impl(weight_grad_p))
mlir.register_lowering(weight_grad_p, _lax_lowering)
mlir.register_lowering(weight_grad_p, _cpu_lowering, platform="cpu")
batching.primitive_batchers[weight_grad_p] = _batch
ad.primitive_jvps[weight_grad_p] = _jvp


def flops(hlo_text: str) -> float:
  """FLOPs of the weight-gradient calls in a compiled module's text, counted as XLA counts the
  forward convolution with the same taps (2 per multiply-add, taps reading padding excluded).
  Like XLA's, a loop body counts once."""
  total = 0.0
  for line in hlo_text.splitlines():
    if f'custom_call_target="{TARGET}"' not in line:
      continue
    k, _, c, o = (int(v) for v in re.search(
        r"= (?:f32|bf16)\[(\d+),(\d+),(\d+),(\d+)\]", line).groups())
    b, h, w, _ = (int(v) for v in re.search(
        r"operand_layout_constraints=\{(?:f32|bf16)\[(\d+),(\d+),(\d+),(\d+)\]", line).groups())
    d = int(re.search(r"dilation = (\d+)", line).group(1))
    pad = d * (k // 2)
    taps = [sum(1 for i in range(n) for t in range(k) if 0 <= i - pad + t * d < n) for n in (h, w)]
    total += 2.0 * b * c * o * taps[0] * taps[1]
  return total


# --- building and loading the handler -------------------------------------------------------

def _wheel_file(dist: str, suffix: str) -> pathlib.Path:
  try:
    files = importlib.metadata.files(dist) or []
  except importlib.metadata.PackageNotFoundError:
    raise RuntimeError(f"the {dist} wheel is not installed (requirements.txt pins it on x86-64 "
                       "Linux; run `make venv`)") from None
  for f in files:
    if str(f).endswith(suffix):
      return pathlib.Path(f.locate()).resolve()
  raise RuntimeError(f"{dist} has no file ending in {suffix}; reinstall it")


# What this installation built, recorded beside the source rather than in the cache: the cache
# is a directory others may write or hand over (`$SCORE_JAX_CACHE` on a shared disk, a copied
# home), so a library found there, and any digest next to it, vouch for nothing. A cached library
# is used only when its SHA-256 equals the record this installation wrote when it built it;
# otherwise it is rebuilt from SOURCE. The bytes loaded are the bytes hashed (`_load`).
RECORDS = SOURCE.parent / ".built"


def _plan() -> tuple[list[str], str]:
  """The compiler command (without its output) and the cache key naming its library."""
  if sys.platform != "linux":
    raise RuntimeError(f"the oneDNN weight gradient is built for Linux only, not {sys.platform}")
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if not compiler:
    raise RuntimeError("no C++ compiler (c++/g++ on PATH, or $CXX): install g++")
  header = _wheel_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
  include = header.parents[2]
  libdir = _wheel_file("onednn-cpu-gomp", "libdnnl.so.3").parent
  command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", f"-I{include}",
             f"-I{jax.ffi.include_dir()}", str(SOURCE), f"-L{libdir}", "-l:libdnnl.so.3",
             f"-Wl,-rpath,{libdir}"]
  key = hashlib.sha256("\0".join(
      [SOURCE.read_text(), jax.__version__, importlib.metadata.version("jaxlib"),
       importlib.metadata.version("onednn-cpu-gomp")] + command).encode()).hexdigest()[:16]
  return command, key


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _build() -> tuple[pathlib.Path, str]:
  """The cached library and the SHA-256 this installation vouches for (recorded or just built)."""
  command, key = _plan()
  cache = score_jax.cache_dir()
  cache.mkdir(parents=True, exist_ok=True)
  target = cache / f"onednn_wgrad-{key}.so"
  record = RECORDS / f"onednn_wgrad-{key}.sha256"
  with open(cache / f"onednn_wgrad-{key}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one build; other processes wait for it
    recorded = record.read_text().strip() if record.is_file() else None
    if recorded and target.is_file() and _sha256(target) == recorded:
      return target, recorded
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
      out = pathlib.Path(tmp) / target.name
      result = subprocess.run(command + ["-o", str(out)], capture_output=True, text=True)
      if result.returncode != 0:
        raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(command)}):\n"
                           f"{result.stderr[-3000:]}")
      digest = _sha256(out)
      os.replace(out, target)
    try:
      RECORDS.mkdir(exist_ok=True)
      with tempfile.NamedTemporaryFile("w", dir=RECORDS, delete=False) as f:
        f.write(digest)
      os.replace(f.name, record)
    except OSError as e:  # a read-only installation: correct, but rebuilt in every process
      logging.getLogger(__name__).info("cannot record the oneDNN weight-gradient build in %s (%s); it is rebuilt "
                   "in every process", RECORDS, e)
  return target, digest


def build() -> pathlib.Path:
  """Compiles the handler (once per source, compiler, oneDNN and jaxlib) and returns its path.

  A cached library is reused only if this installation built it (`RECORDS`); any other file at
  its place in the cache is replaced by a fresh build.

  Raises RuntimeError naming what is missing or the compiler's error."""
  return _build()[0]


def _load() -> tuple[ctypes.CDLL, pathlib.Path]:
  """Loads the verified library: its bytes are read once, checked against the vouched digest, and
  loaded from a private in-memory file, so a file swapped in after the check is never loaded."""
  path, digest = _build()
  data = path.read_bytes()
  if hashlib.sha256(data).hexdigest() != digest:
    raise RuntimeError(f"{path} changed while it was being loaded; run again to rebuild it")
  fd = os.memfd_create(path.name)
  try:
    with open(fd, "wb", closefd=False) as f:
      f.write(data)
    return ctypes.CDLL(f"/proc/self/fd/{fd}"), path
  finally:
    os.close(fd)


_PROBE: dict[str, bool] = {}  # dtype name -> the call works for it here (`onednn.probe`)


@functools.cache
def _register() -> pathlib.Path:
  """Builds and registers the handler, once per process (a failure is retried next time)."""
  library, path = _load()
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.ScoreJaxOneDnnWeightGrad),
                              platform="cpu")
  return path


def available(dtype=jnp.float32) -> bool:
  """Whether the oneDNN weight gradient is built, loaded and correct here for `dtype` (CPU;
  bfloat16 also needs native bf16 dot products); tried once per dtype and process, cached
  (`onednn.probe`). False for other dtypes."""
  return onednn.probe(_PROBE, dtype, functools.partial(weight_grad, kernel_size=3, dilation=2),
                      functools.partial(_lax_weight_grad, kernel_size=3, dilation=2),
                      [(2, 6, 5, 3), (2, 6, 5, 4)], "weight gradient", prepare=_register)
