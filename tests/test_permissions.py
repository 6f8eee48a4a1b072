"""Output files get the permissions the user's umask gives, as other tools' files do."""

import os
import stat

import numpy as np
import pytest

from score_jax import paths, plots


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
  before = os.umask(request.param)
  yield request.param
  os.umask(before)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_follow_the_umask(umask, tmp_path):
  written = [tmp_path / "a.bin", tmp_path / "b.txt", tmp_path / "c.npz", tmp_path / "grid.png"]
  paths.write_bytes(written[0], b"x")
  paths.write_text(written[1], "x")
  paths.save_npz(written[2], x=np.zeros(3))
  plots.save_image_grid(np.zeros((4, 8, 8, 1), np.float32), str(written[3]))
  for path in written:
    assert _mode(path) == 0o666 & ~umask, (path, oct(_mode(path)))
  # Nothing else is left next to them (the temporary files are renamed into place).
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
