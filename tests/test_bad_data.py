"""Runtime input errors found before work: a damaged image, a reference split too small, reading
modes on a missing or empty workdir."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S, xla_flags
from PIL import Image

from configs import default
from score_jax import experiment, image_data
from score_jax.eval import reference_stats

REPO = pathlib.Path(__file__).resolve().parents[1]


def _images(folder: pathlib.Path, n: int = 4) -> None:
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip", "text"])
def test_damaged_png_is_named_at_iterator_creation(tmp_path, damage):
  _images(tmp_path)
  bad = tmp_path / "2.png"
  data = bad.read_bytes()
  bad.write_bytes({"truncate": data[:len(data) // 2], "empty": b"",
                   "flip": data[:60] + bytes(b ^ 0xFF for b in data[60:76]) + data[76:],
                   "text": b"not an image\n"}[damage])
  with pytest.raises(ValueError, match=f"{bad} is not a readable image") as e:
    image_data.create_iterator(dataset="folder", split="train", batch_size=2, image_size=8,
                               num_channels=3, path=str(tmp_path))
  assert "\n" not in str(e.value)


def test_reference_split_smaller_than_eval_num_samples_is_refused(tmp_path):
  (tmp_path / "images").mkdir()
  _images(tmp_path / "images")
  config = default.get_config()
  config.data.dataset, config.data.path = "folder", str(tmp_path / "images")
  config.data.image_size, config.data.num_channels = 8, 3
  config.eval.num_samples = 10

  def featurize(x):
    raise AssertionError("no image may be featurized before the check")

  exp = experiment.build(config)

  with pytest.raises(ValueError, match="eval.num_samples=10 exceeds the 4 images"):
    reference_stats.reference_statistics(exp.eval, exp.data, str(tmp_path / "run"), featurize,
                                         "w", seed=exp.seed)
  assert not (tmp_path / "run").exists()


def test_reading_modes_on_a_missing_or_empty_workdir_create_nothing(tmp_path):
  env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
  env.pop("SCORE_JAX_DEBUG", None)
  (tmp_path / "empty").mkdir()
  cases = {("sample", "missing"): "does not exist", ("eval", "missing"): "does not exist",
           ("sample", "empty"): "no checkpoint in"}
  procs = {case: subprocess.Popen(
      [sys.executable, str(REPO / "main.py"), f"--mode={case[0]}",
       f"--workdir={tmp_path / case[1]}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for case in cases}
  for case, proc in procs.items():
    _, err = proc.communicate(timeout=HANG_TIMEOUT_S)
    lines = [l for l in err.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (case, err[-2000:])
    assert lines[0].startswith("error:") and cases[case] in lines[0], (case, lines[0])
  assert sorted(p.name for p in tmp_path.rglob("*")) == ["empty"]
