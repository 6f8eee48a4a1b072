"""Datasets downloaded and prepared on first use, against a server on 127.0.0.1; offline, the
error names prepare_data. No test reaches the internet."""

from __future__ import annotations

import functools
import http.server
import socket
import threading

import pytest

from configs import mnist_cpu
from score_jax import config_schema, downloads, image_data
from score_jax.config_schema import UsageError


@pytest.fixture
def serve(monkeypatch):
  """`serve(folder)`: SCORE_JAX_DATA_MIRROR becomes an HTTP server of `folder` on 127.0.0.1."""
  servers = []

  def start(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
    monkeypatch.setenv("SCORE_JAX_DATA_MIRROR", f"http://127.0.0.1:{server.server_port}/")

  monkeypatch.delenv("SCORE_JAX_OFFLINE", raising=False)
  yield start
  for server in servers:
    server.shutdown()
    server.server_close()


def _config(tmp_path):
  config = mnist_cpu.get_config()
  config.data.data_dir = str(tmp_path / "tfds")
  return config


def test_first_use_downloads_checks_and_prepares_mnist(tmp_path, monkeypatch, serve, mnist_dir,
                                                       capsys):
  monkeypatch.setenv("SCORE_JAX_CACHE", str(tmp_path / "cache"))
  serve(mnist_dir)
  config_schema.check_data_source(_config(tmp_path))  # what the CLI checks before training
  folder = downloads.default_folder("mnist")
  assert sorted(p.name for p in folder.iterdir()) == sorted(downloads.SOURCES["mnist"][1])
  assert "mnist: downloading its original files" in capsys.readouterr().err
  assert len(image_data._tfds_source("mnist", "train", str(tmp_path / "tfds"))) == 60000
  # Prepared now: no server needed.
  monkeypatch.setenv("SCORE_JAX_OFFLINE", "1")
  assert len(image_data._tfds_source("mnist", "test", str(tmp_path / "tfds"))) == 10000


def test_a_file_that_is_not_the_original_is_refused(tmp_path, monkeypatch, serve):
  monkeypatch.setenv("SCORE_JAX_CACHE", str(tmp_path / "cache"))
  mirror = tmp_path / "mirror"
  mirror.mkdir()
  for name in downloads.SOURCES["mnist"][1]:
    (mirror / name).write_bytes(b"not mnist")
  serve(mirror)
  with pytest.raises(UsageError, match=r"is not the original file.*prepare_data --dataset=mnist"):
    config_schema.check_data_source(_config(tmp_path))
  assert not any(p.is_file() for p in downloads.default_folder("mnist").iterdir())


def test_offline_the_error_names_prepare_data(tmp_path, monkeypatch, serve):
  monkeypatch.setenv("SCORE_JAX_CACHE", str(tmp_path / "cache"))
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))  # never listening: the download is refused
    monkeypatch.setenv("SCORE_JAX_DATA_MIRROR", f"http://127.0.0.1:{sock.getsockname()[1]}/")
    with pytest.raises(UsageError, match=r"could not download .*prepare_data --dataset=mnist"):
      config_schema.check_data_source(_config(tmp_path))
  monkeypatch.setenv("SCORE_JAX_OFFLINE", "1")
  with pytest.raises(UsageError, match=r"SCORE_JAX_OFFLINE.*prepare_data --dataset=mnist"):
    config_schema.check_data_source(_config(tmp_path))
