"""Tests for `python -m score_jax.eval.fid`: every source kind, saved statistics, bad input.

A fixed random projection of the quantized pixels stands in for the Inception network (the
command's logic does not depend on which features it compares); the CLI's own Inception path
is exercised by the bad-input test up to the weights check.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from score_jax.eval import feature_nets, fid

_PROJECTION = np.random.default_rng(0).normal(size=(8 * 8 * 3, 16)).astype(np.float32)


def _featurize(x):
  images, finite = feature_nets.to_inception_input(x, centered=False)
  return {"pool": images.reshape(len(images), -1) @ _PROJECTION, "finite": finite}


def _images(n, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def _folder(path, images):
  path.mkdir()
  for i, img in enumerate(images):
    Image.fromarray(img).save(path / f"{i:04d}.png")
  return str(path)


def test_folder_npz_and_statistics_agree(tmp_path):
  a, b = _images(40, 0), _images(40, 1)
  folder = _folder(tmp_path / "a", a)
  np.savez(tmp_path / "a.npz", x=a)
  np.savez(tmp_path / "a_float.npz", x=a.astype(np.float32) / 127.5 - 1.0)
  np.savez(tmp_path / "b.npz", b)
  same = fid.run([folder, str(tmp_path / "a.npz")], featurize=_featurize, batch_size=16)
  assert abs(same["fid"]) < 1e-6 and "kid" in same
  centered = fid.run([str(tmp_path / "a_float.npz"), folder], featurize=_featurize,
                     batch_size=16, centered=True)
  assert abs(centered["fid"]) < 1e-6
  direct = fid.run([folder, str(tmp_path / "b.npz")], featurize=_featurize, batch_size=16,
                   save_stats=str(tmp_path / "a_stats.npz"))
  assert direct["fid"] > 1.0
  via_stats = fid.run([str(tmp_path / "a_stats.npz"), str(tmp_path / "b.npz")],
                      featurize=_featurize, batch_size=7)
  assert via_stats["fid"] == pytest.approx(direct["fid"], rel=1e-6)
  assert via_stats["kid"] == pytest.approx(direct["kid"], rel=1e-6)
  fewer = fid.run([folder, str(tmp_path / "b.npz")], featurize=_featurize, max_images=30)
  assert fewer["fid"] != pytest.approx(direct["fid"])


def test_bad_sources_are_one_line_errors(tmp_path, capsys):
  np.savez(tmp_path / "two.npz", p=np.zeros(3), q=np.zeros(3))
  for spec, match in [("nowhere", "no such folder or .npz file"), (str(tmp_path / "two.npz"), "'mu'"),
                      (str(tmp_path / "gone.npz"), "does not exist")]:
    with pytest.raises(ValueError, match=match):
      fid.load_source(spec)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no .png"):
    fid.load_source(str(tmp_path / "empty"))
  assert fid.main(["only_one"]) == 2
  assert "--save_stats" in capsys.readouterr().err
  assert fid.main(["a.npz", "b.npz", "--inception_weights", str(tmp_path / "none.npz")]) == 2
  assert "fetch_inception" in capsys.readouterr().err


def test_kid_spread_is_reported_only_when_the_subsets_differ():
  a, b = _images(40, 0), _images(40, 1)
  sa, sb = (fid.source_statistics({"images": x.astype(np.float32) / 255, "name": n}, _featurize,
                                  batch_size=16) for x, n in ((a, "a"), (b, "b")))
  rng = fid.jax.random.key(0)
  whole = fid.compare(sa, sb, rng=rng)
  assert "kid" in whole and "kid_std" not in whole
  assert "40 images are not more than the KID subset size 1000" in whole["kid_note"]
  subsets = fid.compare(sa, sb, rng=rng, kid_subset_size=10)
  assert subsets["kid_std"] > 0 and "kid_note" not in subsets


def test_eval_rows_carry_kid_spread_only_beyond_the_subset_size():
  from score_jax.eval import evaluators, metrics
  rng = np.random.default_rng(0)
  n = metrics.KID_SUBSET_SIZE
  pool = rng.normal(size=(n, 4))
  reference = {"mu": pool.mean(0), "sigma": np.cov(pool, rowvar=False),
               "features": rng.normal(size=(n + 50, 4))}
  row = evaluators.image_metrics({"pool": pool, "finite": np.ones(n, bool)}, reference,
                                 fid.jax.random.key(0))
  assert "kid" in row and "kid_std" not in row


def test_damaged_files_are_one_line_errors_naming_the_file(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(fid, "inception_featurize", lambda weights: _featurize)
  folder = _folder(tmp_path / "a", _images(4, 0))
  (tmp_path / "a" / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"damaged" * 20)
  np.savez(tmp_path / "b.npz", x=_images(4, 1))
  (tmp_path / "cut.npz").write_bytes((tmp_path / "b.npz").read_bytes()[:100])
  np.savez(tmp_path / "objects.npz", x=np.array([{}, 1], dtype=object))
  _folder(tmp_path / "sizes", _images(3, 2))
  Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(tmp_path / "sizes" / "0009.png")
  cases = [(folder, "0002.png is not a readable image"),
           (str(tmp_path / "cut.npz"), "cut.npz is not a readable .npz"),
           (str(tmp_path / "objects.npz"), "holds object arrays"),
           (str(tmp_path / "sizes"), "must share one size"),
           (str(tmp_path / "typo"), "no such folder or .npz file")]
  for spec, expect in cases:
    assert fid.main([spec, str(tmp_path / "b.npz")]) == 2, spec
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, err
    assert "allow_pickle" not in err


def test_nothing_finite_exits_1_in_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(fid, "inception_featurize", lambda weights: _featurize)
  np.savez(tmp_path / "nan_images.npz", x=np.full((8, 8, 8, 3), np.nan, np.float32))
  np.savez(tmp_path / "nan_stats.npz", mu=np.full(16, np.nan), sigma=np.eye(16))
  np.savez(tmp_path / "b.npz", x=_images(8, 1))
  for source, expect in (("nan_images.npz", "error: no image of"),
                         ("nan_stats.npz", "error: the FID is nan")):
    assert fid.main([str(tmp_path / source), str(tmp_path / "b.npz")]) == 1, source
    captured = capsys.readouterr()
    # Progress bars (carriage-return lines) come before the one error line.
    last = captured.err.rstrip("\n").split("\n")[-1]
    assert last.startswith(expect) and captured.err.count("error") == 1, captured.err
    assert source in last and captured.out == ""
