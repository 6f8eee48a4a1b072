"""GAN losses against hand-written numpy formulas; adamp against a hand-rolled Adam."""

import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import gan

YP = np.array([2.0, -1.0, 0.5])
YPF = np.array([-0.5, 1.5, 0.0])


def _bce1(z):
  """Mean sigmoid cross-entropy against target 1: -log sigmoid(z) = log(1 + e^-z)."""
  return np.mean(np.log1p(np.exp(-z)))


def _bce0(z):
  """Mean sigmoid cross-entropy against target 0: -log(1 - sigmoid(z)) = log(1 + e^z)."""
  return np.mean(np.log1p(np.exp(z)))


def _relu(x):
  return np.maximum(x, 0.0)


def _expected():
  yp, ypf = YP, YPF
  r, f = yp - ypf.mean(), ypf - yp.mean()
  return {
      "lsgan": (np.mean((yp - 1) ** 2) + np.mean((ypf + 1) ** 2), np.mean((ypf - 1) ** 2)),
      "lsgan_sat": (np.mean((yp - 1) ** 2) + np.mean((ypf + 1) ** 2), -np.mean((ypf + 1) ** 2)),
      "gan": (_bce1(yp) + _bce0(ypf), _bce1(ypf)),
      "wgan": (ypf.mean() - yp.mean(), -ypf.mean()),
      "hinge": (np.mean(_relu(1 - yp)) + np.mean(_relu(1 + ypf)), -ypf.mean()),
      "rpgan": (2 * _bce1(yp - ypf), 2 * _bce1(ypf - yp)),
      "rplsgan": (2 * np.mean((yp - ypf - 1) ** 2), 2 * np.mean((ypf - yp - 1) ** 2)),
      "ragan": (_bce1(r) + _bce0(f), _bce1(f) + _bce0(r)),
      "ralsgan": (np.mean((r - 1) ** 2) + np.mean((f + 1) ** 2),
                  np.mean((f - 1) ** 2) + np.mean((r + 1) ** 2)),
      "rahinge": (np.mean(_relu(1 - r)) + np.mean(_relu(1 + f)),
                  np.mean(_relu(1 - f)) + np.mean(_relu(1 + r))),
  }


def test_expected_table_covers_every_loss():
  assert set(_expected()) == set(gan.GAN_LOSSES)
  assert len(gan.GAN_LOSSES) == 10


def test_spot_values_by_hand():
  # lsgan L_D = mean(1, 4, .25) + mean(.25, 6.25, 1) = 1.75 + 2.5; wgan L_D = 1/3 - 1/2.
  assert float(gan.discriminator_loss(YP, YPF, kind="lsgan")) == pytest.approx(4.25)
  assert float(gan.discriminator_loss(YP, YPF, kind="wgan")) == pytest.approx(-1.0 / 6.0)
  # hinge L_D = mean(0, 2, .5) + mean(.5, 2.5, 1) = 5/6 + 4/3.
  assert float(gan.discriminator_loss(YP, YPF, kind="hinge")) == pytest.approx(13.0 / 6.0)


@pytest.mark.parametrize("kind", gan.GAN_LOSSES)
def test_losses_match_numpy(kind):
  want_d, want_g = _expected()[kind]
  yp, ypf = jnp.asarray(YP, jnp.float32), jnp.asarray(YPF, jnp.float32)
  got_d = gan.discriminator_loss(yp, ypf, kind=kind)
  got_g = gan.generator_loss(yp, ypf, kind=kind)
  assert got_d.shape == () and got_g.shape == ()
  np.testing.assert_allclose(float(got_d), want_d, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(got_g), want_g, rtol=1e-6, atol=1e-6)


def test_bce_is_stable_for_large_logits():
  big = jnp.array([100.0, -100.0, 50.0])
  for kind in ("gan", "rpgan", "ragan"):
    assert np.isfinite(float(gan.discriminator_loss(big, -big, kind=kind)))
    assert np.isfinite(float(gan.generator_loss(big, -big, kind=kind)))


@pytest.mark.parametrize("fn", [gan.discriminator_loss, gan.generator_loss])
def test_unknown_loss_kind_raises(fn):
  with pytest.raises(ValueError, match="wassersteinish") as err:
    fn(YP, YPF, kind="wassersteinish")
  assert "ralsgan" in str(err.value)


def test_kind_is_keyword_only():
  with pytest.raises(TypeError):
    gan.discriminator_loss(YP, YPF, "lsgan")  # pylint: disable=too-many-function-args


def test_mismatched_shapes_raise():
  with pytest.raises(ValueError, match="same shape"):
    gan.discriminator_loss(YP, YPF[:2], kind="rpgan")


def test_discriminator_accuracy():
  # Real > 0: 2 of 3. Fake <= 0: -0.5 and 0.0, 2 of 3.
  acc_real, acc_fake = gan.discriminator_accuracy(YP, YPF)
  assert float(acc_real) == pytest.approx(2.0 / 3.0)
  assert float(acc_fake) == pytest.approx(2.0 / 3.0)
  acc_real, acc_fake = gan.discriminator_accuracy(np.array([1.0, 2.0]), np.array([-1.0, -3.0]))
  assert (float(acc_real), float(acc_fake)) == (1.0, 1.0)


def test_adamp_matches_hand_adam_with_negative_momentum():
  lr, b1, b2, eps = 0.1, -0.5, 0.9, 1e-8
  opt = gan.adamp(lr, b1=b1, b2=b2, eps=eps)
  params = jnp.array([1.0, -2.0, 0.5])
  grads = [np.array([0.3, -1.2, 2.0]), np.array([-0.7, 0.4, 2.5])]
  state = opt.init(params)
  m = v = np.zeros(3)
  for t, g in enumerate(grads, start=1):
    updates, state = opt.update(jnp.asarray(g, jnp.float32), state, params)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g ** 2
    mhat = m / (1 - b1 ** t)
    vhat = v / (1 - b2 ** t)
    want = -lr * mhat / (np.sqrt(vhat) + eps)
    np.testing.assert_allclose(np.asarray(updates), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("b1", [-1.0, 1.0, -1.5])
def test_adamp_rejects_b1_out_of_range(b1):
  with pytest.raises(ValueError, match="b1"):
    gan.adamp(1e-3, b1=b1)


@pytest.mark.parametrize("b2", [1.0, -0.1])
def test_adamp_rejects_b2_out_of_range(b2):
  with pytest.raises(ValueError, match="b2"):
    gan.adamp(1e-3, b2=b2)
