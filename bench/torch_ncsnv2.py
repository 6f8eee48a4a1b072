"""PyTorch baseline for the NCSNv2 CIFAR-10 training step on CPU (compare with bench/run.py).

Measures, at batch 16 on 32x32x3 inputs with ngf 128 and 2 threads:
- one training step: DSM loss on random data in [0, 1] (sigma drawn from the 232-level geometric
  ladder 50 -> 0.01), backward, Adam(lr 1e-4) and an EMA update of the parameters (decay 0.999),
  in channels_last and in the default NCHW memory format;
- one forward pass (no_grad) in both formats;
- a 4096^2 float32 matmul, the peak that bench/NOTES.md divides by.
Each is 2 warm-up calls, then median/min/max of 5 timed calls.

The network mirrors score_jax.models.ncsn.NCSNv2 (the JAX module is the ground truth here; it
follows ermongroup/ncsnv2 `models/ncsnv2.py`) with the same 29,694,083 parameters (the script
prints both counts). Like the reference, the network divides its output by sigma, and the loss
multiplies it back: 0.5 * sum((sigma * out + z)^2) per example, averaged over the batch.

torch is not a dependency of score_jax; install a CPU build in a separate venv:
  python3.11 -m venv /tmp/tv
  /tmp/tv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
(or plain `pip install torch`), then from the repository root:
  /tmp/tv/bin/python bench/torch_ncsnv2.py
It takes about a minute on the 2-core CI machine.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from typing import Callable

# A numpy-free venv is enough; torch warns about it at import.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

NGF = 128
BATCH = 16
THREADS = 2
WARMUP, REPEATS = 2, 5
JAX_PARAMS = 29_694_083
# (width multiplier, down, dilation) per encoder stage; RefineBlock widths, deepest first.
ENCODER = ((1, False, 1), (2, True, 1), (2, True, 2), (2, True, 4))
DECODER = (2, 2, 1, 1)


def conv3x3(c_in: int, c_out: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
  return nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=bias)


class InstanceNormPlus(nn.Module):
  """Unconditional instance norm++ (N2 `InstanceNorm2dPlus`)."""

  def __init__(self, c: int):
    super().__init__()
    self.gamma = nn.Parameter(1.0 + 0.02 * torch.randn(c))
    self.alpha = nn.Parameter(1.0 + 0.02 * torch.randn(c))
    self.beta = nn.Parameter(torch.zeros(c))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    var, mu = torch.var_mean(x, dim=(2, 3), unbiased=False)
    # The alpha term uses the unbiased variance of the channel means, as torch.var in N2.
    v, m = torch.var_mean(mu, dim=1, keepdim=True)
    inv = torch.rsqrt(var + 1e-5)
    means_term = (mu - m) * torch.rsqrt(v + 1e-5) * self.alpha
    # Folded into one scale and shift so the activation is read once, not once per term.
    scale = self.gamma * inv
    shift = self.gamma * (means_term - mu * inv) + self.beta
    return x * scale[:, :, None, None] + shift[:, :, None, None]


class ResidualBlock(nn.Module):
  """Pre-activation residual block; `down` pools 2x2 or, when dilated, keeps the resolution."""

  def __init__(self, c_in: int, c_out: int, down: bool = False, dilation: int = 1):
    super().__init__()
    self.pool = down and dilation == 1
    mid = c_in if down else c_out
    self.norm1 = InstanceNormPlus(c_in)
    self.conv1 = conv3x3(c_in, mid, dilation)
    self.norm2 = InstanceNormPlus(mid)
    self.conv2 = conv3x3(mid, c_out, dilation)
    self.shortcut = None
    if down or c_in != c_out:
      k = 3 if dilation > 1 else 1
      self.shortcut = nn.Conv2d(c_in, c_out, k, padding=dilation * (k // 2), dilation=dilation)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.conv1(F.elu(self.norm1(x)))
    h = self.conv2(F.elu(self.norm2(h)))
    s = x if self.shortcut is None else self.shortcut(x)
    # Mean pooling is linear: pooling the sum equals the reference's pool(conv) + pool(shortcut).
    return F.avg_pool2d(s + h, 2) if self.pool else s + h


class RCU(nn.Module):
  """Residual conv units: `n_blocks` x (2 x [ELU, conv3x3 without bias]) + residual."""

  def __init__(self, c: int, n_blocks: int, n_stages: int = 2):
    super().__init__()
    self.n_stages = n_stages
    self.convs = nn.ModuleList(conv3x3(c, c, bias=False) for _ in range(n_blocks * n_stages))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for i in range(0, len(self.convs), self.n_stages):
      residual = x
      for conv in self.convs[i:i + self.n_stages]:
        x = conv(F.elu(x))
      x = x + residual
    return x


class CRP(nn.Module):
  """Chained residual pooling: ELU, then 2 x (max pool 5x5 stride 1, conv3x3 without bias)."""

  def __init__(self, c: int, n_stages: int = 2):
    super().__init__()
    self.convs = nn.ModuleList(conv3x3(c, c, bias=False) for _ in range(n_stages))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.elu(x)
    path = x
    for conv in self.convs:
      path = conv(F.max_pool2d(path, 5, stride=1, padding=2))
      x = x + path
    return x


class RefineBlock(nn.Module):
  """RCU per input, multi-resolution fusion (conv3x3, bilinear align_corners), CRP, output RCU."""

  def __init__(self, in_channels: list[int], features: int, end: bool = False):
    super().__init__()
    self.adapt = nn.ModuleList(RCU(c, 2) for c in in_channels)
    self.msf = nn.ModuleList(conv3x3(c, features) for c in in_channels) if len(in_channels) > 1 \
        else None
    self.crp = CRP(features)
    self.out = RCU(features, 3 if end else 1)

  def forward(self, xs: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    hs = [rcu(x) for rcu, x in zip(self.adapt, xs)]
    if self.msf is None:
      h = hs[0]
    else:
      h = 0.0
      for conv, hi in zip(self.msf, hs):
        hi = conv(hi)
        if tuple(hi.shape[-2:]) != size:
          hi = F.interpolate(hi, size=size, mode="bilinear", align_corners=True)
        h = h + hi
    return self.out(self.crp(h))


class NCSNv2(nn.Module):
  """`(x in [0, 1] [b, c, h, w], sigma [b]) -> score`, i.e. the last conv's output / sigma."""

  def __init__(self, ngf: int = NGF, channels: int = 3):
    super().__init__()
    self.begin = conv3x3(channels, ngf)
    stages, widths, c = [], [], ngf
    for mult, down, dilation in ENCODER:
      stages.append(nn.Sequential(ResidualBlock(c, mult * ngf, down, dilation),
                                  ResidualBlock(mult * ngf, mult * ngf, dilation=dilation)))
      c = mult * ngf
      widths.append(c)
    self.stages = nn.ModuleList(stages)
    refines, prev = [], None
    for k, mult in enumerate(DECODER):
      skip = widths[-1 - k]
      ins = [skip] if prev is None else [skip, prev]
      prev = mult * ngf
      refines.append(RefineBlock(ins, prev, end=k == len(DECODER) - 1))
    self.refines = nn.ModuleList(refines)
    self.norm = InstanceNormPlus(prev)
    self.end = conv3x3(prev, channels)

  def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    h = self.begin(2.0 * x - 1.0)
    skips = []
    for stage in self.stages:
      h = stage(h)
      skips.append(h)
    ref = None
    for k, refine in enumerate(self.refines):
      skip = skips[-1 - k]
      ref = refine([skip] if ref is None else [skip, ref], tuple(skip.shape[-2:]))
    return self.end(F.elu(self.norm(ref))) / sigma[:, None, None, None]


