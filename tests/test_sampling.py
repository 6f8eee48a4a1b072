"""`sampling.py`: the sampler registry, `make_sample_fn` and the one multi-device wrapper."""

import ast
import dataclasses
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import config_schema, models, noise, parallel, sampling, samplers

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "score_jax"


def _net_and_params():
  net = models.NoiseConditionalMLP(hidden=8, num_layers=1)
  params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.ones((1,)))["params"]
  return net, params


def _calls(path: pathlib.Path, name: str) -> list[int]:
  """Lines of `path` that call `name` (as `name(...)` or `module.name(...)`)."""
  lines = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Call):
      f = node.func
      called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
      if called == name:
        lines.append(node.lineno)
  return lines


def test_only_sampling_spreads_a_sampler_over_devices():
  # The one multi-device sampling wrapper: no other module builds its own sharded sampler.
  callers = {str(p.relative_to(PACKAGE)): lines for p in sorted(PACKAGE.rglob("*.py"))
             if (lines := _calls(p, "shard_sampler"))}
  assert set(callers) == {"sampling.py"}, callers
  assert len(callers["sampling.py"]) == 1


def test_the_registry_names_the_schemas_sampler_groups_and_derives_the_lists():
  assert tuple(sampling.SAMPLERS) == config_schema._SAMPLER_NAMES
  assert sampling.ANNEALED_SAMPLERS == ("als", "cas", "pc")
  assert sampling.ODE_SAMPLERS == ("euler", "heun", "dpm_solver_pp_2m")
  streams = [e.stream for e in sampling.SAMPLERS.values()]
  assert len(set(streams)) == len(streams)
  with pytest.raises(TypeError):
    sampling.SAMPLERS["new"] = sampling.SAMPLERS["als"]  # read-only
  with pytest.raises(dataclasses.FrozenInstanceError):
    sampling.SAMPLERS["als"].kind = "ode"
  with pytest.raises(ValueError, match="kind='sde' is unknown"):
    sampling.SamplerEntry(samplers.euler, "sde", stream=99)


def test_a_new_registry_entry_is_all_the_assembly_needs(monkeypatch):
  # A sampler that is not in the package: one entry makes it drawable, on all devices, with the
  # ladder, start and per-sample keys of its kind.
  def half_euler(score_fn, x_init, sigmas, rng=None, *, return_info=False):
    x = samplers.euler(score_fn, x_init, sigmas[::2], rng)
    return (x, {"nfe": int(len(sigmas[::2]))}) if return_info else x

  entry = sampling.SamplerEntry(half_euler, "ode", stream=99)
  monkeypatch.setattr(sampling, "SAMPLERS",
                      types.MappingProxyType({**sampling.SAMPLERS, "half_euler": entry}))
  net, params = _net_and_params()
  sigmas = noise.geometric_sigmas(10.0, 0.1, 6)
  kwargs = dict(ladder="karras", num_steps=4)
  p = sampling.make_parallel_sampler(net, sigmas, (2,), method="half_euler", kwargs=kwargs,
                                     mesh=parallel.make_mesh())
  x, info = p(params, jax.random.key(3), 0, 16)
  keys = parallel.sample_keys(jax.random.key(3), jnp.arange(16))
  alone = sampling.make_sample_fn(net, sigmas, (2,), method="half_euler", **kwargs)(params, keys)
  np.testing.assert_allclose(x, alone, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(info["nfe"], np.full(16, 2))
  x, info = p.draw(params, jax.random.key(3), 16, batch_size=5)
  assert x.shape == (16, 2) and info["nfe"] == 2


def test_adaptive_trajectory_path_keeps_per_sample_counts():
  # With return_trajectory each example runs alone under vmap; its per-example counts and flags
  # come out `[b]` as on the batched path, not `[b, 1]`.
  net, params = _net_and_params()
  sigmas = noise.geometric_sigmas(10.0, 1.0, 4)
  keys = jax.random.split(jax.random.key(1), 4)
  kwargs = dict(method="adaptive", rel_tol=0.5, abs_tol=0.05)
  x, info = sampling.make_sample_fn(net, sigmas, (2,), return_trajectory=True, **kwargs)(
      params, keys)
  x_plain, plain = sampling.make_sample_fn(net, sigmas, (2,), return_info=True, **kwargs)(
      params, keys)
  assert set(info) == set(plain)
  for name, value in plain.items():
    assert info[name].shape == value.shape == (4,), name
    np.testing.assert_array_equal(info[name], value)
  np.testing.assert_allclose(x, x_plain, rtol=1e-5, atol=1e-5)


def test_adaptive_trajectory_through_the_wrapper_on_all_devices():
  net, params = _net_and_params()
  sigmas = noise.geometric_sigmas(10.0, 1.0, 4)
  p = sampling.make_parallel_sampler(net, sigmas, (2,), method="adaptive",
                                     kwargs=dict(rel_tol=0.5, abs_tol=0.05),
                                     mesh=parallel.make_mesh(), return_trajectory=True)
  x, info = p.draw(params, jax.random.key(2), 12, batch_size=8)
  assert x.shape == (12, 2)
  assert {k: v.shape for k, v in info.items()} == {k: (12,) for k in info}
  assert "nfe" in info and "accepted" in info


def test_a_grid_draws_each_settings_own_samples():
  net, params = _net_and_params()
  sigmas = noise.geometric_sigmas(10.0, 1.0, 4)
  kwargs = dict(step_lr=0.01, steps_per_sigma=2, denoise=False)
  grid = sampling.make_parallel_sampler(net, sigmas, (2,), method="als", kwargs=kwargs,
                                        mesh=parallel.make_mesh(),
                                        grid={"step_lr": [0.01, 0.02]})
  xs, info = grid(params, jax.random.key(5), 0, 8)
  assert xs.shape == (8, 2, 2) and info["nfe"].shape == (8,)
  for j, lr in enumerate((0.01, 0.02)):
    one = sampling.make_parallel_sampler(net, sigmas, (2,), method="als",
                                         kwargs={**kwargs, "step_lr": lr},
                                         mesh=parallel.make_mesh())
    np.testing.assert_allclose(xs[:, j], one(params, jax.random.key(5), 0, 8)[0],
                               rtol=1e-5, atol=1e-5)


def test_unknown_sampler_is_one_line():
  net, _ = _net_and_params()
  with pytest.raises(ValueError, match="sampling.method='ald' is unknown; use one of als"):
    sampling.make_sample_fn(net, jnp.ones((2,)), (2,), method="ald")
