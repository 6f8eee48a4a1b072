"""The compiled CPU extension in the cache is used only if this installation built it."""

import ctypes
import hashlib
import pathlib
import shutil
import subprocess

import pytest

from score_jax.cpu import onednn_wgrad


def _need_wheels():
  try:
    onednn_wgrad._wheel_file("onednn-cpu-gomp", "libdnnl.so.3")
  except RuntimeError as e:
    pytest.skip(str(e))


@pytest.fixture
def records(tmp_path, monkeypatch):
  """A private cache and a private record folder (the installation's own stays untouched)."""
  monkeypatch.setenv("SCORE_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(onednn_wgrad, "RECORDS", tmp_path / "records")
  return tmp_path / "records"


def test_damaged_cached_library_is_rebuilt_not_loaded(records, monkeypatch):
  _need_wheels()
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
  # A digest written next to a replaced file changes nothing: the record is not in the cache.
  path.write_bytes(b"planted")
  path.with_suffix(".so.sha256").write_text(hashlib.sha256(b"planted").hexdigest())
  assert onednn_wgrad.build() == path and len(builds) == 3
  assert path.read_bytes() == b"library 2"


_PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
  FILE *f = fopen(MARKER, "w");
  if (f) { fputs("ran", f); fclose(f); }
}
int ScoreJaxOneDnnWeightGrad(void) { return 0; }
"""


def test_planted_library_with_matching_digest_is_not_loaded(records, tmp_path):
  _need_wheels()
  compiler = shutil.which("cc") or shutil.which("gcc")
  if compiler is None:
    pytest.skip("no C compiler to build the planted library")
  marker = tmp_path / "constructor_ran"
  source = tmp_path / "planted.c"
  source.write_text(_PLANTED)
  _, key = onednn_wgrad._plan()
  cache = tmp_path / "cache"
  cache.mkdir()
  planted = cache / f"onednn_wgrad-{key}.so"
  subprocess.run([compiler, "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o",
                  str(planted)], check=True, capture_output=True)
  planted.with_suffix(".so.sha256").write_text(hashlib.sha256(planted.read_bytes()).hexdigest())
  ctypes.CDLL(str(planted))  # the planted library is a working one: its constructor runs ...
  assert marker.read_text() == "ran"
  marker.unlink()
  planted_bytes = planted.read_bytes()
  library, path = onednn_wgrad._load()  # ... but the cache does not load it: it rebuilds
  assert path == planted and path.read_bytes() != planted_bytes
  assert not marker.exists()
  assert library.ScoreJaxOneDnnWeightGrad
  assert (records / f"onednn_wgrad-{key}.sha256").read_text() == hashlib.sha256(
      path.read_bytes()).hexdigest()
