"""Discriminators: output shapes, spectral-norm state and convergence, BigGAN parameter count.

Compiling is what costs on CPU, so each small model is compiled once, in `_run`, into one program
doing everything the tests check (init, eval and train calls, 200 training calls, gradients for
the models in `GRAD_MODELS`), and the results are shared between tests.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import cpu
from score_jax.models import discriminator as disc

SN = disc.SPECTRAL_STATS
NUM_TRAIN_CALLS = 200


def _init_key(seed: int = 0) -> jax.Array:
  # RBG keys: initializing the 64 px model compiles ~3x faster than with threefry keys on CPU.
  return jax.random.key(seed, impl="rbg")

# name -> (model, input shape). "biggan64_attn" puts attention after the first block (32x32).
SMALL_MODELS = {
    "biggan32": (disc.BigGANDiscriminator(ch=8, resolution=32), (2, 32, 32, 3)),
    "biggan64_attn": (disc.BigGANDiscriminator(ch=8, resolution=64, attention_resolution=32),
                      (1, 64, 64, 3)),
    "dcgan32": (disc.DCGANDiscriminator(ch=8, resolution=32), (2, 32, 32, 3)),
    "mlp": (disc.MLPDiscriminator(hidden=8), (4, 2)),
}
# Backward passes double the compile time; these two cover every layer type but attention.
GRAD_MODELS = ("biggan32", "mlp")


@functools.lru_cache(maxsize=None)
def _run(name: str) -> dict:
  """Init, eval call, train call, gradient and `NUM_TRAIN_CALLS` train calls of one model."""
  model, shape = SMALL_MODELS[name]
  x = jax.random.uniform(jax.random.PRNGKey(1), shape)

  @jax.jit
  def run(x):
    variables = model.init(_init_key(), x)
    params, stats = variables["params"], variables[SN]
    eval_logits, eval_upd = model.apply(variables, x, train=False, mutable=[SN])
    train_logits, train_upd = model.apply(variables, x, train=True, mutable=[SN])

    def loss(p):
      return jnp.mean(model.apply({"params": p, SN: stats}, x, train=True, mutable=[SN])[0] ** 2)

    def train_call(_, s):
      return model.apply({"params": params, SN: s}, x, train=True, mutable=[SN])[1][SN]

    # One power step per call; the wide 64 px blocks have close top singular values, so 50 calls
    # still leave ~2% there. (XLA drops the convolutions here: u depends on the kernels only.)
    converged = jax.lax.fori_loop(0, NUM_TRAIN_CALLS, train_call, stats)
    return dict(variables=variables, eval_logits=eval_logits, eval_stats=eval_upd[SN],
                train_logits=train_logits, train_stats=train_upd[SN], converged_stats=converged,
                grads=jax.grad(loss)(params) if name in GRAD_MODELS else None)

  return jax.device_get(run(x))


def _effective_kernels(params, stats) -> dict[tuple[str, ...], np.ndarray]:
  """Kernel / sigma of every SN layer as the next forward pass uses it, as a `[fan_in, out]`
  matrix; the power step (v = Wu/|Wu|, u' = W^T v/|W^T v|, sigma = v^T W u') in numpy."""
  flat_params = flax.traverse_util.flatten_dict(params)
  out = {}
  for path, u in flax.traverse_util.flatten_dict(stats).items():
    assert path[-1] == "u"
    kernel = flat_params[path[:-1] + ("kernel",)]
    w = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    v = w @ u
    v /= np.linalg.norm(v)
    u_new = w.T @ v
    u_new /= np.linalg.norm(u_new)
    out[path[:-1]] = w / (v @ w @ u_new)
  return out


@pytest.mark.parametrize(("arch", "name"), [
    ("biggan", "biggan32"), ("dcgan", "dcgan32"), ("mlp", "mlp")])
def test_build_matches_presets(arch, name):
  model, shape = SMALL_MODELS[name]
  resolution = shape[1] if len(shape) == 4 else 0
  assert cpu.unwrap(disc.build_discriminator(arch, ch=8, resolution=resolution)) == model


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_output_shape(name):
  _, shape = SMALL_MODELS[name]
  out = _run(name)
  for key in ("eval_logits", "train_logits"):
    assert out[key].shape == (shape[0],) and out[key].dtype == np.float32
    assert np.all(np.isfinite(out[key]))


@pytest.mark.parametrize("name", GRAD_MODELS)
def test_gradients_are_finite_and_nonzero(name):
  leaves = jax.tree.leaves(_run(name)["grads"])
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.abs(g).max() > 0 for g in leaves)


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_spectral_norm_converges_to_unit_top_singular_value(name):
  out = _run(name)
  params = out["variables"]["params"]
  kernels = _effective_kernels(params, out["converged_stats"])
  n_kernels = sum(1 for p in flax.traverse_util.flatten_dict(params) if p[-1] == "kernel")
  assert len(kernels) == n_kernels  # every kernel is spectrally normalized
  for path, w in kernels.items():
    top = np.linalg.svd(w, compute_uv=False)[0]
    assert abs(top - 1.0) < 1e-2, (path, top)


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_eval_keeps_and_train_updates_spectral_stats(name):
  out = _run(name)
  stats = jax.tree.leaves(out["variables"][SN])
  for a, b in zip(stats, jax.tree.leaves(out["eval_stats"])):
    np.testing.assert_array_equal(a, b)
  # A 1-vector u is already the top singular vector (up to sign) and may stay put.
  changed = [not np.allclose(a, b) for a, b in zip(stats, jax.tree.leaves(out["train_stats"]))
             if a.size > 1]
  assert changed and all(changed)
  # The power step runs in both modes (only the write-back differs), so the outputs agree.
  np.testing.assert_allclose(out["train_logits"], out["eval_logits"], rtol=1e-5, atol=1e-6)


def test_u_starts_unit_norm():
  for u in jax.tree.leaves(_run("biggan32")["variables"][SN]):
    assert float(np.linalg.norm(u)) == pytest.approx(1.0, abs=1e-6)


def test_train_without_mutable_stats_fails():
  model, _ = SMALL_MODELS["mlp"]
  variables = _run("mlp")["variables"]
  with pytest.raises(Exception, match=SN):
    model.apply(variables, jnp.zeros((1, 2)), train=True)


def test_spectral_normalize_matches_svd():
  kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 4, 5))
  u0 = jnp.ones((5,)) / jnp.sqrt(5.0)

  @jax.jit
  def iterate():
    return jax.lax.fori_loop(0, 100, lambda _, c: disc.spectral_normalize(kernel, c[1]),
                             disc.spectral_normalize(kernel, u0))

  w, u, sigma = iterate()
  want = np.linalg.svd(np.asarray(kernel).reshape(36, 5), compute_uv=False)[0]
  np.testing.assert_allclose(float(sigma), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(w), np.asarray(kernel) / want, rtol=1e-5)
  assert float(jnp.linalg.norm(u)) == pytest.approx(1.0, abs=1e-6)


def test_attention_layers_and_identity_at_init():
  attn = disc.Attention()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 16))

  @jax.jit
  def run(x):
    variables = attn.init(_init_key(), x)
    y0 = attn.apply(variables, x)
    params = dict(variables["params"], gamma=jnp.ones(()))
    y1 = attn.apply({"params": params, SN: variables[SN]}, x)
    return variables["params"], y0, y1

  params, y0, y1 = run(x)
  assert set(params) == {"theta", "phi", "g", "o", "gamma"}
  assert params["theta"]["kernel"].shape == (1, 1, 16, 2)
  assert params["phi"]["kernel"].shape == (1, 1, 16, 2)
  assert params["g"]["kernel"].shape == (1, 1, 16, 8)
  assert params["o"]["kernel"].shape == (1, 1, 8, 16)
  assert "bias" not in params["theta"] and float(params["gamma"]) == 0.0
  np.testing.assert_array_equal(np.asarray(y0), np.asarray(x))
  assert not np.allclose(np.asarray(y1), np.asarray(x))


def test_biggan_64_structure():
  model = disc.BigGANDiscriminator(ch=8, resolution=64)
  x = jnp.zeros((1, 64, 64, 3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  # Reference table: widths ch * (1, 2, 4, 8, 16); 64 -> 32 -> 16 -> 8 -> 4, the last block keeps
  # 4x4. No block outputs 64x64, so the default attention_resolution=64 adds no attention here.
  widths = [shapes["params"][f"block{i}"]["conv2"]["kernel"].shape[-1] for i in range(5)]
  assert widths == [8, 16, 32, 64, 128]
  assert not any(k.startswith("attention") for k in shapes["params"])
  logits, inter = jax.eval_shape(
      lambda v: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]), shapes)
  sizes = [inter["intermediates"][f"block{i}"]["__call__"][0].shape[1] for i in range(5)]
  assert sizes == [32, 16, 8, 4, 4]
  assert logits.shape == (1,)


@pytest.mark.parametrize(("model", "shape"), [
    (disc.DCGANDiscriminator(ch=8, spectral_norm=False), (2, 32, 32, 3)),
    (disc.MLPDiscriminator(hidden=8, spectral_norm=False), (2, 2))])
def test_spectral_norm_can_be_off(model, shape):
  x = jnp.zeros(shape)

  @jax.jit
  def run(x):
    variables = model.init(_init_key(), x)
    return variables, model.apply(variables, x, train=True)

  variables, logits = run(x)
  assert SN not in variables
  assert logits.shape == (2,)


def test_biggan_parameter_count():
  model = disc.BigGANDiscriminator(ch=64, resolution=32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  got = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))

  def conv(k, c_in, c_out):
    return k * k * c_in * c_out + c_out

  c = 4 * 64
  block0 = conv(3, 3, c) + conv(3, c, c) + conv(1, 3, c)  # shortcut: downsampling
  block1 = conv(3, c, c) + conv(3, c, c) + conv(1, c, c)  # shortcut: downsampling
  block2 = conv(3, c, c) + conv(3, c, c)  # no downsampling, same width: identity shortcut
  block3 = conv(3, c, c) + conv(3, c, c)
  linear = c * 1 + 1
  expected = block0 + block1 + block2 + block3 + linear
  assert expected == 4_204_801
  assert got == expected


def test_wrong_input_resolution_raises():
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="32x32"):
    jax.eval_shape(disc.BigGANDiscriminator(ch=8, resolution=32).init, rng,
                   jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match="resolution 48"):
    jax.eval_shape(disc.BigGANDiscriminator(ch=8, resolution=48).init, rng,
                   jnp.zeros((1, 48, 48, 3)))
  with pytest.raises(ValueError, match="power-of-two"):
    jax.eval_shape(disc.DCGANDiscriminator(ch=8, resolution=24).init, rng,
                   jnp.zeros((1, 24, 24, 3)))


def test_build_rejects_unknown_arch():
  with pytest.raises(ValueError, match="stylegan") as err:
    disc.build_discriminator("stylegan", ch=8, resolution=32)
  for arch in disc.DISCRIMINATOR_ARCHS:
    assert arch in str(err.value)
