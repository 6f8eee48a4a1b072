"""Malformed PyTorch weight files: one-line errors, no allocation beyond the file's own size."""

import collections
import io
import pickle
import resource
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S
from test_inception import _FakeTorch, _Storage, _TorchPickler, _example, _write_zip

from score_jax.eval import fetch_inception, torch_weights

_LEGACY_HEADER = (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True})


def _legacy_bytes(state, storages, numel_override=None) -> bytes:
  buf = io.BytesIO()
  for header in _LEGACY_HEADER:
    pickle.dump(header, buf, protocol=2)
  _TorchPickler(buf, protocol=2).dump(state)
  pickle.dump([st.key for st in storages], buf, protocol=2)
  for st in storages:
    buf.write(np.int64(numel_override or st.data.size).tobytes())
    buf.write(st.data.tobytes())
  return buf.getvalue()


@pytest.fixture
def files(tmp_path, monkeypatch):
  """Valid zip and legacy files, and crafted ones stating sizes far beyond their bytes."""
  fake = _FakeTorch(monkeypatch)
  state, storages, _ = _example(fake)
  good_zip = tmp_path / "good.pth"
  _write_zip(good_zip, state, storages)
  good_legacy = tmp_path / "good_legacy.pth"
  good_legacy.write_bytes(_legacy_bytes(state, storages))
  small = _Storage("0", fake.torch.FloatStorage, np.zeros(4, np.float32))
  crafted = {}
  # A legacy file whose storage states 2^33 elements (a 32 GiB read).
  one = collections.OrderedDict(w=fake.tensor(small, 0, (4,), (1,)))
  crafted["legacy_numel"] = _legacy_bytes(one, [small], numel_override=1 << 33)
  # A zip whose tensor is a 2^20 x 2^20 broadcast of a 4-element storage.
  path = tmp_path / "broadcast.pth"
  _write_zip(path, collections.OrderedDict(w=fake.tensor(small, 0, (1 << 20, 1 << 20), (0, 0))),
             [small])
  crafted["zip_broadcast"] = path.read_bytes()
  # A zip whose persistent id states 2^33 elements for a 16-byte storage.
  big = _Storage("0", fake.torch.FloatStorage, np.zeros(4, np.float32))
  big.data = np.zeros(4, np.float32)

  class _Liar(_TorchPickler):
    def persistent_id(self, obj):
      pid = super().persistent_id(obj)
      return pid and pid[:4] + (1 << 33,)

  buf = io.BytesIO()
  _Liar(buf, protocol=2).dump(collections.OrderedDict(w=fake.tensor(big, 0, (1 << 33,), (1,))))
  path = tmp_path / "liar.pth"
  _write_zip(path, {}, [big])
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/data/0", big.data.tobytes())
  crafted["zip_numel"] = path.read_bytes()
  crafted["empty"] = b""
  crafted["text"] = b"not a weight file\n"
  crafted["deep"] = b"\x80\x02" + b"]" * 100000 + b"."
  monkeypatch.delitem(sys.modules, "torch")
  return {"zip": good_zip.read_bytes(), "legacy": good_legacy.read_bytes()}, crafted


def _check_one(path) -> None:
  """Loads `path`: a dict of arrays or a one-line MalformedWeightsError; nothing else."""
  try:
    got = torch_weights.load_state_dict(path)
  except torch_weights.MalformedWeightsError as e:
    assert "\n" not in str(e) and str(path) in str(e)
    return
  assert all(isinstance(v, np.ndarray) for v in got.values())


def test_crafted_files_fail_in_one_line_without_large_allocations(files, tmp_path):
  _, crafted = files
  for name, data in crafted.items():
    path = tmp_path / f"{name}.bin"
    path.write_bytes(data)
    tracemalloc.start()
    try:
      with pytest.raises(torch_weights.MalformedWeightsError) as e:
        torch_weights.load_state_dict(path)
      peak = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
    assert "\n" not in str(e.value), name
    assert peak < 64 * len(data) + (16 << 20), (name, peak)


