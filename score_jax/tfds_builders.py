"""TensorFlow-free TFDS builders for datasets distributed as raw arrays.

TFDS's own `mnist`, `fashion_mnist` and `cifar10` builders parse their files with `tf.io.gfile` and
encode images as PNG, so they need TensorFlow. These builders read the same original files from
the manual directory with numpy and store raw uint8 tensors, so preparing (ArrayRecord) and
reading (`as_data_source`) work without TensorFlow. Features: "image" uint8 [h, w, c], "label".
Importing this module registers them with TFDS.
"""

from __future__ import annotations

import pathlib
import tarfile

import numpy as np
import tensorflow_datasets as tfds

from score_jax import paths
from score_jax.idx import read_idx


def _features(shape):
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
      "label": tfds.features.ClassLabel(num_classes=10)})


class _IdxBuilder(tfds.core.GeneratorBasedBuilder):
  """MNIST-format data from the four idx .gz files in the manual directory."""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                                  "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in "
                                  "the manual directory.")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_features((28, 28, 1)),
                                 supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    d = paths.as_path(dl_manager.manual_dir)
    return {"train": self._generate_examples(d, "train"), "test": self._generate_examples(d, "t10k")}

  def _generate_examples(self, d, prefix):
    images = read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(d / f"{prefix}-labels-idx1-ubyte.gz")
    for i in range(len(images)):
      yield i, {"image": images[i][..., None], "label": int(labels[i])}


class ScoreJaxMnist(_IdxBuilder):
  """MNIST (LeCun et al. 1998) from the official idx files, TensorFlow-free."""


class ScoreJaxFashionMnist(_IdxBuilder):
  """Fashion-MNIST (Xiao et al. 2017) from its idx files, TensorFlow-free."""


class ScoreJaxCifar10(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10 from `cifar-10-binary.tar.gz` in the manual directory, TensorFlow-free."""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put cifar-10-binary.tar.gz in the manual directory."

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_features((32, 32, 3)),
                                 supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    archive = paths.as_path(dl_manager.manual_dir) / "cifar-10-binary.tar.gz"
    train = [f"data_batch_{i}.bin" for i in range(1, 6)]
    return {"train": self._generate_examples(archive, train),
            "test": self._generate_examples(archive, ["test_batch.bin"])}

  def _generate_examples(self, archive, names):
    with paths.open_file(archive, "rb") as f, tarfile.open(fileobj=f, mode="r:gz") as tar:
      members = {pathlib.Path(m.name).name: m for m in tar.getmembers()}
      for name in names:
        raw = np.frombuffer(tar.extractfile(members[name]).read(), np.uint8).reshape(-1, 3073)
        for i, row in enumerate(raw):
          image = row[1:].reshape(3, 32, 32).transpose(1, 2, 0)
          yield f"{name}_{i}", {"image": image, "label": int(row[0])}
