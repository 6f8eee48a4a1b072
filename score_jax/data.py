"""Input pipelines: one entry point for toy distributions and image datasets.

Toy data are drawn on the fly from `score_jax.toy`: global batch `n` is drawn with the key
`fold_in(key(seed), n)` and process `p` of `P` keeps its rows `p * b ... (p + 1) * b - 1`, so the
global batch does not depend on the process count, the pipeline is fully described by its step
counter, and a resumed run sees exactly the batches of an uninterrupted one. Image data (TFDS ArrayRecord read with
grain, or local files) come from `score_jax.image_data`, whose iterator state is likewise saved in
checkpoints. Every iterator yields `{"x": float32 [b, ...]}` and has `get_state()`/`set_state()`.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import jax
import numpy as np

from score_jax import toy


class DataIterator(Protocol):

  def __next__(self) -> dict[str, np.ndarray]:
    ...

  def get_state(self) -> dict:
    ...

  def set_state(self, state: dict) -> None:
    ...


def is_toy(dataset: str) -> bool:
  return dataset in toy.DATASETS


def check_dataset(dataset: str) -> None:
  """ValueError unless `dataset` names a toy or an image dataset."""
  if is_toy(dataset):
    return
  from score_jax import image_data  # local import: grain and PIL, for image datasets only
  if dataset not in image_data.DATASETS:
    raise ValueError(
        f"data.dataset={dataset!r} is unknown; toys: {sorted(toy.DATASETS)}, "
        f"images: {sorted(image_data.DATASETS)}")


class ToyIterator:
  """Stateless-by-construction toy batches: this process's rows `[batch_size, dim]` of global
  batch `step` (`batch_size * shard_count` rows keyed by (seed, step))."""

  def __init__(self, dataset: str, *, batch_size: int, seed: int, shard_index: int = 0,
               shard_count: int = 1, dim: int = 2):
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index={shard_index} must be in 0..{shard_count - 1}")
    self.distribution = toy.get_toy(dataset, dim=dim)
    self._sample = jax.jit(self.distribution.sample, static_argnums=1)
    self._root = jax.random.key(seed)
    self._batch_size = batch_size
    self._global_batch = batch_size * shard_count
    self._first = shard_index * batch_size
    self._step = 0

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = jax.random.fold_in(self._root, self._step)
    self._step += 1
    # Every process draws the whole global batch (a toy's is small) and keeps its rows.
    x = np.asarray(self._sample(rng, self._global_batch), np.float32)
    return {"x": x[self._first:self._first + self._batch_size]}

  def get_state(self) -> dict:
    return {"kind": "toy", "step": self._step}

  def set_state(self, state: dict) -> None:
    if state.get("kind") != "toy":
      raise ValueError(f"data state {state!r} is not a toy pipeline's state")
    self._step = int(state["step"])


def create_iterator(*, dataset: str, batch_size: int, seed: int, shard_index: int = 0,
                    shard_count: int = 1, toy_dim: int = 2, split: str = "train",
                    **image_kwargs: Any) -> DataIterator:
  """Returns the training iterator of `dataset` for this process (`batch_size` rows per process).

  Args:
    dataset: a toy name (`score_jax.toy.DATASETS`) or an image dataset (`image_data.DATASETS`).
    batch_size: rows per call on this process.
    seed: run seed (shuffling, augmentation and toy draws).
    shard_index, shard_count: this process's rows of each global batch of
      `batch_size * shard_count` rows (the same global batches for any process count).
    toy_dim: dimension of the toy Gaussians.
    split: image split.
    **image_kwargs: forwarded to `image_data.create_iterator` (image_size, num_channels, ...).
  """
  if is_toy(dataset):
    return ToyIterator(dataset, batch_size=batch_size, seed=seed, shard_index=shard_index,
                       shard_count=shard_count, dim=toy_dim)
  check_dataset(dataset)
  from score_jax import image_data  # local import: grain and PIL, for image datasets only
  return image_data.create_iterator(dataset=dataset, split=split, batch_size=batch_size, seed=seed,
                                    shard_index=shard_index, shard_count=shard_count,
                                    **image_kwargs)


def example_batch_shape(dataset: str, *, toy_dim: int, image_size: int,
                        num_channels: int) -> tuple[int, ...]:
  """Shape of one example (without the batch dimension)."""
  if is_toy(dataset):
    return (toy.get_toy(dataset, dim=toy_dim).dim,)
  return (image_size, image_size, num_channels)
