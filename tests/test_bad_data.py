"""A damaged image in a folder dataset is named when the iterator is made, before training."""

import numpy as np
import pytest
from PIL import Image

from score_jax import image_data


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip", "text"])
def test_damaged_png_is_named_at_iterator_creation(tmp_path, damage):
  rng = np.random.default_rng(0)
  for i in range(4):
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
  bad = tmp_path / "2.png"
  data = bad.read_bytes()
  bad.write_bytes({"truncate": data[:len(data) // 2], "empty": b"",
                   "flip": data[:60] + bytes(b ^ 0xFF for b in data[60:76]) + data[76:],
                   "text": b"not an image\n"}[damage])
  with pytest.raises(ValueError, match=f"{bad} is not a readable image") as e:
    image_data.create_iterator(dataset="folder", split="train", batch_size=2, image_size=8,
                               num_channels=3, path=str(tmp_path))
  assert "\n" not in str(e.value)
