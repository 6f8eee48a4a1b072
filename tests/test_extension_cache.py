"""The compiled CPU extension in the cache is checked against its recorded SHA-256 before use."""

import pathlib
import subprocess

import pytest

from score_jax.cpu import onednn_wgrad


def test_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, monkeypatch):
  try:
    onednn_wgrad._wheel_file("onednn-cpu-gomp", "libdnnl.so.3")
  except RuntimeError as e:
    pytest.skip(str(e))
  monkeypatch.setenv("SCORE_JAX_CACHE", str(tmp_path))
  builds = []

  def fake_compile(command, **kwargs):  # stands in for the C++ compiler only
    out = pathlib.Path(command[command.index("-o") + 1])
    out.write_bytes(b"library %d" % len(builds))
    builds.append(out)
    return subprocess.CompletedProcess(command, 0, "", "")

  monkeypatch.setattr(onednn_wgrad.subprocess, "run", fake_compile)
  monkeypatch.setattr(onednn_wgrad.shutil, "which", lambda name: "/usr/bin/c++")
  path = onednn_wgrad.build()
  assert path.read_bytes() == b"library 0" and len(builds) == 1
  assert onednn_wgrad.build() == path and len(builds) == 1  # intact: reused
  path.write_bytes(b"library 0 with one byte changed")
  assert onednn_wgrad.build() == path and len(builds) == 2  # damaged: rebuilt
  assert path.read_bytes() == b"library 1"
