"""Cloud-storage paths: `gs://` workdirs on a non-local file system, never a local `gs:` folder.

fsspec's in-memory file system stands in for Cloud Storage under the `gs` and `gcs` protocols:
without TensorFlow, `etils.epath` serves `gs://` paths with `fsspec.filesystem("gcs")`, and
TensorBoard's event writer opens them through fsspec too, so both meet this backend. Orbax's
checkpoints go through google-cloud-storage and TensorStore instead; the last tests run a Cloud
Storage server on 127.0.0.1 (fake_gcs.py) that all three clients reach, and `main.py` on it.
"""

import io
import json
import os
import subprocess
import sys

import fsspec
import jax
import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from configs import test as test_config
from score_jax import checkpoint, cli, experiment, models, paths, sample, workdir_lock
from score_jax.metric_writers import MetricWriter, read_jsonl

RUN = "gs://bucket/run"


class _FakeCloudStorage(MemoryFileSystem):
  """An in-memory file system answering to gs:// and gcs:// with a store of its own."""
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]


@pytest.fixture
def gs(tmp_path, monkeypatch):
  """A fresh fake bucket store; the test runs in an empty local folder that must stay empty."""
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, _FakeCloudStorage, clobber=True)
  _FakeCloudStorage.store.clear()
  _FakeCloudStorage.pseudo_dirs[:] = [""]
  monkeypatch.chdir(tmp_path)
  yield _FakeCloudStorage.store
  assert not os.listdir(tmp_path), f"a URL became local files: {os.listdir(tmp_path)}"


def _objects(store) -> list[str]:
  return sorted(k.removeprefix("gs://").removeprefix("/") for k in store)


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.as_str(RUN) == RUN and paths.join(RUN, "checkpoints", "7") == RUN + "/checkpoints/7"
  assert paths.as_str("runs/a") == str(tmp_path / "runs" / "a")
  assert paths.is_url(RUN) and paths.is_local("runs/a")
  assert checkpoint.checkpoint_dir(RUN) == RUN + "/checkpoints"
  with pytest.raises(paths.CloudStorageError, match="unsupported URL scheme ftp://"):
    paths.check_url_support("ftp://host/run")


def test_files_round_trip_through_the_bucket(gs):
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  paths.save_npz(RUN + "/a/x.npz", compressed=True, x=x)
  paths.write_text(RUN + "/a/m.json", json.dumps({"k": 1}))
  np.testing.assert_array_equal(paths.load_npz(RUN + "/a/x.npz")["x"], x)
  assert json.loads(paths.as_path(RUN + "/a/m.json").read_text()) == {"k": 1}
  assert paths.isdir(RUN + "/a") and paths.isfile(RUN + "/a/x.npz")
  assert _objects(gs) == ["bucket/run/a/m.json", "bucket/run/a/x.npz"]


def test_workdir_check_probes_the_bucket_and_creates_nothing_locally(gs, monkeypatch):
  # Only the file layer is checked here (Orbax's own needs are the last test's).
  check = paths.check_url_support
  monkeypatch.setattr(paths, "check_url_support", lambda path, checkpoints=False: check(path))
  cli._check_workdir(RUN, "train")
  assert _objects(gs) == []  # the write probe is removed
  with pytest.raises(cli.UsageError, match="gs://bucket/other .*does not exist"):
    cli._check_workdir("gs://bucket/other", "sample")


def test_lock_object_refuses_a_second_writer_and_goes_on_release(gs):
  lock = workdir_lock.WorkdirLock(RUN).acquire()
  holder = json.loads(paths.as_path(RUN + "/train.lock").read_text())
  assert holder["pid"] == os.getpid() and holder["holder"] == "train"
  with pytest.raises(workdir_lock.WorkdirLockedError, match="delete gs://bucket/run/train.lock"):
    workdir_lock.raise_if_held(RUN)
  with pytest.raises(workdir_lock.WorkdirLockedError, match="in use by train"):
    workdir_lock.WorkdirLock(RUN).acquire()
  lock.release()
  assert _objects(gs) == []
  workdir_lock.raise_if_held(RUN)
  # A holder on this host whose process is gone left its object: the next writer takes over.
  paths.write_text(RUN + "/train.lock", json.dumps(
      {"holder": "train", "host": holder["host"], "pid": 2**22 + 1, "start": "then"}))
  with workdir_lock.WorkdirLock(RUN):
    assert json.loads(paths.as_path(RUN + "/train.lock").read_text())["pid"] == os.getpid()


