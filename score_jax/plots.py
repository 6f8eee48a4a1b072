"""PNG outputs: image grids, toy scatters, per-level sampler trajectories, metric curves."""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import matplotlib
from matplotlib.figure import Figure  # pyplot-free: no global backend switch, notebooks keep theirs
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from score_jax import paths


def _save_png(image: Image.Image, path: str) -> None:
  """Writes `image` as PNG to `path` (local or URL), creating the folder."""
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  paths.write_bytes(path, buf.getvalue())


def _savefig(fig: Figure, path: str) -> None:
  """Writes `fig` as PNG to `path` (local or URL), creating the folder."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  paths.write_bytes(path, buf.getvalue())


def to_uint8(x: np.ndarray, *, centered: bool = False) -> np.ndarray:
  """Images in [0, 1] (or [-1, 1] if centered) to uint8, clipping out-of-range values."""
  x = np.asarray(x, np.float32)
  if centered:
    x = (x + 1.0) / 2.0
  return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_grid(x: np.ndarray, *, ncol: int | None = None, pad: int = 2,
               centered: bool = False) -> np.ndarray:
  """Tiles `[n, h, w, c]` images into one `[H, W, c]` uint8 grid."""
  x = to_uint8(x, centered=centered)
  n, h, w, c = x.shape
  ncol = ncol or int(np.ceil(np.sqrt(n)))
  nrow = int(np.ceil(n / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, k = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = x[i]
  return grid


def save_image_grid(x: np.ndarray, path: str, *, ncol: int | None = None,
                    centered: bool = False) -> None:
  grid = image_grid(x, ncol=ncol, centered=centered)
  _save_png(Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid), path)


def save_intermediates(saved: np.ndarray, path: str, *, centered: bool = False) -> None:
  """`saved` `[levels, n, h, w, c]`: one row per sample, one column per saved level."""
  levels, n = saved.shape[:2]
  tiles = np.transpose(saved, (1, 0, 2, 3, 4)).reshape(n * levels, *saved.shape[2:])
  save_image_grid(tiles, path, ncol=levels, centered=centered)


def save_inpainting_grid(masked: np.ndarray, completed: np.ndarray, path: str, *,
                         centered: bool = False) -> None:
  """Rows of masked inputs, each followed by its completion."""
  n = min(len(masked), 8)
  pairs = np.stack([masked[:n], completed[:n]], axis=1).reshape(2 * n, *masked.shape[1:])
  save_image_grid(pairs, path, ncol=2 * min(n, 4), centered=centered)


def save_toy_comparison(truth: np.ndarray, samples: Mapping[str, np.ndarray], path: str, *,
                        nfe: Mapping[str, float | None] | None = None) -> None:
  """Scatter (2-D) or histogram (1-D) panels: ground truth, then each sampler.

  `nfe` (network evaluations per sample, by sampler) goes into the sampler panels' titles.
  """
  nfe = nfe or {}
  title = lambda k: k.upper() if nfe.get(k) is None else f"{k.upper()} ({nfe[k]:.4g} NFE)"
  panels = {"ground truth": truth, **{title(k): v for k, v in samples.items()}}
  fig = Figure(figsize=(4 * len(panels), 4))
  axes = fig.subplots(1, len(panels), squeeze=False)
  finite = truth[np.isfinite(truth).all(axis=1)]
  lo, hi = finite.min(0) - 1.0, finite.max(0) + 1.0
  for ax, (name, x) in zip(axes[0], panels.items()):
    x = x[np.isfinite(x).all(axis=1)]
    if x.shape[1] == 1:
      ax.hist(x[:, 0], bins=80, range=(lo[0], hi[0]), density=True, color="tab:blue")
    else:
      ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4)
      ax.set_xlim(lo[0], hi[0])
      ax.set_ylim(lo[1], hi[1])
      ax.set_aspect("equal")
    ax.set_title(name)
  fig.tight_layout()
  _savefig(fig, path)


def save_trajectories(trajectories: Mapping[str, Mapping[str, np.ndarray] | None], path: str) -> None:
  """Writes `trajectory_figure(trajectories)` to `path` (nothing when there is nothing to plot)."""
  fig = trajectory_figure(trajectories)
  if fig is not None:
    _savefig(fig, path)


def trajectory_figure(trajectories: Mapping[str, Mapping[str, np.ndarray] | None]
                      ) -> Figure | None:
  """Per-level statistics of each sampler against its noise level sigma (one panel per
  statistic, one line per sampler); None without statistics.

  The x axis is sigma (log scale, decreasing to the right, as sampling proceeds), not the level
  index: samplers step through different ladders (ALS's 20 trained levels, CAS's 191 steps,
  Heun's 50), and sigma puts their points where they are comparable.
  """
  trajectories = {k: v for k, v in trajectories.items() if v and "sigma" in v}
  keys = sorted({k for t in trajectories.values() for k, v in t.items()
                 if k not in ("samples", "sigma") and np.ndim(v) == 1})
  if not keys:
    return None
  fig = Figure(figsize=(4 * len(keys), 3.5))
  axes = fig.subplots(1, len(keys), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for name, t in trajectories.items():
      if key in t:
        ax.plot(np.asarray(t["sigma"]), np.asarray(t[key]), marker=".", markersize=3,
                label=f"{name.upper()} ({len(t[key])} levels)")
    if key == "noise_std":
      sigma = np.concatenate([np.asarray(t["sigma"]) for t in trajectories.values()])
      ends = np.array([sigma.max(), sigma.min()])
      ax.plot(ends, ends, "k--", label="sigma (target)")
    if key in ("noise_std", "x_std", "score_norm"):
      ax.set_yscale("log")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_title(key)
    ax.set_xlabel("sigma")
    ax.legend(fontsize="small")
  fig.tight_layout()
  return fig


def save_metric_panels(xs: Sequence[float], panels: Mapping[str, Sequence[float]], path: str, *,
                       xlabel: str, errors: Mapping[str, Sequence[float]] | None = None) -> None:
  """One panel per metric, in the given order (put the main metric first), each against `xs`.

  Args:
    xs: the x value of each point (e.g. checkpoint steps).
    panels: metric name -> one y per x; NaN marks a missing value (a gap in the line).
    path: the PNG to write.
    xlabel: label of every panel's x axis.
    errors: metric name -> one error-bar half-width per x (e.g. KID's std), optional.
  """
  errors = errors or {}
  fig = Figure(figsize=(4 * max(len(panels), 1), 3.5))
  axes = fig.subplots(1, max(len(panels), 1), squeeze=False)
  for ax, (name, ys) in zip(axes[0], panels.items()):
    ax.errorbar(np.asarray(xs, np.float64), np.asarray(ys, np.float64),
                yerr=None if name not in errors else np.asarray(errors[name], np.float64),
                marker="o", capsize=3)
    ax.set_title(name)
    ax.set_xlabel(xlabel)
  fig.tight_layout()
  _savefig(fig, path)


def save_lines(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str, *,
               xlabel: str, ylabel: str, logx: bool = False,
               levels: Mapping[str, float] | None = None) -> None:
  """One line per name, each with its own x values; `levels` are dashed horizontal lines.

  Args:
    curves: name -> `(xs, ys)`; NaN ys leave gaps.
    path: the PNG to write.
    xlabel: x axis label.
    ylabel: y axis label.
    logx: log-scale x axis.
    levels: name -> y, for settings that have no x value (e.g. a sampler without step_lr).
  """
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for i, (name, (xs, ys)) in enumerate(curves.items()):
    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    order = np.argsort(xs)
    ax.plot(xs[order], ys[order], marker="o", color=colors[i % len(colors)], label=name)
  for i, (name, y) in enumerate((levels or {}).items(), start=len(curves)):
    ax.axhline(y, linestyle="--", color=colors[i % len(colors)], label=name)
  if logx:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if curves or levels:
    ax.legend(fontsize="small")
  fig.tight_layout()
  _savefig(fig, path)


def density_grid(lo: Sequence[float], hi: Sequence[float], n: int) -> np.ndarray:
  """`[n * n, 2]` points of an n x n grid over [lo_0, hi_0] x [lo_1, hi_1], rows along axis 1.

  Reshape values at these points with `.reshape(n, n)` to get `[axis-1 index, axis-0 index]`,
  the orientation `save_log_density` expects.
  """
  if int(n) < 2:
    raise ValueError(f"n={n} must be >= 2 grid points per axis")
  g0 = np.linspace(lo[0], hi[0], int(n))
  g1 = np.linspace(lo[1], hi[1], int(n))
  a, b = np.meshgrid(g0, g1)
  return np.stack([a.ravel(), b.ravel()], axis=1).astype(np.float32)


def save_log_density(panels: Mapping[str, np.ndarray], path: str, *, lo: Sequence[float],
                     hi: Sequence[float], sigma_min: float | None = None,
                     floor: float | None = None) -> None:
  """Log-densities of 2-D toys on a grid side by side (e.g. a model's beside the true one).

  Every panel shares one color scale; when exactly two panels are given a third shows the first
  minus the second (e.g. model - truth when the model comes first), in nats.

  Args:
    panels: name -> `[n, n]` log-density on the grid of `density_grid(lo, hi, n)`.
    path: the PNG to write.
    lo: lower corner of the grid.
    hi: upper corner of the grid.
    sigma_min: if given, titles say that the densities are of the data convolved with
      N(0, sigma_min^2 I).
    floor: lowest log-density shown (default: 12 nats below the highest value).
  """
  if not panels:
    raise ValueError("save_log_density needs at least one panel")
  arrays = {k: np.asarray(v, np.float64) for k, v in panels.items()}
  shapes = {v.shape for v in arrays.values()}
  if len(shapes) != 1 or len(next(iter(shapes))) != 2:
    raise ValueError(f"panels must be [n, n] arrays of one shape; got {sorted(shapes)}")
  top = max(np.nanmax(v) for v in arrays.values())
  floor = top - 12.0 if floor is None else floor
  extent = (lo[0], hi[0], lo[1], hi[1])
  names = list(arrays)
  extra = len(names) == 2
  fig = Figure(figsize=(4.2 * (len(names) + extra), 4))
  axes = fig.subplots(1, len(names) + extra, squeeze=False)[0]
  suffix = f"\nlog p (data * N(0, {sigma_min:g}^2 I))" if sigma_min is not None else ""
  for ax, name in zip(axes, names):
    im = ax.imshow(np.clip(arrays[name], floor, top), origin="lower", extent=extent,
                   vmin=floor, vmax=top, cmap="viridis", aspect="equal")
    ax.set_title(name + suffix, fontsize="small")
  fig.colorbar(im, ax=list(axes[:len(names)]), shrink=0.8)
  if extra:
    diff = arrays[names[0]] - arrays[names[1]]
    lim = max(float(np.nanmax(np.abs(diff))), 1e-12)
    im = axes[-1].imshow(diff, origin="lower", extent=extent, vmin=-lim, vmax=lim,
                         cmap="coolwarm", aspect="equal")
    axes[-1].set_title(f"{names[0]} - {names[1]} (nats)", fontsize="small")
    fig.colorbar(im, ax=axes[-1], shrink=0.8)
  _savefig(fig, path)