def test_truncated_and_mutated_files_fail_in_one_line(files, tmp_path):
  valid, _ = files
  rng = np.random.default_rng(0)
  path = tmp_path / "fuzz.pth"
  for kind, data in valid.items():
    for cut in range(0, len(data), max(1, len(data) // 60)):
      path.write_bytes(data[:cut])
      _check_one(path)
    for _ in range(150):
      mutated = bytearray(data)
      for i in rng.integers(0, len(data), size=rng.integers(1, 8)):
        mutated[i] = int(rng.integers(0, 256))
      path.write_bytes(bytes(mutated))
      _check_one(path)


def test_fetch_inception_pth_reports_malformed_files_in_one_line(files, tmp_path, capsys):
  _, crafted = files
  for name in ("legacy_numel", "zip_numel", "text"):
    path = tmp_path / f"{name}.pth"
    path.write_bytes(crafted[name])
    assert fetch_inception.main(["--pth", str(path), "--cache_dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fetch_inception: error: ") and err.count("\n") == 1, err
  assert not (tmp_path / "cache").exists()


def _storage_pickle(fake, numel: int, views) -> bytes:
  """A data.pkl whose tensors `views` (name -> (offset, size, stride)) share one float storage
  stating `numel` elements."""
  storage = _Storage("0", fake.torch.FloatStorage, np.zeros(1, np.float32))

  class _Stated(_TorchPickler):
    def persistent_id(self, obj):
      pid = super().persistent_id(obj)
      return pid and pid[:4] + (numel,)

  buf = io.BytesIO()
  _Stated(buf, protocol=2).dump(collections.OrderedDict(
      (name, fake.tensor(storage, *view)) for name, view in views.items()))
  return buf.getvalue()


def _deflated_zip(path, data_pkl: bytes, storage_bytes: int) -> None:
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
    zf.writestr("archive/data.pkl", data_pkl)
    zf.writestr("archive/data/0", bytes(storage_bytes))


def test_inflated_bytes_are_bounded_before_inflating(tmp_path, monkeypatch):
  fake = _FakeTorch(monkeypatch)
  numel = 16 << 20  # a 64 MiB storage that deflates to about 64 KiB
  path = tmp_path / "bomb.pth"
  _deflated_zip(path, _storage_pickle(fake, numel, {"w": (0, (numel,), (1,))}), 4 * numel)
  monkeypatch.delitem(sys.modules, "torch")
  assert path.stat().st_size < (1 << 20)
  tracemalloc.start()
  try:
    with pytest.raises(torch_weights.MalformedWeightsError, match="inflates to more than") as e:
      torch_weights.load_state_dict(path, max_bytes=8 << 20)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert "\n" not in str(e.value) and str(path) in str(e.value)
  assert peak < (4 << 20), peak


def test_tensors_sharing_a_storage_are_materialized_once(tmp_path, monkeypatch):
  fake = _FakeTorch(monkeypatch)
  numel = 4 << 20  # 16 MiB, named by 16 tensors
  path = tmp_path / "shared.pth"
  _deflated_zip(path, _storage_pickle(fake, numel, {f"w{i}": (0, (numel,), (1,))
                                                    for i in range(16)}), 4 * numel)
  # Distinct overlapping views are each an array of their own: their total is bounded.
  overlapping = tmp_path / "overlapping.pth"
  _deflated_zip(overlapping, _storage_pickle(fake, numel, {f"w{i}": (i, (numel - 16,), (1,))
                                                           for i in range(16)}), 4 * numel)
  monkeypatch.delitem(sys.modules, "torch")
  tracemalloc.start()
  try:
    got = torch_weights.load_state_dict(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert sorted(got) == sorted(f"w{i}" for i in range(16))
  assert all(got[name] is got["w0"] for name in got) and got["w0"].shape == (numel,)
  assert peak < 3 * 4 * numel, peak
  tracemalloc.start()
  try:
    with pytest.raises(torch_weights.MalformedWeightsError, match="tensors total more than") as e:
      torch_weights.load_state_dict(overlapping, max_bytes=64 << 20)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert "\n" not in str(e.value)
  assert peak < 2 * 4 * numel, peak


_CHILD_CPU_S = 60
_LOAD_IN_CHILD = """
import sys
from score_jax.eval import torch_weights
try:
  torch_weights.load_state_dict(sys.argv[1])
except torch_weights.MalformedWeightsError as e:
  print(e)
  sys.exit(3)
"""


@pytest.mark.parametrize("kind", ["shared_levels", "memo_index", "marks", "stack"])
def test_pickle_structure_is_bounded_before_unpickling(tmp_path, kind):
  if kind == "shared_levels":
    # 25 levels, each holding the memoized level below twice: 2^25 paths from ~200 bytes.
    tree = []
    for _ in range(25):
      tree = [tree, tree]
    data = pickle.dumps(tree, protocol=2)
  elif kind == "memo_index":
    # LONG_BINPUT at index 2^30: the C unpickler would grow its memo table to 2^31 slots.
    data = b"\x80\x02]r" + (1 << 30).to_bytes(4, "little") + b"."
  elif kind == "marks":
    data = b"\x80\x02" + b"(" * 5000 + b"."
  else:
    data = b"\x80\x02" + b"N" * 200_000 + b"."
  assert len(data) < 250_000
  path = tmp_path / f"{kind}.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", data)
  # A child process with a CPU-time limit, so that a walk of 2^25 paths fails the test (SIGXCPU,
  # whatever the machine's load) instead of hanging; loading the module and refusing the file
  # take a few seconds of CPU.
  limit = lambda: resource.setrlimit(resource.RLIMIT_CPU, (_CHILD_CPU_S, _CHILD_CPU_S))
  proc = subprocess.run([sys.executable, "-c", _LOAD_IN_CHILD, str(path)], capture_output=True,
                        text=True, timeout=HANG_TIMEOUT_S, preexec_fn=limit)
  assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr[-2000:])
  assert proc.stdout.count("\n") == 1 and str(path) in proc.stdout, proc.stdout