def test_metrics_and_tensorboard_events_go_to_the_bucket(gs):
  from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
  writer = MetricWriter(RUN, start_step=0)
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step})
  writer.close()
  writer = MetricWriter(RUN, start_step=2)  # resumed from step 2: row 3 goes
  writer.write(3, {"loss": 0.25})
  writer.close()
  assert [(r["step"], r["loss"]) for r in read_jsonl(RUN + "/metrics.jsonl")] == [
      (1, 1.0), (2, 0.5), (3, 0.25)]
  events = [k for k in _objects(gs) if k.startswith("bucket/run/tb/metrics/events.out.tfevents")]
  assert len(events) == 2
  steps = []
  for name in events:
    for event in LegacyEventFileLoader("gs://" + name).Load():
      steps += [(event.step, v.simple_value) for v in event.summary.value]
  assert sorted(steps) == [(1, 1.0), (2, 0.5), (3, 0.25), (3, pytest.approx(1 / 3))]


def test_samples_are_written_to_the_bucket(gs):
  config = test_config.get_config()
  config.noise.num_scales = 2
  config.sampling.als.steps_per_sigma = 1
  config.sampling.num_samples = config.sampling.batch_size = 16
  state = experiment.init_state(config, models.build(config))
  state = jax.device_get(state)
  results = sample.sample_and_write(experiment.build(config), state, RUN, methods=("als",))
  names = [k.removeprefix("bucket/run/") for k in _objects(gs)]
  assert "samples/als_step0.npz" in names and "samples/metrics_step0.json" in names
  assert "sample_metrics.jsonl" in names
  x = paths.load_npz(RUN + "/samples/als_step0.npz")["x"]
  assert x.shape == (16, config.data.toy_dim)
  saved = json.loads(paths.as_path(RUN + "/samples/metrics_step0.json").read_text())
  assert saved["als"]["finite_fraction"] == results["als"]["finite_fraction"]
  for png in [n for n in names if n.endswith(".png")]:
    with paths.open_file(RUN + "/" + png.removeprefix("bucket/run/"), "rb") as f:
      assert Image.open(io.BytesIO(f.read())).format == "PNG"


def test_checkpoints_on_gs_without_google_cloud_storage_say_so(gs, monkeypatch):
  """Orbax asks the bucket's layout through google-cloud-storage, not fsspec; where that package
  is missing (None in sys.modules makes its import fail), the run stops before writing."""
  monkeypatch.setitem(sys.modules, "google.cloud.storage", None)
  with pytest.raises(paths.CloudStorageError, match="pip install google-cloud-storage"):
    checkpoint.create_writer(RUN)
  with pytest.raises(cli.UsageError, match="--workdir=gs://bucket/run: Orbax"):
    cli._check_workdir(RUN, "train")
  assert _objects(gs) == []


def test_data_from_the_bucket(gs, monkeypatch):
  import gzip

  from score_jax import image_data
  x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
  paths.save_npz("gs://bucket/data/x.npz", x=x)
  np.testing.assert_array_equal(image_data._source("npz", "train", None,
                                                   "gs://bucket/data/x.npz")[1]["image"], x[1])
  for i in range(2):
    buf = io.BytesIO()
    Image.fromarray(x[i]).save(buf, format="PNG")
    paths.write_bytes(f"gs://bucket/data/images/sub/{i}.png", buf.getvalue())
  folder = image_data._source("folder", "train", None, "gs://bucket/data/images")
  assert len(folder) == 2 and np.array_equal(folder[1]["image"], x[1])
  idx = b"\x00\x00\x08\x03" + np.array([2, 4, 4], ">u4").tobytes() + x.tobytes()
  paths.write_bytes("gs://bucket/mnist/t.gz", gzip.compress(idx))
  np.testing.assert_array_equal(image_data.read_idx("gs://bucket/mnist/t.gz"), x)
  monkeypatch.setenv("TFDS_DATA_DIR", "gs://bucket/tfds")
  assert image_data.default_data_dir() == "gs://bucket/tfds"
  with pytest.raises(ValueError, match="data_dir=gs://bucket/tfds holds no prepared mnist"):
    image_data._source("mnist", "train", None, None)


