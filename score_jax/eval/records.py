"""Evaluation records: which entries are already evaluated, and the table, CSV and plot of rows.

A row is one evaluation: its settings (`SETTING_COLUMNS`: checkpoint step, sampler settings,
number of samples, feature space, seed) and its measurements. Rows are stored one per line in
`<workdir>/<name>.jsonl` by `MetricWriter`; `entry_key` says which stored row stands in for an
entry, so interrupted evaluations resume. Pure functions of rows, plus the writers.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Callable


from score_jax import paths as storage
from score_jax import plots
from score_jax.metric_writers import MetricWriter

# The sampler settings of a row (`SamplerSpec.settings` of the run's Experiment): part of what
# identifies an entry.
# Every sampler's arguments are listed (tests/test_evaluate.py checks that against the config's
# sampler groups): two settings that differ only in a knob left out here would share one row.
SETTING_KEYS = ("method", "step_lr", "steps_per_sigma", "n_sigma", "snr", "corrector_steps",
                "denoise", "init", "eta", "ladder", "num_steps", "rho", "sigma_max", "sigma_min",
                "s_churn", "s_tmin", "s_tmax", "s_noise", "abs_tol", "rel_tol", "h_init", "safety",
                "exponent", "h_max_factor", "max_iters", "noise")
# What a row was evaluated at, as opposed to what it measured (the CSV's first columns).
# What a row was measured against: the feature network's weights and the reference statistics
# (digests; absent for toys, whose reference is the exact distribution).
IDENTITY_KEYS = ("features_digest", "reference_digest")
SETTING_COLUMNS = ("step", *SETTING_KEYS, "num_samples", "features", "seed", "protocol",
                   *IDENTITY_KEYS)


# --------------------------------------------------------------------------------------------
# Resuming: which entries are already in the JSON lines.


def entry_key(row: dict) -> tuple:
  """What identifies an evaluation: step, sampler settings, sample count, features, seed, reference.

  Two rows with the same key measure the same thing (every draw's keys fold from the run's seed),
  so a stored row stands in for a rerun. Knobs a row lacks count as None; `features` is part of
  the key because one checkpoint's FID in Inception and in MNIST-classifier space differ, and
  the digests of the feature weights and of the reference statistics are, so that new weights
  or another reference set evaluate again.

  Args:
    row: an entry or a stored JSON row with `step`, `num_samples`, `features` and the
      `SETTING_KEYS` (and `IDENTITY_KEYS` for image features).

  Returns:
    `(step, *SETTING_KEYS values, num_samples, features, seed, features_digest,
    reference_digest)`.
  """
  return (int(row["step"]), *(_hashable(row.get(k)) for k in SETTING_KEYS),
          int(row["num_samples"]), row.get("features"), row.get("seed"),
          *(row.get(k) for k in IDENTITY_KEYS))


def _hashable(v: Any) -> Any:
  # A per-level eta is a tuple in an entry and a list in its stored JSON row.
  return tuple(v) if isinstance(v, (list, tuple)) else v


def _from_json(v: Any) -> Any:
  # MetricWriter stores non-finite floats as strings; read them back as floats.
  return float(v) if isinstance(v, str) and v in ("nan", "inf", "-inf") else v


def stored_rows(path: str) -> dict[tuple, dict]:
  """The rows of a metrics `.jsonl` by `entry_key` (a later row wins); {} if there is no file.

  Lines that do not parse (a write cut off by a kill) and rows without a step or a sample count
  are ignored: their entries are evaluated again.
  """
  if not storage.isfile(path):
    return {}
  rows: dict[tuple, dict] = {}
  with storage.open_file(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and "step" in row and "num_samples" in row:
        row = {k: _from_json(v) for k, v in row.items()}
        rows[entry_key(row)] = row
  return rows


# --------------------------------------------------------------------------------------------
# Tables, CSV, plots.


def is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def as_float(v: Any) -> float:
  return float(v) if is_number(v) else math.nan


def rank_key(main: str) -> Callable[[dict], float]:
  def key(row: dict) -> float:
    v = row.get(main)
    return v if is_number(v) and math.isfinite(v) else math.inf
  return key


def format_table(rows: list[dict], columns: list[str]) -> str:
  """A fixed-width text table of `columns` (missing values print as '-')."""

  def cell(v: Any) -> str:
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)

  cells = [[cell(r.get(c)) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
  lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
  return "\n".join(lines)


def table_metric_columns(rows: list[dict], main: str) -> list[str]:
  order = [main, "energy_distance", "kid", "kid_std", "kid_mnist", "kid_mnist_std",
           "inception_score", "finite_fraction", "seconds"]
  return [c for c in order if any(c in r for r in rows)]


def metric_names(rows: list[dict], main: str) -> list[str]:
  """Every measured key of the rows: the main metric first, then the others alphabetically.

  Settings (`SETTING_COLUMNS`) and the JSON rows' write time are not metrics. The order does not
  depend on whether a row is fresh or read back from the JSON lines (which reorders keys).
  """
  others = {k for r in rows for k in r} - {main, "time", *SETTING_COLUMNS}
  return ([main] if any(main in r for r in rows) else []) + sorted(others)


def csv_columns(rows: list[dict], main: str) -> list[str]:
  """Columns of the CSV table: `SETTING_COLUMNS`, then `metric_names`."""
  return [*SETTING_COLUMNS, *metric_names(rows, main)]


def csv_cell(v: Any) -> str:
  """A value as a CSV cell: None is empty, lists are JSON, numbers keep full precision."""
  if v is None:
    return ""
  if isinstance(v, (list, tuple, dict)):
    return json.dumps(v)
  if isinstance(v, float):
    return repr(v)
  return str(v)


def write_csv(rows: list[dict], columns: list[str], path: str) -> None:
  """One CSV line per row (a header of `columns` first), written atomically."""
  f = io.StringIO(newline="")
  writer = csv.writer(f)
  writer.writerow(columns)
  for r in rows:
    writer.writerow([csv_cell(r.get(c)) for c in columns])
  storage.write_text(path, f.getvalue())


def plot_eval(rows: list[dict], main: str, path: str) -> None:
  """The main metric, then every other numeric metric, against the checkpoint step.

  `<name>_std` metrics become error bars of `<name>`; the run time (`seconds`) is not plotted.
  """
  rows = sorted(rows, key=lambda r: r["step"])
  names = [c for c in metric_names(rows, main)
           if c != "seconds" and not c.endswith("_std") and any(is_number(r.get(c)) for r in rows)]
  panels = {c: [as_float(r.get(c)) for r in rows] for c in names}
  errors = {c: [as_float(r.get(c + "_std")) for r in rows] for c in names
            if any(is_number(r.get(c + "_std")) for r in rows)}
  plots.save_metric_panels([r["step"] for r in rows], panels, path, xlabel="checkpoint step",
                           errors=errors)


def sweep_line_name(row: dict) -> str:
  """The line of a sweep row in the plot: its method and the knobs other than step_lr."""
  parts = [row["method"]]
  for knob in ("steps_per_sigma", "corrector_steps"):
    if row.get(knob) is not None:
      parts.append(f"{knob}={row[knob]}")
  parts.append(f"denoise={row.get('denoise')}")
  return " ".join(parts)


def plot_sweep(rows: list[dict], main: str, path: str) -> None:
  """The main metric against step_lr (log axis), one line per (method, steps_per_sigma, denoise).

  Skipped settings are left out; a sampler without step_lr (PC) is a dashed horizontal line.
  """
  curves: dict[str, tuple[list, list]] = {}
  levels: dict[str, float] = {}
  for r in rows:
    if "skipped" in r:
      continue
    name = sweep_line_name(r)
    if r.get("step_lr") is None:
      levels[name] = as_float(r.get(main))
      continue
    xs, ys = curves.setdefault(name, ([], []))
    xs.append(float(r["step_lr"]))
    ys.append(as_float(r.get(main)))
  plots.save_lines(curves, path, xlabel="step_lr", ylabel=main, logx=True, levels=levels)
  by_nfe = nfe_frontier(rows, main)
  if by_nfe:
    root, ext = os.path.splitext(path)
    plots.save_lines(by_nfe, root + "_nfe" + ext, xlabel="NFE (network evaluations per sample)",
                     ylabel=main, logx=True)


def nfe_frontier(rows: list[dict], main: str) -> dict[str, tuple[list, list]]:
  """Per sampler (method): the best main metric at each NFE over its other settings.

  Rows without `nfe` (stored before it was recorded), skipped rows and NaN metrics are left out.
  """
  best: dict[str, dict[float, float]] = {}
  for r in rows:
    y = as_float(r.get(main))
    if "skipped" in r or r.get("nfe") is None or not math.isfinite(y):
      continue
    per_nfe = best.setdefault(r["method"], {})
    x = float(r["nfe"])
    per_nfe[x] = min(y, per_nfe.get(x, math.inf))
  return {m: (sorted(v), [v[x] for x in sorted(v)]) for m, v in best.items()}


def write_outputs(rows: list[dict], main: str, workdir: str, name: str,
                   plot: Callable[[list[dict], str, str], None]) -> dict[str, str]:
  """`<name>.csv` and `<name>.png` of the rows; returns all three output paths."""
  base = storage.join(workdir, name)
  paths = {"jsonl": base + ".jsonl", "csv": base + ".csv", "png": base + ".png"}
  write_csv(rows, csv_columns(rows, main), paths["csv"])
  plot(rows, main, paths["png"])
  return paths


def write_row(writer: MetricWriter | None, row: dict, measured: dict) -> None:
  """One JSON line; numeric measurements are also TensorBoard scalars, settings keep their types."""
  if writer is None:
    return
  scalars = {k: v for k, v in measured.items() if is_number(v)}
  extra = {k: v for k, v in row.items() if k not in scalars and k != "step"}
  writer.write(row["step"], scalars, **extra)