def dsm_loss(model: nn.Module, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
  sigma = sigmas[torch.randint(len(sigmas), (x.shape[0],))][:, None, None, None]
  z = torch.randn_like(x)
  out = model(x + sigma * z, sigma.flatten())
  return 0.5 * (out * sigma + z).square().sum(dim=(1, 2, 3)).mean()


def timed(fn: Callable[[], object]) -> list[float]:
  for _ in range(WARMUP):
    fn()
  times = []
  for _ in range(REPEATS):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def report(name: str, times: list[float], unit: float = 1e3, suffix: str = "ms") -> None:
  med, lo, hi = statistics.median(times), min(times), max(times)
  print(f"{name:28s} median {med * unit:9.1f} {suffix}  (min {lo * unit:.1f}, max {hi * unit:.1f})")


def bench_model(fmt: torch.memory_format, label: str) -> None:
  torch.manual_seed(0)
  model = NCSNv2().to(memory_format=fmt)
  params = list(model.parameters())
  ema = [p.detach().clone() for p in params]
  opt = torch.optim.Adam(params, lr=1e-4)
  sigmas = torch.exp(torch.linspace(math.log(50.0), math.log(0.01), 232))
  x = torch.rand(BATCH, 3, 32, 32).contiguous(memory_format=fmt)

  def step() -> None:
    opt.zero_grad(set_to_none=True)
    dsm_loss(model, x, sigmas).backward()
    opt.step()
    with torch.no_grad():
      for e, p in zip(ema, params):
        e.lerp_(p, 1.0 - 0.999)

  sigma = sigmas[torch.randint(len(sigmas), (BATCH,))]
  x_tilde = (x + sigma[:, None, None, None] * torch.randn_like(x)).contiguous(memory_format=fmt)

  def forward() -> None:
    with torch.no_grad():
      model(x_tilde, sigma)

  report(f"train step b{BATCH} {label}", timed(step))
  report(f"forward b{BATCH} {label}", timed(forward))


def bench_matmul(n: int = 4096) -> None:
  a, b = torch.randn(n, n), torch.randn(n, n)
  times = timed(lambda: a @ b)
  med = statistics.median(times)
  print(f"matmul {n}^2 float32          median {2 * n ** 3 / med / 1e9:9.1f} GFLOP/s "
        f"({med * 1e3:.1f} ms; min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")


def main() -> None:
  torch.set_num_threads(THREADS)
  n_params = sum(p.numel() for p in NCSNv2().parameters())
  print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {BATCH}, "
        f"ngf {NGF}, 32x32x3")
  print(f"parameters: torch {n_params:,}, JAX NCSNv2 {JAX_PARAMS:,} "
        f"({'match' if n_params == JAX_PARAMS else 'MISMATCH'})")
  bench_matmul()
  bench_model(torch.channels_last, "channels_last")
  bench_model(torch.contiguous_format, "NCHW")


if __name__ == "__main__":
  main()
