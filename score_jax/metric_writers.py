"""Metric logging without TensorFlow: JSON lines plus TensorBoard event files.

`clu.metric_writers` imports TensorFlow, so this small writer uses the `tensorboard` package's own
event-file writer and protos, which work without it.

A run resumed from step k continues its logs from k: rows past k are dropped from the JSON lines
file, and the new event file (in the same TensorBoard run directory) starts with a
`SessionLog.START` event at step k + 1, which makes TensorBoard's event accumulator purge the
earlier run's events at steps > k (its restart handling, `_CheckForRestartAndMaybePurge`).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def _to_float(v) -> float | None:
  v = np.asarray(v)
  if v.size != 1:
    return None
  return float(v.reshape(()))


class MetricWriter:
  """Writes scalar metrics to `<workdir>/<name>.jsonl` and TensorBoard events in `<workdir>/tb`.

  Only the main process should create one (see `parallel.is_main_process`).

  Args:
    workdir: the run's directory.
    name: the file and TensorBoard run name.
    tensorboard: also write TensorBoard events.
    start_step: the step the run starts (or resumes) from; logged rows past it are dropped and
      TensorBoard purges its events past it. None appends to whatever is there.
  """

  def __init__(self, workdir: str, name: str = "metrics", *, tensorboard: bool = True,
               start_step: int | None = None):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, f"{name}.jsonl")
    if start_step is not None:
      _drop_rows_after(self.path, start_step)
    self._jsonl = open(self.path, "a", encoding="utf-8")
    self._tb = EventFileWriter(os.path.join(workdir, "tb", name)) if tensorboard else None
    if self._tb is not None and start_step is not None:
      self._tb.add_event(event_pb2.Event(
          wall_time=time.time(), step=int(start_step) + 1,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
      self._tb.flush()

  def write(self, step: int, scalars: Mapping[str, float | np.ndarray], **extra) -> None:
    """Logs scalar metrics (non-scalars go to JSON only) at `step`."""
    record = {"step": int(step), "time": time.time()}
    values = []
    for k, v in scalars.items():
      f = _to_float(v)
      if f is None:
        record[k] = np.asarray(v).tolist()
        continue
      record[k] = f if math.isfinite(f) else str(f)
      values.append(summary_pb2.Summary.Value(tag=k, simple_value=f))
    record.update(extra)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None and values:
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                         summary=summary_pb2.Summary(value=values)))
      self._tb.flush()

  def close(self) -> None:
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites `path` (atomically) without rows whose step is past `step`; unparsable rows go."""
  if not os.path.isfile(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue  # a row cut short by a crash
    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
      keep.append(line if line.endswith("\n") else line + "\n")
  if keep == lines:
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
