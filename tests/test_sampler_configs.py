"""Every sampler through the config boundary: sub-groups, ladders, `make_sampler`, NFE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from score_jax import cli, evaluate, experiment, models, noise, parallel, toy
from score_jax import sampling as sampling_lib
from score_jax.eval import evaluators, records, sweep


@pytest.fixture(scope="module")
def tiny():
  config = test_config.get_config()
  config.sampling.cas.n_sigma = 2
  config.sampling.pc.corrector_steps = 1
  for group in ("euler", "heun", "dpm_solver_pp_2m"):
    config.sampling[group].num_steps = 4
  config.sampling.adaptive.rel_tol = 0.5
  config.sampling.adaptive.abs_tol = 0.05
  return config, experiment.init_state(config, models.build(config))


@pytest.mark.parametrize("method,nfe", [("als", 4 * 5 + 1), ("cas", 7), ("pc", 4 * 2),
                                        ("euler", 4), ("heun", 7), ("dpm_solver_pp_2m", 4)])
def test_make_sampler_runs_every_fixed_step_sampler_and_reports_nfe(tiny, method, nfe):
  config, state = tiny
  x, info = experiment.make_sampler(config, state, method=method, return_info=True)(
      jax.random.key(0), 8)
  assert x.shape == (8, 2) and bool(jnp.all(jnp.isfinite(x)))
  assert int(info["nfe"]) == nfe


def test_adaptive_through_make_sampler_has_per_sample_nfe(tiny):
  config, state = tiny
  x, info = experiment.make_sampler(config, state, method="adaptive", return_info=True)(
      jax.random.key(0), 8)
  assert x.shape == (8, 2) and info["nfe"].shape == (8,)
  assert bool(jnp.all(info["nfe"] >= 3))


def test_sampling_ladder_choices():
  trained = noise.geometric_sigmas(20.0, 0.1, 5)
  np.testing.assert_array_equal(sampling_lib.sampling_ladder(trained), trained)
  np.testing.assert_allclose(sampling_lib.sampling_ladder(trained, ladder="geometric", num_steps=9),
                             noise.geometric_sigmas(20.0, 0.1, 9))
  np.testing.assert_allclose(
      sampling_lib.sampling_ladder(trained, ladder="karras", num_steps=6, rho=3.0, sigma_max=50.0),
      noise.karras_sigmas(50.0, 0.1, 6, 3.0))
  with pytest.raises(ValueError, match="ladder='trained' steps through the trained sigmas"):
    sampling_lib.sampling_ladder(trained, num_steps=4)
  with pytest.raises(ValueError, match="needs num_steps"):
    sampling_lib.sampling_ladder(trained, ladder="karras")
  with pytest.raises(ValueError, match="'edm' is unknown"):
    sampling_lib.sampling_ladder(trained, ladder="edm", num_steps=4)


def test_cas_takes_a_per_level_eta(tiny):
  config, state = tiny
  ladder = np.asarray(experiment.sigmas_from_config(config))
  gamma = ladder[1:] / ladder[:-1]
  euler_eta = tuple(float(v) for v in np.append(1.0 - gamma, 1.0))
  x_cas = experiment.make_sampler(config, state, method="cas", step_lr=None, eta=euler_eta,
                                  n_sigma=1, denoise=True)(jax.random.key(2), 16)
  x_euler = experiment.make_sampler(config, state, method="euler", ladder="trained",
                                    num_steps=None)(jax.random.key(2), 16)
  np.testing.assert_allclose(x_cas, x_euler, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="infeasible"):
    experiment.make_sampler(config, state, method="cas", step_lr=None, eta=(3.0,))(
        jax.random.key(2), 4)


def test_summary_table_shows_nfe_and_per_mode_moments():
  mix = toy.get_toy("ncsn_mixture")
  x = np.asarray(mix.sample(jax.random.key(0), 20000))
  m = {"step": 1, "num_samples": 20000, "nfe": 49.0,
       **toy.sample_metrics(x, mix, jax.random.key(1))}
  assert m["mode_weight_error"] < 0.03 and m["mode_mean_error"] < 0.15
  assert m["mode_var_rel_error"] < 0.1
  table = cli._summary_table({"heun": m})
  assert "heun" in table and "49.0" in table and "mode_vars" in table


def test_eval_rows_carry_the_samplers_nfe(tiny, tmp_path):
  config, state = tiny
  exp = experiment.build(config)
  evaluator = evaluators.make_evaluator(exp.eval, exp.data, str(tmp_path), jax.random.key(0),
                                        seed=exp.seed)
  params = exp.sampling.params(state)
  for method, nfe in (("heun", 7.0), ("adaptive", None)):
    entry = {"step": 0, "method": method, "num_samples": exp.eval.num_samples}
    sampler = exp.parallel_sampler(method, mesh=parallel.make_mesh())
    row, _ = evaluate._evaluate_sampler(sampler, params, evaluator, entry, exp.eval,
                                        str(tmp_path), jax.random.key(3), desc=method)
    assert "mmd_rbf" in row and row["nfe"] >= 3
    if nfe is not None:
      assert row["nfe"] == nfe


def test_sweep_grid_takes_the_fast_samplers_and_plots_against_nfe(tmp_path):
  grid = sweep.sweep_grid(("als", "heun", "adaptive"), (0.1,), (5,), (True,),
                          num_steps=(10, 25), rel_tols=(0.1,))
  assert [(s["method"], s.get("num_steps"), s.get("rel_tol")) for s in grid] == [
      ("als", None, None), ("heun", 10, None), ("heun", 25, None), ("adaptive", None, 0.1)]
  assert all(s["denoise"] is None for s in grid[1:])
  with pytest.raises(ValueError, match="eval.sweep_num_steps"):
    sweep.sweep_grid(("euler",), (0.1,), (5,), (True,))
  rows = [{"method": "als", "nfe": 21, "mmd_rbf": 0.3},
          {"method": "als", "nfe": 21, "mmd_rbf": 0.2},
          {"method": "heun", "nfe": 49, "mmd_rbf": 0.1},
          {"method": "heun", "nfe": 19, "mmd_rbf": 0.4},
          {"method": "cas", "mmd_rbf": 0.5}, {"method": "pc", "nfe": 8, "skipped": "infeasible"}]
  assert records.nfe_frontier(rows, "mmd_rbf") == {"als": ([21.0], [0.2]),
                                                        "heun": ([19.0, 49.0], [0.4, 0.1])}
  records.plot_sweep(rows, "mmd_rbf", str(tmp_path / "sweep.png"))
  assert (tmp_path / "sweep_nfe.png").is_file()
