"""Metric logging without TensorFlow: JSON lines plus TensorBoard event files.

`clu.metric_writers` imports TensorFlow, so this small writer uses the `tensorboard` package's own
event-file writer and protos, which work without it.
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
  """

  def __init__(self, workdir: str, name: str = "metrics", *, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, f"{name}.jsonl")
    self._jsonl = open(self.path, "a", encoding="utf-8")
    self._tb = EventFileWriter(os.path.join(workdir, "tb", name)) if tensorboard else None

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


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
