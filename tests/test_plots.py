"""Plots: the sampler trajectories share a sigma axis."""

import numpy as np

from score_jax import plots


def test_trajectories_are_plotted_against_each_samplers_sigma(tmp_path):
  als_sigma = np.geomspace(20.0, 0.1, 20)
  cas_sigma = np.geomspace(20.0, 0.1, 191)
  trajectories = {
      "als": {"sigma": als_sigma, "noise_std": als_sigma * 1.01, "x_std": als_sigma + 1},
      "cas": {"sigma": cas_sigma, "noise_std": cas_sigma * 0.99, "x_std": cas_sigma + 1},
      "heun": None,
  }
  fig = plots.trajectory_figure(trajectories)
  for ax in fig.axes:
    assert ax.get_xlabel() == "sigma" and ax.get_xscale() == "log"
    left, right = ax.get_xlim()
    assert left > right  # noise decreases to the right, as sampling proceeds
    lines = {l.get_label(): l.get_xdata() for l in ax.get_lines()}
    np.testing.assert_allclose(lines["ALS (20 levels)"], als_sigma)
    np.testing.assert_allclose(lines["CAS (191 levels)"], cas_sigma)
  plots.save_trajectories(trajectories, str(tmp_path / "t.png"))
  assert (tmp_path / "t.png").stat().st_size > 0


def test_save_lines_writes_its_png(tmp_path):
  plots.save_lines({"als": ([1e-5, 1e-4], [3.0, 2.0])}, str(tmp_path / "l.png"), xlabel="step_lr",
                   ylabel="fid", logx=True, levels={"pc": 2.5})
  assert (tmp_path / "l.png").stat().st_size > 1000
