"""Prepare a dataset as TFDS ArrayRecord files from its original files.

    python -m score_jax.prepare_data --dataset=mnist --manual_dir=../shared/data/mnist \
        --data_dir=~/tensorflow_datasets
    python -m score_jax.prepare_data --dataset=cifar10    # downloads the original files first

Without --manual_dir, mnist, fashion_mnist and cifar10 are downloaded (`score_jax.downloads`:
the original files, checked against their SHA-256) into the cache first; training does the same on
first use. Exit status 2 with a one-line message on bad input or a failed download.
"""

from __future__ import annotations

import sys
import textwrap
import time

from absl import flags

from score_jax import downloads, help_flags, image_data

_PREPARABLE = sorted(k for k, v in image_data.DATASETS.items() if v.tfds_name)
flags.DEFINE_string("dataset", None, f"One of {', '.join(_PREPARABLE)}.")
flags.DEFINE_string("manual_dir", None, "Folder with the dataset's original files (default for "
                    f"{', '.join(downloads.SOURCES)}: download them).")
flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
FLAGS = flags.FLAGS


def _usage() -> str:
  rows = "\n".join(textwrap.fill(
      ", ".join(image_data.DATASETS[name].manual_files) or "the files TFDS's own builder reads",
      100, initial_indent=f"  {name:<20} ", subsequent_indent=" " * 23) for name in _PREPARABLE)
  return f"""\
usage: python -m score_jax.prepare_data --dataset=NAME [--manual_dir=DIR] [--data_dir=DIR]

Builds a dataset's TFDS ArrayRecord files (what training and evaluation read) under --data_dir from
its original files in --manual_dir. Without --manual_dir, {", ".join(downloads.SOURCES)} are
downloaded first (checked against their SHA-256); training does that on first use too.

datasets (--dataset) and the original files --manual_dir must hold:
{rows}

example:
  python -m score_jax.prepare_data --dataset=mnist --manual_dir=../shared/data/mnist
"""


help_flags.define(_usage, lambda: [FLAGS[n] for n in ("dataset", "manual_dir", "data_dir")])


def main(argv: list[str] | None = None) -> int:
  """`python -m score_jax.prepare_data`; returns the exit status."""
  try:
    FLAGS(sys.argv if argv is None else argv)
  except flags.Error as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  start = time.time()
  manual_dir = FLAGS.manual_dir
  try:
    if manual_dir is None and FLAGS.dataset in downloads.SOURCES:
      manual_dir = str(downloads.fetch(FLAGS.dataset))
    image_data.prepare(FLAGS.dataset or "", data_dir=FLAGS.data_dir, manual_dir=manual_dir)
  except (ValueError, downloads.DownloadError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"prepared {FLAGS.dataset} in {time.time() - start:.1f} s "
        f"(data_dir={FLAGS.data_dir or image_data.default_data_dir()})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
