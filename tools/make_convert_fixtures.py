"""Makes the parity fixtures of tests/test_convert.py: tiny reference networks in PyTorch.

Implements, in PyTorch, the reference architectures with the reference module names (so their
`state_dict` keys are those of released checkpoints): NCSN's `CondRefineNetDilated` (ermongroup/ncsn
`models/cond_refinenet_dilated.py`), NCSNv2's `NCSNv2` / `NCSNv2Deeper` / `NCSNv2Deepest`
(ermongroup/ncsnv2 `models/ncsnv2.py`, `models/layers.py`, `models/normalization.py`) and the
adversarial/CAS paper's DDPM UNet (AlexiaJM/AdversarialConsistentScoreMatching `models/UNet.py`),
with tiny widths, random weights and non-trivial norm parameters. Each network is wrapped in
`torch.nn.DataParallel` and saved in its runner's checkpoint layout:

- NCSN (`runners/anneal_runner.py`): `[model.state_dict(), optimizer.state_dict()]`, in the
  legacy (pre-1.6) `torch.save` format of its PyTorch 1.0 era; the others in the zip format.
- NCSNv2 and the UNet (`runners/ncsn_runner.py`, AC `runners/train_runner.py`):
  `[model.state_dict(), optimizer.state_dict(), epoch, step, ema_helper.state_dict()]`, where the
  EMA shadow is keyed by parameter name without the `module.` prefix. NCSNv2's state_dict holds
  the `sigmas` buffer.

Next to each `<name>.pth`, `<name>.npz` holds the inputs (`x` NHWC, `sigma`, `level`) and the
reference outputs computed here: `score_ema` and `score_raw` (NHWC), the score (NCSN,
NCSNv2: the network's output, divided by sigma for NCSNv2) or the raw network output (UNet, which
outputs sigma * score). The inputs are in [0, 1], the data range of all these networks; the UNet's
are 2u - 1 with u ~ U[0, 1): the AC UNet sees its [0, 1] data unrescaled (AC `models/UNet.py`
forward; `configs/cifar10_unet_9999_1e-4.yml` sets `rescaled: false`, and
`datasets/__init__.py` maps 2x - 1 only when `rescaled`), and inputs over [-1, 1] also cover the
range a wrongly inserted 2x - 1 would produce. The optimizer is Adam before its first step, so its
state is small.

torch is a tool for regenerating these files only, never a dependency of score_jax or its tests:

    python3.11 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch numpy
    /tmp/venv-torch/bin/python tools/make_convert_fixtures.py [--out tests/fixtures/convert]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 16
CHANNELS = 3


# ------------------------------------------------------------------------------------------------
# RefineNet family (NCSN, NCSNv2).


class InstanceNorm2dPlus(nn.Module):
  """Unconditional instance norm++ (NCSNv2 `models/normalization.py` `InstanceNorm2dPlus`)."""

  def __init__(self, c):
    super().__init__()
    self.instance_norm = nn.InstanceNorm2d(c, affine=False, track_running_stats=False)
    self.alpha = nn.Parameter(torch.ones(c))
    self.gamma = nn.Parameter(torch.ones(c))
    self.beta = nn.Parameter(torch.zeros(c))

  def forward(self, x, y=None):
    means = x.mean(dim=(2, 3))
    m = means.mean(dim=-1, keepdim=True)
    v = means.var(dim=-1, keepdim=True)
    means = (means - m) / torch.sqrt(v + 1e-5)
    h = self.instance_norm(x) + means[..., None, None] * self.alpha[..., None, None]
    return self.gamma.view(1, -1, 1, 1) * h + self.beta.view(1, -1, 1, 1)


class ConditionalInstanceNorm2dPlus(nn.Module):
  """Conditional instance norm++ (NCSN `ConditionalInstanceNorm2dPlus`): [gamma|alpha|beta][y]."""

  def __init__(self, c, num_classes):
    super().__init__()
    self.c = c
    self.instance_norm = nn.InstanceNorm2d(c, affine=False, track_running_stats=False)
    self.embed = nn.Embedding(num_classes, 3 * c)

  def forward(self, x, y):
    means = x.mean(dim=(2, 3))
    m = means.mean(dim=-1, keepdim=True)
    v = means.var(dim=-1, keepdim=True)
    means = (means - m) / torch.sqrt(v + 1e-5)
    gamma, alpha, beta = self.embed(y).chunk(3, dim=-1)
    h = self.instance_norm(x) + means[..., None, None] * alpha[..., None, None]
    return gamma.view(-1, self.c, 1, 1) * h + beta.view(-1, self.c, 1, 1)


def conv3x3(cin, cout, bias=True, dilation=1):
  return nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=bias)


class ConvMeanPool(nn.Module):
  def __init__(self, cin, cout, kernel_size):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2)

  def forward(self, x):
    h = self.conv(x)
    return (h[:, :, ::2, ::2] + h[:, :, 1::2, ::2] + h[:, :, ::2, 1::2] + h[:, :, 1::2, 1::2]) / 4.


class ResidualBlock(nn.Module):
  """`ResidualBlock` / `ConditionalResidualBlock` of the references (norm, act, conv) x 2."""

  def __init__(self, cin, cout, norm, down, dilation):
    super().__init__()
    self.down, self.cin, self.cout = down, cin, cout
    self.normalize1 = norm(cin)
    if down and dilation is None:
      self.conv1 = conv3x3(cin, cin)
      self.normalize2 = norm(cin)
      self.conv2 = ConvMeanPool(cin, cout, 3)
      self.shortcut = ConvMeanPool(cin, cout, 1)
    elif down:
      self.conv1 = conv3x3(cin, cin, dilation=dilation)
      self.normalize2 = norm(cin)
      self.conv2 = conv3x3(cin, cout, dilation=dilation)
      self.shortcut = conv3x3(cin, cout, dilation=dilation)
    else:
      d = dilation or 1
      self.conv1 = conv3x3(cin, cout, dilation=d)
      self.normalize2 = norm(cout)
      self.conv2 = conv3x3(cout, cout, dilation=d)
      assert cin == cout

  def forward(self, x, y):
    h = self.conv1(F.elu(self.normalize1(x, y)))
    h = self.conv2(F.elu(self.normalize2(h, y)))
    return (self.shortcut(x) if self.down else x) + h


class RCUBlock(nn.Module):
  def __init__(self, c, n_blocks, n_stages, norm):
    super().__init__()
    self.n_blocks, self.n_stages, self.cond = n_blocks, n_stages, norm is not None
    for i in range(n_blocks):
      for j in range(n_stages):
        if norm is not None:
          setattr(self, f"{i + 1}_{j + 1}_norm", norm(c))
        setattr(self, f"{i + 1}_{j + 1}_conv", conv3x3(c, c, bias=False))

  def forward(self, x, y):
    for i in range(self.n_blocks):
      residual = x
      for j in range(self.n_stages):
        if self.cond:
          x = getattr(self, f"{i + 1}_{j + 1}_norm")(x, y)
        x = getattr(self, f"{i + 1}_{j + 1}_conv")(F.elu(x))
      x = x + residual
    return x


class MSFBlock(nn.Module):
  def __init__(self, in_planes, features, norm):
    super().__init__()
    self.convs = nn.ModuleList([conv3x3(c, features) for c in in_planes])
    if norm is not None:
      self.norms = nn.ModuleList([norm(c) for c in in_planes])
    self.cond = norm is not None

  def forward(self, xs, y, shape):
    total = 0.
    for i, x in enumerate(xs):
      h = self.norms[i](x, y) if self.cond else x
      h = F.interpolate(self.convs[i](h), size=shape, mode="bilinear", align_corners=True)
      total = total + h
    return total


class CRPBlock(nn.Module):
  def __init__(self, c, n_stages, norm, maxpool):
    super().__init__()
    self.convs = nn.ModuleList([conv3x3(c, c, bias=False) for _ in range(n_stages)])
    if norm is not None:
      self.norms = nn.ModuleList([norm(c) for _ in range(n_stages)])
    self.cond = norm is not None
    self.pool = (nn.MaxPool2d(5, 1, 2) if maxpool else nn.AvgPool2d(5, 1, 2))

  def forward(self, x, y):
    x = F.elu(x)
    path = x
    for i, conv in enumerate(self.convs):
      if self.cond:
        path = self.norms[i](path, y)
      path = conv(self.pool(path))
      x = path + x
    return x


class RefineBlock(nn.Module):
  def __init__(self, in_planes, features, norm, maxpool, start=False, end=False):
    super().__init__()
    self.adapt_convs = nn.ModuleList([RCUBlock(c, 2, 2, norm) for c in in_planes])
    self.output_convs = RCUBlock(features, 3 if end else 1, 2, norm)
    if not start:
      self.msf = MSFBlock(in_planes, features, norm)
    self.crp = CRPBlock(features, 2, norm, maxpool)
    self.start = start

  def forward(self, xs, y, shape):
    hs = [a(x, y) for a, x in zip(self.adapt_convs, xs)]
    h = hs[0] if self.start else self.msf(hs, y, shape)
    return self.output_convs(self.crp(h, y), y)


class RefineNet(nn.Module):
  """NCSN `CondRefineNetDilated` (conditional=True) or NCSNv2 / NCSNv2Deeper (False).

  `stages`: per encoder stage (reference name, width multiplier, down, dilation); `refines`:
  per RefineBlock, deepest first, (reference name, output width multiplier).
  """

  def __init__(self, ngf, stages, refines, conditional, sigmas):
    super().__init__()
    L = len(sigmas)
    self.conditional = conditional
    norm = ((lambda c: ConditionalInstanceNorm2dPlus(c, L)) if conditional
            else (lambda c: InstanceNorm2dPlus(c)))
    block_norm = norm if conditional else None
    if not conditional:
      self.register_buffer("sigmas", torch.tensor(sigmas, dtype=torch.float32))
    self.begin_conv = nn.Conv2d(CHANNELS, ngf, 3, padding=1)
    self.normalizer = norm(ngf)
    self.end_conv = nn.Conv2d(ngf, CHANNELS, 3, padding=1)
    self.stage_names = [s[0] for s in stages]
    self.refine_names = [r[0] for r in refines]
    c = ngf
    widths = []
    for name, mult, down, dilation in stages:
      setattr(self, name, nn.ModuleList([
          ResidualBlock(c, mult * ngf, norm, down, dilation),
          ResidualBlock(mult * ngf, mult * ngf, norm, False, dilation)]))
      c = mult * ngf
      widths.append(c)
    prev = None
    for k, (name, mult) in enumerate(refines):
      skip = widths[-1 - k]
      in_planes = [skip] if prev is None else [skip, prev]
      setattr(self, name, RefineBlock(in_planes, mult * ngf, block_norm, maxpool=not conditional,
                                      start=prev is None, end=k == len(refines) - 1))
      prev = mult * ngf

  def forward(self, x, y):
    h = self.begin_conv(2 * x - 1.)
    layers = []
    for name in self.stage_names:
      for block in getattr(self, name):
        h = block(h, y)
      layers.append(h)
    ref = None
    for k, name in enumerate(self.refine_names):
      skip = layers[-1 - k]
      xs = [skip] if ref is None else [skip, ref]
      ref = getattr(self, name)(xs, y, skip.shape[2:])
    out = self.end_conv(F.elu(self.normalizer(ref, y)))
    if not self.conditional:
      out = out / self.sigmas[y].view(-1, 1, 1, 1)
    return out


def ncsn(ngf, sigmas):
  stages = [("res1", 1, False, None), ("res2", 2, True, None), ("res3", 2, True, 2),
            ("res4", 2, True, 4)]
  refines = [("refine1", 2), ("refine2", 2), ("refine3", 1), ("refine4", 1)]
  return RefineNet(ngf, stages, refines, True, sigmas)


def ncsnv2(ngf, sigmas):
  stages = [("res1", 1, False, None), ("res2", 2, True, None), ("res3", 2, True, 2),
            ("res4", 2, True, 4)]
  refines = [("refine1", 2), ("refine2", 2), ("refine3", 1), ("refine4", 1)]
  return RefineNet(ngf, stages, refines, False, sigmas)


def ncsnv2_deeper(ngf, sigmas):
  stages = [("res1", 1, False, None), ("res2", 2, True, None), ("res3", 2, True, None),
            ("res4", 4, True, 2), ("res5", 4, True, 4)]
  refines = [("refine1", 4), ("refine2", 2), ("refine3", 2), ("refine4", 1), ("refine5", 1)]
  return RefineNet(ngf, stages, refines, False, sigmas)


def ncsnv2_deepest(ngf, sigmas):
  """The reference's extra stage `res31` / `refine31` runs after `res3` / before `refine3`."""
  stages = [("res1", 1, False, None), ("res2", 2, True, None), ("res3", 2, True, None),
            ("res31", 2, True, None), ("res4", 4, True, 2), ("res5", 4, True, 4)]
  refines = [("refine1", 4), ("refine2", 2), ("refine31", 2), ("refine3", 2), ("refine4", 1),
             ("refine5", 1)]
  return RefineNet(ngf, stages, refines, False, sigmas)


