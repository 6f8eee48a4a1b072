"""Features of samples drawn in batches, with a progress bar, resumable through a batch cache.

Every batch has the same size, so the sampler and the feature network compile once. With a cache
directory (`batch_cache_dir`, named by a digest of everything that determines the features), each
finished batch's features are saved under `<workdir>/eval_cache/batches/<digest>/` and batches
found there are not drawn again: an evaluation interrupted mid-way, rerun, continues from its
last finished batch. The host loop drops the directory (`drop_batches`) once its row is written.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Callable

import numpy as np

from score_jax import parallel, progress
from score_jax import paths as storage
from score_jax.eval.evaluators import Evaluator
from score_jax.eval.feature_nets import Features
from score_jax.eval.records import entry_key


def draw_features(sample_batch: Callable[[int, int], np.ndarray], evaluator: Evaluator, *,
                  num_samples: int, batch_size: int, cache_dir: str | None = None,
                  desc: str = "sample") -> Features:
  """Features of samples 0..num_samples-1 drawn in batches (see `draw_features_stacked`).

  Args:
    sample_batch: `(start, n) -> samples [n, ...]` (or `(samples, nfe [n])`), samples
      start..start+n-1 of one sequence.
  """
  def stacked(start: int, n: int):
    out = sample_batch(start, n)
    if isinstance(out, tuple):  # (samples, nfe per sample)
      return np.asarray(out[0])[:, None], out[1]
    return np.asarray(out)[:, None]

  return draw_features_stacked(stacked, evaluator, num_samples=num_samples, batch_size=batch_size,
                               cache_dir=cache_dir, desc=desc)[0]


def draw_features_stacked(sample_batch: Callable[[int, int], np.ndarray], evaluator: Evaluator,
                          *, num_samples: int, batch_size: int, cache_dir: str | None = None,
                          desc: str = "sample") -> list[Features]:
  """Features of k settings' samples, drawn in batches with a progress bar; resumable.

  Every call draws a full batch, so the sampler and the feature network compile once; the
  surplus of the last batch is dropped. With `cache_dir`, each finished batch's features are
  saved there, and batches found there are not drawn again: an interrupted evaluation, rerun,
  continues where it stopped. The caller names the directory by everything that determines the
  features (settings, sample count, batch size, feature weights, seed).

  Args:
    sample_batch: `(start, n) -> samples [n, k, ...]`: samples start..start+n-1 of each of k
      settings (setting j's samples are those a sampler of setting j alone draws).
    evaluator: its `featurize` maps samples `[b, ...]` to per-example features.
    num_samples: the number of samples per setting.
    batch_size: samples per batch.
    cache_dir: where finished batches are kept, or None.
    desc: the progress bar's label.

  Returns:
    One features dict per setting, each array `[num_samples, ...]`.
  """
  batch = min(batch_size, num_samples)
  num_batches = -(-num_samples // batch)
  keep = [min(batch, num_samples - i * batch) for i in range(num_batches)]
  # The batches as process 0 finds them, on every process: all draw the same batches.
  parts = parallel.from_main(lambda: _load_batches(cache_dir, num_batches))
  with progress.bar(num_samples, desc, initial=sum(keep[i] for i in parts)) as pbar:
    for i in range(num_batches):
      if i in parts:
        continue
      out = sample_batch(i * batch, batch)
      xs, nfe = out if isinstance(out, tuple) else (out, None)
      xs = np.asarray(xs)[:keep[i]]
      parts[i] = [evaluator.featurize(xs[:, j]) for j in range(xs.shape[1])]
      if nfe is not None:  # network evaluations per sample, `[n]` or `[n, k]`
        nfe = np.asarray(nfe, np.float64).reshape(len(nfe), -1)
        for j, features in enumerate(parts[i]):
          features["nfe"] = np.broadcast_to(nfe[:, min(j, nfe.shape[1] - 1)], (batch,))[:keep[i]]
      if cache_dir is not None and parallel.is_main_process():
        _save_batch(cache_dir, i, parts[i])
      pbar.update(keep[i])
  return [{name: np.concatenate([parts[i][j][name] for i in range(num_batches)])
           for name in parts[0][j]} for j in range(len(parts[0]))]


def _batch_path(cache_dir: str, i: int) -> str:
  return storage.join(cache_dir, f"batch_{i:06d}.npz")


def _save_batch(cache_dir: str, i: int, features: list[Features]) -> None:
  storage.save_npz(_batch_path(cache_dir, i),
                   **{f"{j}.{name}": v for j, f in enumerate(features) for name, v in f.items()})


def _load_batches(cache_dir: str | None, num_batches: int) -> dict[int, list[Features]]:
  """The finished batches kept in `cache_dir` (a file that does not load is drawn again)."""
  parts: dict[int, list[Features]] = {}
  if cache_dir is None or not storage.isdir(cache_dir):
    return parts
  for i in range(num_batches):
    try:
      f = storage.load_npz(_batch_path(cache_dir, i))
      settings: dict[int, Features] = {}
      for key in f:
        j, name = key.split(".", 1)
        settings.setdefault(int(j), {})[name] = f[key]
    except (OSError, ValueError, EOFError):
      continue
    parts[i] = [settings[j] for j in sorted(settings)]
  return parts


def batch_cache_dir(workdir: str, entries: list[dict], batch_size: int) -> str:
  """Where the finished batches of `entries` (evaluated together) are kept until their rows are.

  The name is a digest of the entries' keys (settings, checkpoint, sample count, features,
  reference, seed) and the batch size, so batches of another evaluation are never mixed in.
  """
  ident = json.dumps([list(entry_key(e)) for e in entries] + [batch_size], default=str)
  name = hashlib.sha256(ident.encode()).hexdigest()[:20]
  return storage.join(workdir, "eval_cache", "batches", name)


def drop_batches(cache_dir: str) -> None:
  """Removes a batch cache whose rows are written (main process; a failure only warns)."""
  if parallel.is_main_process():
    try:
      storage.as_path(cache_dir).rmtree(missing_ok=True)
    except OSError as e:  # the rows are already written; a cache left behind is only disk space
      print(f"warning: could not remove the batch cache {cache_dir}: {e}", file=sys.stderr)
