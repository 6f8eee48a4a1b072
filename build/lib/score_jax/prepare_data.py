"""Prepare a dataset offline as TFDS ArrayRecord files.

    python -m score_jax.prepare_data --dataset=mnist --manual_dir=../shared/data/mnist \
        --data_dir=~/tensorflow_datasets

Never downloads. Exit status 2 with a one-line message on bad input.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from score_jax import image_data

flags.DEFINE_string("dataset", None, f"One of {sorted(k for k, v in image_data.DATASETS.items() if v.tfds_name)}.")
flags.DEFINE_string("manual_dir", None, "Folder with the dataset's original files.")
flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  start = time.time()
  try:
    image_data.prepare(FLAGS.dataset or "", data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"prepared {FLAGS.dataset} in {time.time() - start:.1f} s "
        f"(data_dir={FLAGS.data_dir or image_data.default_data_dir()})")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
