"""Test setup: 8 simulated CPU devices, forced before JAX is imported anywhere."""
import importlib.metadata
import os
import re

# The collective timeout: on a busy 2-core machine, 8 simulated devices can take longer than
# XLA:CPU's default 40 s to meet in an all-reduce, which aborts the process.
# jaxlib 0.7.2 (Colab's) does not know this flag and aborts on it.
TEST_XLA_FLAGS = ("--xla_cpu_collective_call_terminate_timeout_seconds=1200"
                  if tuple(int(p) for p in re.findall(r"\d+", importlib.metadata.version("jaxlib"))[:2])
                  >= (0, 8) else "")


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test subprocess with `devices` simulated CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}".strip()


os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# No test reaches the internet: datasets and weights are never downloaded (score_jax.downloads,
# fetch_inception.ensure_weights); the tests of those paths serve files on 127.0.0.1.
os.environ["SCORE_JAX_OFFLINE"] = "1"

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# The timeout of every test subprocess: a bound against a hang, never an expectation of speed (a
# loaded 2-core machine runs the end-to-end jobs many times slower than an idle one).
HANG_TIMEOUT_S = 1200
SHARED_DATA = REPO.parent / "shared" / "data"


def main_env(devices: int = 8, *, inherit: bool = True) -> dict[str, str]:
  """The environment of a `main.py` subprocess: CPU, `devices` simulated devices, no debug.

  `inherit=False` starts from PATH and HOME only (no user cache or data variables).
  """
  base = dict(os.environ) if inherit else {"PATH": "/usr/bin:/bin", "HOME": str(pathlib.Path.home())}
  env = dict(base, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", SCORE_JAX_OFFLINE="1")
  env.pop("SCORE_JAX_DEBUG", None)
  return env


def start_main(*args: str, devices: int = 8, env: dict | None = None, **kwargs
               ) -> subprocess.Popen:
  """Starts `python main.py *args` in the repository root (text stdout/stderr pipes)."""
  return subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], cwd=REPO,
                          env=env or main_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs)


def run_main(*args: str, devices: int = 8, env: dict | None = None,
             timeout: float = HANG_TIMEOUT_S) -> subprocess.CompletedProcess:
  """Runs `python main.py *args` to the end; returns its exit code, stdout and stderr."""
  proc = start_main(*args, devices=devices, env=env)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    raise
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def shared_data() -> pathlib.Path:
  """`../shared/data`, or a skip naming what is missing."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data folder {SHARED_DATA} is absent (see its README in the project docs)")
  return SHARED_DATA


@pytest.fixture
def mnist_dir(shared_data) -> pathlib.Path:
  d = shared_data / "mnist"
  if not (d / "train-images-idx3-ubyte.gz").is_file():
    pytest.skip(f"official MNIST files are absent from {d}")
  return d


@pytest.fixture
def inception_npz() -> pathlib.Path:
  """The converted FID Inception weights ($SCORE_JAX_INCEPTION_NPZ or the cache), or a skip: a
  test never downloads them (`.ci/colab` fetches them for the notebook)."""
  from score_jax.eval import fetch_inception
  env = os.environ.get("SCORE_JAX_INCEPTION_NPZ")
  npz = pathlib.Path(env) if env else fetch_inception.default_npz_path()
  if not npz.is_file():
    pytest.skip(f"FID Inception weights {npz} are absent; fetch them with "
                "`python -m score_jax.eval.fetch_inception`")
  return npz


@pytest.fixture(scope="module")
def fast_compile():
  """XLA without most of its optimizations, for tests that compile deep networks once to check
  their values: the compile takes a third of the time, the numbers stay within float32
  rounding."""
  import jax
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


# The end-to-end tests take a minute or more each; started first, they do not become the tail
# of a parallel (pytest-xdist) run.
_LONG_MODULES = ("test_notebook.py", "test_image_train.py", "test_main.py", "test_metrics.py",
                 "test_mnist_eval.py", "test_adversarial.py", "test_paths.py")


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: item.path.name not in _LONG_MODULES)


def synthetic_digits(n: int, seed: int = 0) -> np.ndarray:
  """Bright random strokes on black, [n, 28, 28] uint8: digit-like statistics, no data needed."""
  rng = np.random.default_rng(seed)
  images = np.zeros((n, 28, 28), np.uint8)
  for img in images:
    for _ in range(3):
      r, c = rng.integers(4, 24, 2)
      img[r - 3:r + 3, c - 1:c + 1] = 255
      img[r - 1:r + 1, c - 3:c + 3] = rng.integers(128, 256)
  return images
