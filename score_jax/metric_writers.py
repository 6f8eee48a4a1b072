"""Metric logging without TensorFlow: JSON lines plus TensorBoard event files.

`clu.metric_writers` imports TensorFlow, so this small writer uses the `tensorboard` package's own
event-file writer and protos, which work without it.

A run resumed from step k continues its logs from k: rows past k are dropped from the JSON lines
file, and the new event file (in the same TensorBoard run directory) starts with a
`SessionLog.START` event at step k + 1, which makes TensorBoard's event accumulator purge the
earlier run's events at steps > k (its restart handling, `_CheckForRestartAndMaybePurge`).

A workdir on cloud storage (`gs://...`) works too: the JSON lines file goes through
`score_jax.paths`, and TensorBoard's event writer opens URLs through its own `gfile`, which
hands non-local paths to fsspec. Objects cannot be appended to, so there each row rewrites the
whole JSON lines object.
"""

from __future__ import annotations

import io
import json
import math
import time
from typing import Mapping

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from score_jax import paths


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
    paths.makedirs(workdir)
    self.path = paths.join(workdir, f"{name}.jsonl")
    if start_step is not None:
      _drop_rows_after(self.path, start_step)
    if paths.is_local(self.path):
      self._jsonl, self._rows = open(self.path, "a", encoding="utf-8"), None
    else:
      self._jsonl = None
      self._rows = paths.as_path(self.path).read_text() if paths.exists(self.path) else ""
    self._tb = EventFileWriter(paths.join(workdir, "tb", name)) if tensorboard else None
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
    if self._jsonl is not None:
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    else:
      self._rows += json.dumps(record) + "\n"
      paths.write_text(self.path, self._rows)
    if self._tb is not None and values:
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                         summary=summary_pb2.Summary(value=values)))
      self._tb.flush()

  def write_images(self, step: int, images: Mapping[str, bytes]) -> None:
    """Logs PNG files' bytes as TensorBoard images at `step` (tag -> PNG bytes), beside the
    scalars; nothing without TensorBoard."""
    if self._tb is None or not images:
      return
    values = []
    for tag, png in images.items():
      with Image.open(io.BytesIO(png)) as im:
        width, height = im.size
        channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}.get(im.mode, 3)
      values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
          height=height, width=width, colorspace=channels, encoded_image_string=png)))
    self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                       summary=summary_pb2.Summary(value=values)))
    self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites `path` (atomically) without rows whose step is past `step`; unparsable rows go."""
  if not paths.isfile(path):
    return
  with paths.open_file(path) as f:
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
  paths.write_text(path, "".join(keep))


def read_jsonl(path: str) -> list[dict]:
  with paths.open_file(path) as f:
    return [json.loads(line) for line in f if line.strip()]
