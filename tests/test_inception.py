"""Tests for the FID Inception port (`score_jax.eval.inception`) and its weight readers
(`score_jax.eval.torch_weights`, `score_jax.eval.fetch_inception`).

The PyTorch archives here are written by small hand-made writers that mimic `torch.save` (zip and
legacy) and `torch.jit.save` layouts; `torch` itself is never imported: stand-in `torch` /
`__torch__` modules are registered in `sys.modules` only while pickling.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
import types
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from score_jax.eval import inception, torch_weights

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class _Storage:
  """A storage to pickle by persistent id, as torch.save does."""

  def __init__(self, key: str, storage_cls: type, data: np.ndarray):
    self.key, self.storage_cls, self.data = key, storage_cls, np.ascontiguousarray(data).ravel()


class _FakeTorch:
  """Stand-in `torch` modules whose globals pickle under torch's names."""

  def __init__(self, monkeypatch: pytest.MonkeyPatch):
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
      raise AssertionError("only pickled, never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in ("FloatStorage", "HalfStorage", "LongStorage"):
      setattr(torch, name, type(name, (), {"__module__": "torch"}))
    script = types.ModuleType("__torch__")
    script_mod = types.ModuleType("__torch__.toy")

    class Layer:
      pass

    Layer.__module__ = "__torch__.toy"
    Layer.__qualname__ = "Layer"
    script_mod.Layer = Layer
    for mod in (torch, utils, script, script_mod):
      monkeypatch.setitem(sys.modules, mod.__name__, mod)
    self.torch, self.rebuild, self.Layer = torch, _rebuild_tensor_v2, Layer

  def tensor(self, storage: _Storage, offset: int, size, stride):
    rebuild = self.rebuild

    class _Tensor:
      def __reduce__(self):
        return rebuild, (storage, offset, tuple(size), tuple(stride), False,
                         collections.OrderedDict())

    return _Tensor()


class _TorchPickler(pickle.Pickler):

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ("storage", obj.storage_cls, obj.key, "cpu", obj.data.size)
    return None


def _dumps(obj) -> bytes:
  buf = io.BytesIO()
  _TorchPickler(buf, protocol=2).dump(obj)
  return buf.getvalue()


def _write_zip(path: Path, obj, storages: list[_Storage], extra: dict[str, bytes] | None = None):
  """torch.save's zip layout: `archive/data.pkl` + `archive/data/<key>`, stored uncompressed."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", _dumps(obj))
    zf.writestr("archive/byteorder", "little")
    for name, data in (extra or {}).items():
      zf.writestr(f"archive/{name}", data)
    for st in storages:
      little = st.data.astype(st.data.dtype.newbyteorder("<"))
      zf.writestr(f"archive/data/{st.key}", little.tobytes())
    zf.writestr("archive/version", "3\n")


def _example(fake: _FakeTorch):
  """A state_dict exercising offsets, non-contiguous strides and several dtypes."""
  rng = np.random.default_rng(0)
  shared = rng.normal(size=12).astype(np.float32)
  longs = np.arange(5, dtype=np.int64) - 2
  halves = rng.normal(size=6).astype(np.float16)
  storages = [_Storage("0", fake.torch.FloatStorage, shared),
              _Storage("1", fake.torch.LongStorage, longs),
              _Storage("2", fake.torch.HalfStorage, halves)]
  state = collections.OrderedDict([
      ("conv.weight", fake.tensor(storages[0], 0, (3, 4), (4, 1))),
      ("conv.weight_t", fake.tensor(storages[0], 0, (4, 3), (1, 4))),
      ("bn.bias", fake.tensor(storages[0], 4, (4,), (1,))),
      ("bn.num_batches_tracked", fake.tensor(storages[1], 1, (), ())),
      ("ids", fake.tensor(storages[1], 0, (5,), (1,))),
      ("half", fake.tensor(storages[2], 0, (2, 3), (3, 1))),
  ])
  expected = {"conv.weight": shared.reshape(3, 4), "conv.weight_t": shared.reshape(3, 4).T,
              "bn.bias": shared[4:8], "bn.num_batches_tracked": longs[1], "ids": longs,
              "half": halves.reshape(2, 3)}
  return state, storages, expected


def _assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]):
  assert sorted(got) == sorted(expected)
  for name, want in expected.items():
    assert got[name].dtype == want.dtype, name
    np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_forbidden_global_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
  with pytest.raises(torch_weights.ForbiddenGlobalError, match=r"forbidden global 'os\.system'"):
    torch_weights.restricted_loads(evil)
  archive = tmp_path / "evil.pth"
  with zipfile.ZipFile(archive, "w") as zf:
    zf.writestr("archive/data.pkl", evil)
  with pytest.raises(torch_weights.ForbiddenGlobalError, match=r"os\.system"):
    torch_weights.load_state_dict(archive)
  assert not marker.exists()


def test_zip_state_dict_round_trip(tmp_path, monkeypatch):
  fake = _FakeTorch(monkeypatch)
  state, storages, expected = _example(fake)
  path = tmp_path / "weights.pth"
  _write_zip(path, state, storages)
  monkeypatch.delitem(sys.modules, "torch")
  _assert_same(torch_weights.load_state_dict(path), expected)


def test_legacy_state_dict_round_trip(tmp_path, monkeypatch):
  fake = _FakeTorch(monkeypatch)
  state, storages, expected = _example(fake)
  buf = io.BytesIO()
  for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
    pickle.dump(header, buf, protocol=2)
  _TorchPickler(buf, protocol=2).dump(state)
  pickle.dump([st.key for st in storages], buf, protocol=2)
  for st in storages:
    buf.write(np.int64(st.data.size).tobytes())
    buf.write(st.data.tobytes())
  path = tmp_path / "legacy.pth"
  path.write_bytes(buf.getvalue())
  _assert_same(torch_weights.load_state_dict(path), expected)


def test_torchscript_module_tree(tmp_path, monkeypatch):
  fake = _FakeTorch(monkeypatch)
  w = np.arange(6, dtype=np.float32)
  storage = _Storage("0", fake.torch.FloatStorage, w)
  inner = fake.Layer()
  inner.__dict__.update(training=False, padding=[0, 1],
                        weight=fake.tensor(storage, 0, (2, 3), (3, 1)))
  outer = fake.Layer()
  outer.__dict__.update(training=False, _is_full_backward_hook=None, stride=2, conv=inner,
                        beta=fake.tensor(storage, 3, (3,), (1,)))
  path = tmp_path / "module.pt"
  _write_zip(path, outer, [storage], {"constants.pkl": pickle.dumps((), protocol=2),
                                      "code/__torch__/toy.py": b"raise SystemExit('never run')\n"})
  got = torch_weights.load_state_dict(path)
  _assert_same(got, {"conv.weight": w.reshape(2, 3), "beta": w[3:]})


def _torch_bilinear(x: np.ndarray, size: int) -> np.ndarray:
  """torch F.interpolate(mode='bilinear', align_corners=False) written from its index formula."""

  def axis_weights(n_in: int) -> np.ndarray:
    src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((size, n_in))
    np.add.at(m, (np.arange(size), i0), 1 - lam)
    np.add.at(m, (np.arange(size), i1), lam)
    return m

  return np.einsum("ph,qw,bhwc->bpqc", axis_weights(x.shape[1]), axis_weights(x.shape[2]), x,
                   optimize=True)


@pytest.mark.parametrize("hw", [(32, 40), (431, 317)])
def test_resize_matches_torch_bilinear(hw):
  x = np.random.default_rng(1).uniform(size=(1, *hw, 2)).astype(np.float32)
  got = np.asarray(inception.resize_bilinear(jnp.asarray(x)))
  # Source coordinates are computed in float32 (as torch does for float32 inputs), which moves
  # samples by up to ~size * 6e-8 pixels; antialiasing or a corner-alignment slip would be ~1e-1.
  np.testing.assert_allclose(got, _torch_bilinear(x.astype(np.float64), 299), atol=5e-5)


def test_avg_pool_excludes_padding():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  got = inception._avg_pool_3x3(x)[0, :, :, 0]
  assert got[0, 0] == pytest.approx(np.mean([0, 1, 4, 5]))
  assert got[1, 1] == pytest.approx(np.mean([0, 1, 2, 4, 5, 6, 8, 9, 10]))


def test_reference_pool_features(inception_npz):
  npz, ref_dir = inception_npz, SHARED_DATA / "inception_reference"
  if not (ref_dir / "elefant.jpg").is_file():
    pytest.skip(f"reference data {ref_dir} is absent")
  variables = inception.load_params(npz)
  img = np.asarray(Image.open(ref_dir / "elefant.jpg").convert("RGB"), np.float32)
  ref = np.load(ref_dir / "elefant_inception_output.npy").reshape(1, 2048)
  # README protocol: input 2*x/255 - 1, no resize, global mean pool; the model maps [0, 1]
  # inputs by 2x - 1 itself.
  model = inception.InceptionV3FID(resize=False)
  pool = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(img[None] / 255.0))["pool"])
  diff = np.abs(pool - ref)
  print(f"elefant pool3: mean abs diff {diff.mean():.3g}, max {diff.max():.3g}")
  assert pool.shape == (1, 2048)
  assert diff.mean() < 1e-5, (diff.mean(), diff.max())
  assert not inception.has_logits(variables)