def test_tfds_builders_read_manual_files_from_the_bucket(gs):
  import tarfile

  from score_jax import tfds_builders
  rows = np.arange(2 * 3073, dtype=np.uint8).reshape(2, 3073) % 251
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
    info.size = rows.nbytes
    tar.addfile(info, io.BytesIO(rows.tobytes()))
  paths.write_bytes("gs://bucket/manual/cifar-10-binary.tar.gz", buf.getvalue())
  archive = paths.as_path("gs://bucket/manual") / "cifar-10-binary.tar.gz"
  examples = dict(tfds_builders.ScoreJaxCifar10._generate_examples(None, archive,
                                                                   ["test_batch.bin"]))
  assert examples["test_batch.bin_1"]["label"] == int(rows[1, 0])
  np.testing.assert_array_equal(examples["test_batch.bin_1"]["image"],
                                rows[1, 1:].reshape(3, 32, 32).transpose(1, 2, 0))


@pytest.mark.e2e
def test_a_run_checkpoints_resumes_and_samples_on_a_cloud_storage_server(tmp_path):
  """`main.py` trains, resumes and samples with `--workdir=gs://bucket/run` against one Cloud
  Storage server on 127.0.0.1 (tests/fake_gcs.py) that gcsfs, google-cloud-storage and
  TensorStore all reach: Orbax's checkpoints and every log land in the bucket, nothing on disk."""
  for module, package in (("gcsfs", "gcsfs"), ("google.cloud.storage", "google-cloud-storage")):
    pytest.importorskip(module, reason=f"the gcs extra's {package} is not installed "
                        "(pip install -e '.[test]', or the lock requirements.txt)")
  from conftest import REPO, main_env
  from fake_gcs import FakeGcs

  server = FakeGcs(["bucket"])
  env = dict(main_env(devices=1), **server.environment())
  fast = ["--config.training.log_every_steps=1", "--config.training.ckpt_every_steps=1",
          "--config.training.eval_every_steps=1", "--config.training.keep_checkpoints=2",
          "--config.sampling.methods=('als',)", "--config.sampling.als.steps_per_sigma=1",
          "--config.sampling.num_samples=16", "--config.sampling.batch_size=16"]

  def main(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), f"--workdir={RUN}", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc.stdout

  def read(name: str) -> bytes:
    return server.buckets["bucket"]["run/" + name].data

  def als_samples() -> tuple[np.ndarray, int]:
    """The step-3 samples and the generation of their object (a rewrite changes it)."""
    obj = server.buckets["bucket"]["run/samples/als_step3.npz"]
    return np.load(io.BytesIO(obj.data))["x"], obj.generation

  try:
    config = f"--config={REPO / 'configs' / 'test.py'}"
    main(config, "--config.training.num_train_steps=2", *fast)
    assert "resumed from checkpoint 2 in gs://bucket/run" in main(
        config, "--config.training.num_train_steps=3", *fast)
    trained = als_samples()
    main("--mode=sample")
    names = server.names("bucket")
    assert not server.unsupported, server.unsupported
  finally:
    server.close()

  # Checkpoints 2 and 3 are complete (Orbax's commit marker, TensorStore's OCDBT arrays);
  # checkpoint 1 was deleted when 3 came, and the writer's lock object is gone.
  steps = sorted({int(n.split("/")[2]) for n in names if n.startswith("run/checkpoints/")})
  assert steps == [2, 3]
  for step in steps:
    assert f"run/checkpoints/{step}/commit_success.txt" in names
    assert f"run/checkpoints/{step}/state/manifest.ocdbt" in names
  assert "run/train.lock" not in names
  rows = [json.loads(line) for line in read("metrics.jsonl").decode().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
  assert len([n for n in names if n.startswith("run/tb/metrics/events.out.tfevents")]) == 2
  # --mode=sample restored step 3 through TensorStore and wrote again the same samples the run
  # drew from its own state.
  sampled_x, generation = als_samples()
  assert generation != trained[1]
  np.testing.assert_array_equal(sampled_x, trained[0])
  sampled = [json.loads(line) for line in read("sample_metrics.jsonl").decode().splitlines()]
  assert [(r["method"], r["step"]) for r in sampled] == [("als", 2), ("als", 3), ("als", 3)]
  assert os.listdir(tmp_path) == [], f"a URL became local files: {os.listdir(tmp_path)}"
  assert not [p for p in os.listdir(REPO) if p.startswith("gs:")]


@pytest.fixture
def gcs_server(monkeypatch):
  """A Cloud Storage server on 127.0.0.1 with bucket `bucket`, and this process's clients pointed
  at it; skips where the gcs extra is missing."""
  for module, package in (("gcsfs", "gcsfs"), ("google.cloud.storage", "google-cloud-storage")):
    pytest.importorskip(module, reason=f"the gcs extra's {package} is not installed "
                        "(pip install -e '.[test]', or the lock requirements.txt)")
  from fake_gcs import FakeGcs
  server = FakeGcs(["bucket"])
  for key, value in server.environment().items():
    monkeypatch.setenv(key, value)
  yield server
  server.close()


def test_the_three_cloud_storage_clients_share_one_store(gcs_server):
  import tensorstore as ts
  from gcsfs.core import GCSFileSystem  # the plain one, as the environment selects for main.py
  from google.cloud import storage
  kv = ts.KvStore.open({"driver": "gcs", "bucket": "bucket", "path": "run/"}).result()
  kv.write("a", b"x" * 10).result()
  kv.write("b/c", b"yz").result()
  first = kv.read("a").result().stamp.generation
  # A conditional write against a stale generation is refused (412), as on Cloud Storage;
  # TensorStore reports that as a write without a generation.
  assert kv.write("a", b"new", if_equal=first).result().generation not in (b"", first)
  assert kv.write("a", b"lost", if_equal=first).result().generation == b""
  assert kv.read("a").result().value == b"new"
  assert sorted(kv.list().result()) == [b"a", b"b/c"]
  assert kv.read("a", byte_range=slice(1, 3)).result().value == b"ew"
  current = kv.read("a").result().stamp.generation
  assert kv.read("a", if_not_equal=current).result().state == "unspecified"  # 304, unchanged
  fs = GCSFileSystem(token="anon", endpoint_url=gcs_server.url)
  fs.pipe("bucket/run/d.txt", b"from gcsfs")
  assert fs.cat("bucket/run/b/c") == b"yz"
  assert sorted(fs.ls("bucket/run", detail=False)) == ["bucket/run/a", "bucket/run/b",
                                                       "bucket/run/d.txt"]
  bucket = storage.Client().bucket("bucket")
  assert bucket.blob("run/d.txt").download_as_bytes() == b"from gcsfs"
  assert not storage.Client().get_bucket("bucket").hierarchical_namespace_enabled
  # Resumable uploads in flight together, one finishing before another starts (as gcsfs's
  # writers of a checkpoint's JSON items do from several threads).
  chunk = 2**18 + 1
  first, second = (fs.open(f"bucket/up/{n}", "wb", block_size=2**18) for n in ("1", "2"))
  first.write(b"1" * chunk)
  second.write(b"2" * chunk)
  first.close()
  with fs.open("bucket/up/3", "wb", block_size=2**18) as third:
    third.write(b"3" * chunk)
    second.close()
  assert [fs.cat(f"bucket/up/{n}") for n in "123"] == [n.encode() * chunk for n in "123"]
  fs.rm(["bucket/run/a", "bucket/run/b/c"])  # one batched request
  assert gcs_server.names("bucket") == ["run/d.txt", "up/1", "up/2", "up/3"]
  assert not gcs_server.unsupported


def test_unreadable_npz_is_one_line_without_pickle_advice(tmp_path):
  np.savez(tmp_path / "good.npz", x=np.arange(3))
  good = (tmp_path / "good.npz").read_bytes()
  (tmp_path / "garbage.npz").write_bytes(b"not an npz at all" * 10)
  (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
  np.savez(tmp_path / "objects.npz", x=np.array([{}, 1], dtype=object))
  for name, why in (("garbage.npz", "damaged"), ("cut.npz", "damaged"),
                    ("objects.npz", "object arrays")):
    with pytest.raises(ValueError) as e:
      paths.load_npz(tmp_path / name)
    message = str(e.value)
    assert name in message and why in message and "\n" not in message, message
    assert "allow_pickle" not in message
  assert list(paths.load_npz(tmp_path / "good.npz")) == ["x"]
  with pytest.raises(FileNotFoundError):
    paths.load_npz(tmp_path / "missing.npz")
