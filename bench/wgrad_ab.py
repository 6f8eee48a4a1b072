"""A/B: the convolution weight gradient in oneDNN's backward-weights primitive
(`score_jax/cpu/onednn_wgrad.py`) against the Eigen form it replaced (`conv._weight_grad`),
per convolution and in the NCSNv2 CIFAR-10 training step at batch 16, interleaved so that both
see the same machine. bench/NOTES.md section 2 has the findings.

    .venv/bin/python bench/wgrad_ab.py [--step-only]

The bfloat16 step (`model.dtype='bfloat16'`) is compared too where the CPU has native bf16.
"""

import functools
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import workloads  # noqa: E402
from conv_grad import _time  # noqa: E402
from score_jax.cpu import conv, onednn_wgrad  # noqa: E402


def per_convolution():
  rs = np.random.RandomState(0)
  for b, h, c, o, d in [(16, 32, 128, 128, 1), (16, 16, 256, 256, 1), (16, 16, 256, 256, 2),
                        (16, 16, 256, 256, 4), (16, 32, 128, 256, 1)]:
    x = jnp.asarray(rs.randn(b, h, h, c), jnp.float32)
    g = jnp.asarray(rs.randn(b, h, h, o), jnp.float32)
    ours = jax.jit(functools.partial(onednn_wgrad.weight_grad, kernel_size=3, dilation=d))
    eigen = jax.jit(functools.partial(conv._weight_grad, dilation=d, pad=d,
                                      inflate=2))
    want = np.asarray(eigen(x, g))
    err = np.abs(np.asarray(ours(x, g)) - want).max() / np.abs(want).max()
    t_ours, t_eigen = _time(ours, x, g, repeats=15), _time(eigen, x, g, repeats=15)
    print(f"x {(b, h, h, c)} -> {o}, dilation {d}: oneDNN {t_ours * 1e3:.2f} ms, Eigen with "
          f"transposes {t_eigen * 1e3:.2f} ms, max relative difference {err:.1e}", flush=True)


def training_step(dtype="float32", repeats=7):
  rng, steps = jax.random.key(0), {}
  config = workloads._ncsnv2_cifar_config(dtype)
  for name, use in [("eigen", False), ("onednn", True)]:
    onednn_wgrad._PROBE[dtype] = use  # read when the step is traced
    _, _, state, step, batch = workloads._state_and_step(config, 16)
    state, _ = step(state, batch, rng)
    steps[name] = [jax.block_until_ready(state), step, batch]
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, entry in steps.items():
      state, step, batch = entry
      t0 = time.perf_counter()
      entry[0] = jax.block_until_ready(step(state, batch, rng)[0])
      times[name].append(time.perf_counter() - t0)
  for name, ts in times.items():
    print(f"{dtype} training step, weight gradient in {name}: median {statistics.median(ts):.3f} s "
          f"({' '.join(f'{t:.3f}' for t in ts)})")


if __name__ == "__main__":
  if not onednn_wgrad.available():
    sys.exit("the oneDNN weight gradient is unavailable here (see the log; `make venv`)")
  if "--step-only" not in sys.argv:
    per_convolution()
  training_step()
  if onednn_wgrad.available(jnp.bfloat16):
    training_step("bfloat16")