# ------------------------------------------------------------------------------------------------
# The AC UNet (DDPM layout, unconditional).


def group_norm(c):
  return nn.GroupNorm(32, c, eps=1e-6)


class Nin(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.weights = nn.Parameter(torch.randn(cout, cin) / math.sqrt(cin))
    self.bias = nn.Parameter(torch.zeros(cout))

  def forward(self, x):
    return torch.einsum("oi,bihw->bohw", self.weights, x) + self.bias[None, :, None, None]


class ResnetBlock(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.normalize0 = group_norm(cin)
    self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
    self.normalize1 = group_norm(cout)
    self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
    self.nin = Nin(cin, cout) if cin != cout else nn.Identity()

  def forward(self, x):
    h = self.conv0(F.silu(self.normalize0(x)))
    h = F.silu(self.normalize1(h))
    return self.nin(x) + self.conv1(h)


class AttnBlock(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.Q, self.K, self.V, self.OUT = Nin(c, c), Nin(c, c), Nin(c, c), Nin(c, c)
    self.normalize = group_norm(c)
    self.c = c

  def forward(self, x):
    b, c, hh, ww = x.shape
    h = self.normalize(x)
    q, k, v = self.Q(h), self.K(h), self.V(h)
    w = torch.einsum("bcij,bckl->bijkl", q, k) / math.sqrt(c)
    w = F.softmax(w.reshape(b, hh, ww, hh * ww), dim=-1).reshape(b, hh, ww, hh, ww)
    h = torch.einsum("bijkl,bckl->bcij", w, v)
    return x + self.OUT(h)


class Upsample(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
  """The AC UNet with `ch_mult` as a parameter (attention at level index 1 and in the middle)."""

  def __init__(self, ch, ch_mult):
    super().__init__()
    widths = [ch * m for m in ch_mult]
    self.downblocks = nn.ModuleList([nn.Conv2d(CHANNELS, ch, 3, padding=1)])
    sizes = [ch]
    prev = widths[0]
    for i, w in enumerate(widths):
      for cin in (prev, w):
        self.downblocks.append(ResnetBlock(cin, w))
        sizes.append(w)
        if i == 1:
          self.downblocks.append(AttnBlock(w))
      if i != len(widths) - 1:
        self.downblocks.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
        sizes.append(w)
      prev = w
    self.middleblocks = nn.ModuleList([ResnetBlock(widths[-1], widths[-1]),
                                       AttnBlock(widths[-1]),
                                       ResnetBlock(widths[-1], widths[-1])])
    self.upblocks = nn.ModuleList()
    prev = widths[-1]
    for i, w in reversed(list(enumerate(widths))):
      for _ in range(3):
        self.upblocks.append(ResnetBlock(prev + sizes.pop(), w))
        if i == 1:
          self.upblocks.append(AttnBlock(w))
        prev = w
      if i != 0:
        self.upblocks.append(Upsample(w))
    self.normalize = group_norm(ch)
    self.out = nn.Conv2d(ch, CHANNELS, 3, padding=1)
    # Present in every reference UNet, used only by the conditional (time-embedding) variant.
    self.temb_dense = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch),
                                    nn.SiLU())

  def forward(self, x, y=None):
    del y  # unconditional; and no rescaling of the input, as the reference
    hs = []
    for m in self.downblocks:
      x = m(x)
      if isinstance(m, AttnBlock):
        hs.pop()
      hs.append(x)
    for m in self.middleblocks:
      x = m(x)
    for m in self.upblocks:
      x = m(torch.cat([x, hs.pop()], 1)) if isinstance(m, ResnetBlock) else m(x)
    return self.out(F.silu(self.normalize(x)))


# ------------------------------------------------------------------------------------------------


def quantize(t: torch.Tensor) -> torch.Tensor:
  """Rounds to multiples of 2^-7: exact in float32 and few distinct bytes, so the deflated
  checkpoint stays small (the fixtures live in the repository)."""
  return torch.round(t * 128.0) / 128.0


def randomize(model: nn.Module, gen: torch.Generator) -> None:
  """Random weights of a trained-looking scale; norm parameters far from their init values."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if p.ndim >= 2 and "embed" not in name and "weights" not in leaf:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / math.sqrt(fan_in)))
      elif p.ndim == 2 and "weights" in leaf:
        p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / math.sqrt(p.shape[1])))
      elif "embed" in name:
        c = p.shape[1] // 3
        p[:, :2 * c] = 1.0 + 0.3 * torch.randn(p.shape[0], 2 * c, generator=gen)
        p[:, 2 * c:] = 0.3 * torch.randn(p.shape[0], c, generator=gen)
      elif leaf in ("gamma", "alpha") or (leaf == "weight" and p.ndim == 1):
        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
      p.copy_(quantize(p))


def deflate(path: str) -> None:
  """Rewrites a `torch.save` zip with deflated members (torch.load reads those as well)."""
  with zipfile.ZipFile(path) as z:
    members = [(info.filename, z.read(info.filename)) for info in z.infolist()]
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
    for filename, data in members:
      # A fixed date, so regenerating gives the same bytes.
      info = zipfile.ZipInfo(filename, date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      z.writestr(info, data, compresslevel=9)
  torch.load(path, weights_only=True)  # still a checkpoint torch reads


def write(out: str, name: str, net: nn.Module, *, sigmas, levels, ema: bool, seed: int,
          meta: dict, legacy: bool = False, wide_inputs: bool = False) -> None:
  """Saves `net` (random weights) in its runner's layout and its outputs on fixed inputs.

  `legacy`: the pre-1.6 `torch.save` format, as checkpoints of the PyTorch 1.0 era (NCSN v1)
  were written; otherwise the zip format, with deflated members. `wide_inputs`: inputs in
  [-1, 1) instead of [0, 1).
  """
  gen = torch.Generator().manual_seed(seed)
  randomize(net, gen)
  model = nn.DataParallel(net)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
  x = torch.rand(len(levels), CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
  if wide_inputs:
    x = 2 * x - 1
  y = torch.tensor(levels, dtype=torch.long)
  with torch.no_grad():
    score_raw = net(x, y).numpy()
    states = [model.state_dict(), optimizer.state_dict()]
    score_ema = score_raw
    if ema:
      # The EMA helper's state_dict: the shadow, keyed by parameter name without `module.`.
      shadow = {n: quantize(p.detach() + 0.05 * torch.randn(p.shape, generator=gen))
                for n, p in net.named_parameters()}
      raw = {n: p.detach().clone() for n, p in net.named_parameters()}
      for n, p in net.named_parameters():
        p.copy_(shadow[n])
      score_ema = net(x, y).numpy()
      for n, p in net.named_parameters():
        p.copy_(raw[n])
      states += [3, 1000, shadow]
  path = os.path.join(out, f"{name}.pth")
  if legacy:
    torch.save(states, path, _use_new_zipfile_serialization=False)
    torch.load(path, weights_only=True)
  else:
    torch.save(states, path)
    deflate(path)
  nhwc = lambda a: np.ascontiguousarray(np.transpose(a, (0, 2, 3, 1)))
  np.savez(os.path.join(out, f"{name}.npz"), x=nhwc(x.numpy()),
           sigma=np.asarray(sigmas, np.float32)[levels], level=np.asarray(levels, np.int32),
           score_raw=nhwc(score_raw), score_ema=nhwc(score_ema),
           meta=np.asarray(json.dumps(meta)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                    "fixtures", "convert"))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  torch.set_default_dtype(torch.float32)
  sigmas = np.geomspace(1.0, 0.01, 4)
  meta = dict(image_size=IMAGE_SIZE, num_channels=CHANNELS, sigma_max=1.0, sigma_min=0.01,
              num_scales=4)
  write(args.out, "ncsn", ncsn(4, sigmas), sigmas=sigmas, levels=[0, 2, 3], ema=False,
        seed=1, meta=dict(meta, source="ncsn", ngf=4), legacy=True)
  write(args.out, "ncsnv2", ncsnv2(4, sigmas), sigmas=sigmas, levels=[0, 1, 3], ema=True,
        seed=2, meta=dict(meta, source="ncsnv2", ngf=4))
  write(args.out, "ncsnv2_deeper", ncsnv2_deeper(2, sigmas), sigmas=sigmas, levels=[1, 3],
        ema=True, seed=3, meta=dict(meta, source="ncsnv2_deeper", ngf=2))
  write(args.out, "ncsnv2_deepest", ncsnv2_deepest(2, sigmas), sigmas=sigmas, levels=[0, 2],
        ema=True, seed=5, meta=dict(meta, source="ncsnv2_deepest", ngf=2))
  write(args.out, "ac_unet", UNet(32, (1, 1)), sigmas=sigmas, levels=[0, 3], ema=True, seed=4,
        meta=dict(meta, source="ac_unet", ngf=32, ch_mult=[1, 1], attn_resolutions=[8]),
        wide_inputs=True)


if __name__ == "__main__":
  main()
