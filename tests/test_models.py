"""Image score networks: published parameter counts, shapes, conditioning, reference numerics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from score_jax import cpu, models
from score_jax.models import layers, ncsn, unet
from score_jax.score import make_score_fn
from score_jax.train_state import param_count

LADDER = tuple(float(s) for s in np.geomspace(1.0, 0.01, 10))


def _count(module, shape):
  variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape), jnp.ones(shape[:1]))
  return param_count(variables["params"])


def _refinenet_count(ngf, c, encoder, decoder, num_levels=None):
  """Parameter count by hand from the reference architecture (N1/N2), block by block.

  conv3x3 a->b with bias: 9ab + b; RCU convs have no bias; a norm over k channels holds 3k
  parameters (3kL when conditional on L levels). NCSN v1 also puts norms inside RCU, MSF, CRP.
  """
  cond = num_levels is not None
  norm = lambda k: 3 * k * (num_levels or 1)
  conv = lambda a, b, k=3: k * k * a * b + b
  total = conv(c, ngf) + conv(ngf, c) + norm(ngf)  # begin conv, end conv, output norm
  widths, w = [], ngf
  for mult, down, dil in encoder:
    out = mult * ngf
    for j in range(2):
      is_down = down and j == 0
      if is_down:
        total += norm(w) + conv(w, w) + norm(w) + conv(w, out)
        total += conv(w, out, 1) if dil == 1 else conv(w, out)
      else:
        total += norm(w) + conv(w, out) + norm(out) + conv(out, out)
        if w != out:
          total += conv(w, out, 1 if dil == 1 else 3)
      w = out
    widths.append(out)
  rcu = lambda k, blocks: blocks * 2 * (9 * k * k + (norm(k) if cond else 0))
  prev = None
  for i, mult in enumerate(decoder):
    feat = mult * ngf
    inputs = [widths[-1 - i]] + ([prev] if prev is not None else [])
    total += sum(rcu(k, 2) for k in inputs)
    if len(inputs) > 1:
      total += sum(conv(k, feat) + (norm(k) if cond else 0) for k in inputs)
    total += 2 * (9 * feat * feat + (norm(feat) if cond else 0))  # CRP
    total += rcu(feat, 3 if i == len(decoder) - 1 else 1)
    prev = feat
  return total


def test_ncsnv2_cifar10_has_the_published_parameter_count():
  assert _count(ncsn.NCSNv2(ngf=128), (1, 32, 32, 3)) == 29_694_083


@pytest.mark.parametrize("name,module,shape,levels", [
    ("ncsn_cifar10", functools.partial(ncsn.NCSN, ngf=128, level_sigmas=LADDER), (1, 32, 32, 3), 10),
    ("ncsn_mnist", functools.partial(ncsn.NCSN, ngf=64, num_channels=1, level_sigmas=LADDER),
     (1, 28, 28, 1), 10),
    ("ncsnv2_cifar10", functools.partial(ncsn.NCSNv2, ngf=128), (1, 32, 32, 3), None),
    ("ncsnv2_deeper_128", functools.partial(ncsn.NCSNv2Deeper, ngf=128), (1, 128, 128, 3), None),
    ("ncsnv2_deepest_256", functools.partial(ncsn.NCSNv2Deepest, ngf=128), (1, 256, 256, 3), None),
])
def test_parameter_counts_match_the_reference_architecture(name, module, shape, levels):
  m = module()
  expected = _refinenet_count(m.ngf, shape[-1], m.encoder, m.decoder, levels)
  assert _count(m, shape) == expected, name


def test_hand_count_reproduces_the_published_ncsnv2_number():
  assert _refinenet_count(128, 3, ncsn.NCSNv2().encoder, (2, 2, 1, 1)) == 29_694_083


@pytest.mark.parametrize("module,shape", [
    (functools.partial(ncsn.NCSN, ngf=4, num_channels=1, level_sigmas=LADDER), (2, 28, 28, 1)),
    (functools.partial(ncsn.NCSNv2, ngf=4), (2, 8, 8, 3)),
    (functools.partial(ncsn.NCSNv2Deeper, ngf=4), (2, 16, 16, 3)),
    (functools.partial(ncsn.NCSNv2Deepest, ngf=4), (2, 16, 16, 3)),
])
def test_tiny_networks_keep_the_input_shape(module, shape):
  m = module()
  x = jax.random.uniform(jax.random.key(0), shape)
  sigma = jnp.array([1.0, 0.01])
  params = m.init(jax.random.key(1), x, sigma)["params"]
  out = make_score_fn(m, params)(x, sigma)
  assert out.shape == shape and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))


def test_ncsn_conditions_on_the_level_index_of_sigma():
  m = ncsn.NCSN(ngf=4, num_channels=1, level_sigmas=LADDER)
  x = jax.random.uniform(jax.random.key(0), (1, 8, 8, 1))
  params = m.init(jax.random.key(1), x, jnp.ones(1))["params"]
  # Perturb the per-level norm parameters so the levels differ (at init they are near-equal).
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  out = lambda s: m.apply({"params": params}, x, jnp.array([s]))
  assert float(jnp.max(jnp.abs(out(LADDER[0]) - out(LADDER[5])))) > 1e-3
  # Sigmas nearest to the same ladder level (in log space) select the same parameters.
  np.testing.assert_array_equal(out(LADDER[5]), out(LADDER[5] * 1.1))
  np.testing.assert_array_equal(m._level(jnp.asarray(LADDER)), np.arange(10))


def test_ncsnv2_score_is_its_output_over_sigma():
  m = ncsn.NCSNv2(ngf=4, num_channels=1)
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
  sigma = jnp.array([0.5, 2.0])
  params = m.init(jax.random.key(1), x, sigma)["params"]
  raw = m.apply({"params": params}, x, sigma)
  np.testing.assert_allclose(make_score_fn(m, params)(x, sigma),
                             raw / sigma[:, None, None, None], rtol=1e-6)
  assert m.output_convention == "scaled_score"
  assert ncsn.NCSN(level_sigmas=LADDER).output_convention == "score"


def test_bilinear_resize_matches_align_corners_true():
  x = jnp.array([[0.0, 2.0], [4.0, 6.0]])[None, :, :, None]
  out = layers.resize_bilinear_align_corners(x, (3, 3))[0, :, :, 0]
  # Corners stay, midpoints average (torch F.interpolate(..., align_corners=True)).
  np.testing.assert_allclose(out, [[0, 1, 2], [2, 3, 4], [4, 5, 6]], atol=1e-6)


def test_instance_norm_plus_statistics():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  x = x + jnp.arange(4.0)  # channel means differ
  norm = layers.InstanceNormPlus()
  variables = norm.init(jax.random.key(1), x)
  p = dict(variables["params"], gamma=jnp.ones(4), alpha=jnp.zeros(4), beta=jnp.zeros(4))
  out = norm.apply({"params": p}, x)
  np.testing.assert_allclose(out.mean(axis=(1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(out.var(axis=(1, 2)), 1.0, rtol=1e-3)
  # alpha = 1 adds back the channel means, standardized over channels with torch's unbiased var.
  p["alpha"] = jnp.ones(4)
  out = norm.apply({"params": p}, x)
  mu = x.mean(axis=(1, 2))
  expected = (mu - mu.mean(-1, keepdims=True)) / jnp.sqrt(mu.var(-1, ddof=1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(out.mean(axis=(1, 2)), expected, atol=1e-4)


def test_bfloat16_compute_and_remat_keep_the_function():
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  sigma = jnp.array([0.3, 0.03])
  # Two encoder stages (one pooling): the same blocks as NCSNv2 at half the compile time.
  small = dict(ngf=8, encoder=((1, False, 1), (2, True, 1)), decoder=(2, 1))
  base = ncsn.NCSNv2(**small)
  params = base.init(jax.random.key(1), x, sigma)["params"]
  ref = base.apply({"params": params}, x, sigma)
  bf16 = ncsn.NCSNv2(**small, dtype=jnp.bfloat16).apply({"params": params}, x, sigma)
  assert bf16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(bf16 - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, x, sigma) ** 2)
  g_ref = jax.jit(jax.grad(loss(base)))(params)
  g_remat = jax.jit(jax.grad(loss(ncsn.NCSNv2(**small, remat=True))))(params)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))


def test_torch_default_initialization_bounds():
  x = jnp.zeros((1, 8, 8, 16))
  params = layers.Conv(32).init(jax.random.key(0), x)["params"]["Conv_0"]
  bound = 1.0 / np.sqrt(16 * 9)
  for p in (params["kernel"], params["bias"]):
    assert float(jnp.max(jnp.abs(p))) <= bound
    assert float(jnp.max(jnp.abs(p))) > 0.8 * bound  # uniform over the whole interval


def _config(name, image_size, channels=3, model=()):
  """An image config of network `name`; `model` maps fields under `model.` ("ncsn.ngf") to values."""
  config = default.get_config()
  config.data.dataset = "mnist" if channels == 1 else "cifar10"
  config.data.image_size = image_size
  config.data.num_channels = channels
  config.model.name = name
  for dotted, value in dict(model).items():
    *groups, leaf = dotted.split(".")
    node = config.model
    for group in groups:
      node = node[group]
    node[leaf] = value
  return config


def test_build_reads_the_config():
  # Each network reads its own sub-group only: the other groups' widths are set to tell them apart.
  others = {"mlp.hidden": 3, "unet.ch": 8, "ncsn.ngf": 4}
  config = _config("ncsn", 28, 1, {**others, "ncsn.ngf": 64, "ncsn.nonlinearity": "swish"})
  m = models.build(config)
  assert isinstance(cpu.unwrap(m), ncsn.RefineNet) and m.ngf == 64 and m.nonlinearity == "swish"
  assert len(m.level_sigmas) == config.noise.num_scales
  assert m.pool == "avg" and not m.scale_by_sigma
  m = models.build(_config("ncsnv2_deeper", 128, model={"dtype": "bfloat16", "remat": True}))
  assert m.dtype == jnp.bfloat16 and m.remat and len(m.encoder) == 5
  m = models.build(_config("mlp", 32, model={**others, "mlp.hidden": 16, "mlp.num_layers": 2,
                                             "mlp.activation": "elu"}))
  assert (m.hidden, m.num_layers, m.activation) == (16, 2, "elu")
  m = models.build(_config("unet", 32, model={
      **others, "unet.ch": 32, "unet.ch_mult": (1, 2), "unet.num_res_blocks": 1,
      "unet.attn_resolutions": (), "unet.dropout": 0.1, "unet.conditional": True}))
  assert (m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout, m.conditional) == (
      32, (1, 2), 1, (), 0.1, True)


def test_build_rejects_image_sizes_the_network_cannot_take():
  with pytest.raises(ValueError, match="image_size=18 cannot be pooled 2 times"):
    models.build(_config("ncsnv2_deeper", 18))
  with pytest.raises(ValueError, match="dtype"):
    models.build(_config("ncsnv2", 32, model={"dtype": "float16"}))


def test_ddpm_unet_has_the_published_parameter_count():
  # Ho et al. 2020 report 35.7M parameters for the CIFAR-10 model (with its time embedding).
  assert _count(unet.UNet(conditional=True), (1, 32, 32, 3)) == 35_746_307
  # The adversarial paper's UNet has no noise-level input: the embedding layers go away.
  emb = 128 * 512 + 512 + 512 * 512 + 512 + sum(  # emb_0, emb_1, one Dense per residual block
      c * 512 + c for c in [128] * 2 + [256] * 6 + [256] * 2 + [256] * 9 + [128] * 3)
  assert _count(unet.UNet(conditional=False), (1, 32, 32, 3)) == 35_746_307 - emb


def test_unet_shapes_dropout_and_conditioning():
  m = unet.UNet(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), dropout=0.5, conditional=True)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  params = m.init(jax.random.key(1), x, jnp.ones(2))["params"]
  # Zero-initialized output convs make the fresh network output 0 (DDPM init).
  assert float(jnp.max(jnp.abs(m.apply({"params": params}, x, jnp.ones(2))))) == 0.0
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
  out = lambda s, **kw: m.apply({"params": params}, x, jnp.full(2, s), **kw)
  assert out(1.0).shape == x.shape
  assert float(jnp.max(jnp.abs(out(1.0) - out(0.01)))) > 1e-4
  a = out(1.0, train=True, rngs={"dropout": jax.random.key(3)})
  b = out(1.0, train=True, rngs={"dropout": jax.random.key(4)})
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4
  assert m.output_convention == "scaled_score"
  built = models.build(_config("unet", 32, model={"unet.ch": 32, "unet.ch_mult": (1, 2)}))
  assert isinstance(cpu.unwrap(built), unet.UNet)
