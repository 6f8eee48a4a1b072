"""Image models end to end through the CLI on real MNIST (TFDS ArrayRecord + grain), 8 devices."""

import json
import pathlib

import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S, main_env, run_main
from PIL import Image

from score_jax import image_data

REPO = pathlib.Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def mnist_data_dir(tmp_path_factory):
  if not (MNIST / "train-images-idx3-ubyte.gz").is_file():
    pytest.skip(f"official MNIST files are absent from {MNIST} (see ../shared/data/README.md)")
  return image_data.prepare_cached("mnist", str(MNIST), str(tmp_path_factory.mktemp("tfds")))


def _run(*args, timeout=HANG_TIMEOUT_S):
  proc = run_main(*args, env=main_env(8, inherit=False), timeout=timeout)
  return proc.returncode, proc.stdout, proc.stderr


TINY = ["--config.model.ncsn.ngf=4", "--config.training.batch_size=32",
        "--config.training.num_train_steps=60", "--config.training.log_every_steps=20",
        "--config.training.eval_every_steps=60", "--config.training.ckpt_every_steps=60",
        "--config.training.progress_bar=False", "--config.training.async_checkpoint=False",
        "--config.sampling.als.steps_per_sigma=2", "--config.sampling.num_samples=16",
        "--config.sampling.batch_size=16", "--config.sampling.inpaint_examples=4",
        "--config.sampling.cas.n_sigma=1", "--config.sampling.cas.step_lr=1e-4"]


@pytest.mark.e2e
def test_ncsnv2_trains_on_real_mnist_and_writes_image_outputs(tmp_path, mnist_data_dir):
  workdir = tmp_path / "mnist"
  code, out, err = _run("--config=configs/mnist_cpu.py", f"--workdir={workdir}",
                        f"--config.data.data_dir={mnist_data_dir}", *TINY)
  assert code == 0, err
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 3 and losses[-1] < 0.7 * losses[0], losses
  samples = workdir / "samples"
  for name in ("als_step60_grid.png", "als_step60_denoised_grid.png", "cas_step60_grid.png",
               "inpainting_step60.png"):
    assert Image.open(samples / name).size[0] > 28, name
  with np.load(samples / "als_step60.npz") as f:
    assert f["x"].shape == (16, 28, 28, 1) and f["x_before_denoising"].shape == (16, 28, 28, 1)
    assert np.isfinite(f["x"]).all()


@pytest.mark.parametrize("args,message", [
    (["--config.data.image_size=27"], "cannot be pooled"),
    (["--config.model.name=mlp"], "needs an image network"),
    (["--config.data.data_dir={empty}"], "prepare_data --dataset=mnist"),
])
def test_bad_image_input_is_one_line_exit_2(tmp_path, args, message):
  (tmp_path / "empty").mkdir()
  args = [a.format(empty=tmp_path / "empty") for a in args]
  workdir = tmp_path / "run"
  code, _, err = _run("--config=configs/mnist_cpu.py", f"--workdir={workdir}", *args)
  assert code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], err
  assert not (workdir / "checkpoints").exists()
