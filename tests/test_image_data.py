"""Image pipeline: offline MNIST preparation, grain iteration, resume, sharding, local files."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from score_jax import image_data

MNIST = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_data_dir(tmp_path_factory):
  if not (MNIST / "train-images-idx3-ubyte.gz").is_file():
    pytest.skip(f"official MNIST files are absent from {MNIST} (see ../shared/data/README.md)")
  return image_data.prepare_cached("mnist", str(MNIST), str(tmp_path_factory.mktemp("tfds")))


def _it(data_dir, **kw):
  args = dict(dataset="mnist", split="train", batch_size=32, image_size=28, num_channels=1,
              data_dir=data_dir, seed=3)
  args.update(kw)
  return image_data.create_iterator(**args)


def test_raw_mnist_files():
  if not MNIST.is_dir():
    pytest.skip(f"{MNIST} is absent")
  images, labels = image_data.load_mnist_raw(MNIST, "test")
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_prepared_mnist_matches_the_raw_files(mnist_data_dir):
  x = image_data.load_array(dataset="mnist", split="test", image_size=28, num_channels=1,
                            data_dir=mnist_data_dir)
  raw, _ = image_data.load_mnist_raw(MNIST, "test")
  assert x.shape == (10000, 28, 28, 1)
  # TFDS stores records in its own order: compare as sets of images.
  a = np.sort((x[..., 0] * 255).round().astype(np.uint8).reshape(10000, -1).sum(1))
  b = np.sort(raw.reshape(10000, -1).astype(np.int64).sum(1))
  np.testing.assert_array_equal(a, b)


def test_batches_ranges_determinism_and_resume(mnist_data_dir):
  it = _it(mnist_data_dir, random_flip=True, uniform_dequantization=True)
  first = next(it)["x"]
  assert first.shape == (32, 28, 28, 1) and first.dtype == np.float32
  assert 0.0 <= first.min() and first.max() < 1.0
  np.testing.assert_array_equal(next(_it(mnist_data_dir, random_flip=True,
                                         uniform_dequantization=True))["x"], first)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it)["x"] for _ in range(3)]
  resumed = _it(mnist_data_dir, random_flip=True, uniform_dequantization=True)
  resumed.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(resumed)["x"], e)
  centered = next(_it(mnist_data_dir, centered=True))["x"]
  assert centered.min() == -1.0 and centered.max() == 1.0


def test_shards_are_disjoint_and_cover(mnist_data_dir):
  # The 10000 test digits: two shards of 5000 hold each record once as well as the 60000
  # training digits would, at a sixth of the reading.
  def sums(shard):
    it = _it(mnist_data_dir, split="test", shard_index=shard, shard_count=2, shuffle=False,
             batch_size=1000, num_epochs=1)
    return np.concatenate([next(it)["x"].reshape(1000, -1).sum(1) for _ in range(5)])
  a, b = sums(0), sums(1)
  whole = image_data.load_array(dataset="mnist", split="test", image_size=28, num_channels=1,
                                data_dir=mnist_data_dir)
  np.testing.assert_allclose(np.sort(np.concatenate([a, b])), np.sort(whole.reshape(10000, -1).sum(1)),
                             rtol=1e-6)


def test_resize_and_channels(mnist_data_dir):
  x = next(_it(mnist_data_dir, image_size=32, num_channels=3))["x"]
  assert x.shape == (32, 32, 32, 3)
  np.testing.assert_array_equal(x[..., 0], x[..., 2])


def test_folder_and_npz_sources(tmp_path):
  rng = np.random.RandomState(0)
  imgs = rng.randint(0, 256, (6, 12, 12, 3), dtype=np.uint8)
  for i, im in enumerate(imgs):
    Image.fromarray(im).save(tmp_path / f"{i}.png")
  np.savez(tmp_path / "data.npz", x=imgs)
  for dataset, path in (("folder", str(tmp_path)), ("npz", str(tmp_path / "data.npz"))):
    x = image_data.load_array(dataset=dataset, split="train", image_size=12, num_channels=3,
                              path=path)
    np.testing.assert_allclose(x * 255, imgs, atol=1e-3)
    batch = next(image_data.create_iterator(dataset=dataset, split="train", batch_size=4,
                                            image_size=8, num_channels=1, path=path))
    assert batch["x"].shape == (4, 8, 8, 1)


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown"):
    image_data.create_iterator(dataset="imagenet", split="train", batch_size=2, image_size=8,
                               num_channels=3)
  with pytest.raises(ValueError, match="prepare_data --dataset=mnist"):
    image_data.create_iterator(dataset="mnist", split="train", batch_size=2, image_size=28,
                               num_channels=1, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="lacks"):
    image_data.prepare("mnist", data_dir=str(tmp_path), manual_dir=str(tmp_path))
  with pytest.raises(ValueError, match="data.path"):
    image_data.create_iterator(dataset="npz", split="train", batch_size=2, image_size=8,
                               num_channels=1)
  with pytest.raises(ValueError, match="num_channels"):
    image_data.create_iterator(dataset="npz", split="train", batch_size=2, image_size=8,
                               num_channels=2, path="x.npz")


def _npz_iterator(path, **kw):
  args = dict(dataset="npz", split="train", image_size=6, num_channels=1, path=str(path), seed=5,
              random_flip=True, uniform_dequantization=True)
  args.update(kw)
  return image_data.create_iterator(**args)


@pytest.fixture
def npz_path(tmp_path):
  x = np.random.RandomState(1).randint(0, 256, (50, 6, 6), dtype=np.uint8)
  np.savez(tmp_path / "data.npz", x=x)
  return tmp_path / "data.npz"


@pytest.mark.parametrize("shard_count", [2, 4])
def test_processes_read_their_rows_of_the_one_process_global_batch(npz_path, shard_count):
  """The global batch of each step does not depend on the process count (shuffle, flips and
  dequantization included), and a data state resumes on another process count."""
  one = _npz_iterator(npz_path, batch_size=8)
  shards = [_npz_iterator(npz_path, batch_size=8 // shard_count, shard_index=p,
                          shard_count=shard_count) for p in range(shard_count)]
  for _ in range(9):  # past the end of the first epoch (50 records, 8 per batch)
    np.testing.assert_array_equal(np.concatenate([next(s)["x"] for s in shards]), next(one)["x"])
  state = json.loads(json.dumps(shards[0].get_state()))
  resumed = _npz_iterator(npz_path, batch_size=8)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["x"], next(one)["x"])


def test_every_example_of_an_epoch_is_read_once_across_processes(npz_path):
  records = np.load(npz_path)["x"].reshape(50, -1).astype(np.float64).sum(1)
  seen = []
  for p in range(2):
    it = _npz_iterator(npz_path, batch_size=5, shard_index=p, shard_count=2, num_epochs=1,
                       random_flip=False, uniform_dequantization=False)
    seen.append(np.concatenate([b["x"].reshape(5, -1).sum(1) * 255 for b in it]))
  assert len(seen[0]) == len(seen[1]) == 25
  np.testing.assert_allclose(np.sort(np.concatenate(seen)), np.sort(records), atol=1e-3)
