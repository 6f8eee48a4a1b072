"""GAN losses and optimizer for adversarial score matching.

Jolicoeur-Martineau, Piche-Taillefer, Tachet des Combes & Mitliagkas 2020, "Adversarial score
matching and improved sampling for image generation" (Sec. 4): the score network's denoised output
is the generator's fake sample and a discriminator compares it with real images. The losses follow
the reference `losses/adversarial.py` (AlexiaJM/AdversarialConsistentScoreMatching), with
yp = real logits, ypf = fake logits, E = batch mean and BCE(z, t) = E of the sigmoid
cross-entropy of logits z against target t:

  lsgan      L_D = E(yp-1)^2 + E(ypf+1)^2                L_G = E(ypf-1)^2
  lsgan_sat  L_D = as lsgan                               L_G = -E(ypf+1)^2
  gan        L_D = BCE(yp,1) + BCE(ypf,0)                 L_G = BCE(ypf,1)
  wgan       L_D = E ypf - E yp                           L_G = -E ypf
  hinge      L_D = E relu(1-yp) + E relu(1+ypf)           L_G = -E ypf
  rpgan      L_D = 2 BCE(yp-ypf, 1)                       L_G = 2 BCE(ypf-yp, 1)
  rplsgan    L_D = 2 E(yp-ypf-1)^2                        L_G = 2 E(ypf-yp-1)^2
  ragan      L_D = BCE(yp-E ypf, 1) + BCE(ypf-E yp, 0)    L_G = BCE(ypf-E yp, 1) + BCE(yp-E ypf, 0)
  ralsgan    L_D = E(yp-E ypf-1)^2 + E(ypf-E yp+1)^2      L_G = E(ypf-E yp-1)^2 + E(yp-E ypf+1)^2
  rahinge    L_D = E relu(1-(yp-E ypf)) + E relu(1+(ypf-E yp))
             L_G = E relu(1-(ypf-E yp)) + E relu(1+(yp-E ypf))

Relativistic losses (rp*, ra*) are from Jolicoeur-Martineau 2019, "The relativistic discriminator".

`adamp` is the reference `Adamp`: Adam whose momentum b1 may be negative (the paper uses b1 = -0.5,
b2 = 0.9 for the adversarial runs; Gidel et al. 2019 on negative momentum in games).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

GAN_LOSSES = ("lsgan", "lsgan_sat", "gan", "wgan", "hinge", "rpgan", "rplsgan", "ragan",
              "ralsgan", "rahinge")

Logits = Float[Array, "b"]
_LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _bce(logits: jax.Array, target: float) -> jax.Array:
  """Batch mean of the sigmoid cross-entropy; stable for large |logits| (log-sigmoid form)."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))


def _sq(x: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(x))


def _hinge(x: jax.Array) -> jax.Array:
  return jnp.mean(jax.nn.relu(x))


def _lsgan_d(yp, ypf):
  return _sq(yp - 1.0) + _sq(ypf + 1.0)


def _ra(yp, ypf):
  """Relativistic-average logits: each side against the other side's batch mean."""
  return yp - jnp.mean(ypf), ypf - jnp.mean(yp)


def _ragan_d(yp, ypf):
  r, f = _ra(yp, ypf)
  return _bce(r, 1.0) + _bce(f, 0.0)


def _ragan_g(yp, ypf):
  r, f = _ra(yp, ypf)
  return _bce(f, 1.0) + _bce(r, 0.0)


def _ralsgan_d(yp, ypf):
  r, f = _ra(yp, ypf)
  return _sq(r - 1.0) + _sq(f + 1.0)


def _ralsgan_g(yp, ypf):
  r, f = _ra(yp, ypf)
  return _sq(f - 1.0) + _sq(r + 1.0)


def _rahinge_d(yp, ypf):
  r, f = _ra(yp, ypf)
  return _hinge(1.0 - r) + _hinge(1.0 + f)


def _rahinge_g(yp, ypf):
  r, f = _ra(yp, ypf)
  return _hinge(1.0 - f) + _hinge(1.0 + r)


# kind -> (discriminator loss, generator loss), both (yp, ypf) -> scalar.
_LOSSES: dict[str, tuple[_LossFn, _LossFn]] = {
    "lsgan": (_lsgan_d, lambda yp, ypf: _sq(ypf - 1.0)),
    # Saturating LSGAN: G maximizes D's fake term. The reference's `LSGAN_sat` writes
    # L_G = +E(ypf+1)^2, which would push fakes toward D's fake target; we use the sign that
    # makes G ascend D's loss, as the name intends.
    "lsgan_sat": (_lsgan_d, lambda yp, ypf: -_sq(ypf + 1.0)),
    "gan": (lambda yp, ypf: _bce(yp, 1.0) + _bce(ypf, 0.0), lambda yp, ypf: _bce(ypf, 1.0)),
    "wgan": (lambda yp, ypf: jnp.mean(ypf) - jnp.mean(yp), lambda yp, ypf: -jnp.mean(ypf)),
    "hinge": (lambda yp, ypf: _hinge(1.0 - yp) + _hinge(1.0 + ypf),
              lambda yp, ypf: -jnp.mean(ypf)),
    # Factor 2 as in the reference: keeps the scale comparable to the two-term losses.
    "rpgan": (lambda yp, ypf: 2.0 * _bce(yp - ypf, 1.0), lambda yp, ypf: 2.0 * _bce(ypf - yp, 1.0)),
    "rplsgan": (lambda yp, ypf: 2.0 * _sq(yp - ypf - 1.0),
                lambda yp, ypf: 2.0 * _sq(ypf - yp - 1.0)),
    "ragan": (_ragan_d, _ragan_g),
    "ralsgan": (_ralsgan_d, _ralsgan_g),
    "rahinge": (_rahinge_d, _rahinge_g),
}


def _resolve(kind: str) -> tuple[_LossFn, _LossFn]:
  if kind not in _LOSSES:
    raise ValueError(f"unknown GAN loss kind {kind!r}; expected one of {', '.join(GAN_LOSSES)}")
  return _LOSSES[kind]


def _check_logits(real_logits: jax.Array, fake_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  yp, ypf = jnp.asarray(real_logits), jnp.asarray(fake_logits)
  if yp.shape != ypf.shape:
    # Paired (rp*) losses subtract elementwise; require equal shapes everywhere for one contract.
    raise ValueError(f"real and fake logits must have the same shape, got {yp.shape} and "
                     f"{ypf.shape}")
  return yp, ypf


def discriminator_loss(real_logits: Logits, fake_logits: Logits, *, kind: str) -> jax.Array:
  """Discriminator loss `L_D` (minimized by the discriminator).

  Args:
    real_logits: discriminator outputs on real data `[b]` (any shape; means run over all entries).
    fake_logits: discriminator outputs on generated (denoised) data, same shape.
    kind: one of `GAN_LOSSES`.

  Returns:
    Scalar loss.

  Raises:
    ValueError: unknown `kind`, or logits of different shapes.
  """
  d_fn, _ = _resolve(kind)
  return d_fn(*_check_logits(real_logits, fake_logits))


def generator_loss(real_logits: Logits, fake_logits: Logits, *, kind: str) -> jax.Array:
  """Generator loss `L_G` (minimized by the score network through the fake logits).

  Args:
    real_logits: discriminator outputs on real data `[b]`; used by relativistic losses only.
    fake_logits: discriminator outputs on generated (denoised) data, same shape.
    kind: one of `GAN_LOSSES`.

  Returns:
    Scalar loss.

  Raises:
    ValueError: unknown `kind`, or logits of different shapes.
  """
  _, g_fn = _resolve(kind)
  return g_fn(*_check_logits(real_logits, fake_logits))


def discriminator_accuracy(real_logits: Logits,
                           fake_logits: Logits) -> tuple[jax.Array, jax.Array]:
  """Fractions of real logits classified real and of fake logits classified fake.

  A logit is classified real iff it is > 0. Zero is the decision threshold for every loss in
  `GAN_LOSSES`, so no loss kind is needed: the sigmoid midpoint for BCE losses, the sign for
  wgan/hinge and the relativistic losses, and the midpoint of the targets +1 / -1 for lsgan.

  Args:
    real_logits: discriminator outputs on real data `[b]`.
    fake_logits: discriminator outputs on fake data `[b]`.

  Returns:
    `(acc_real, acc_fake)` scalars in [0, 1].
  """
  acc_real = jnp.mean((jnp.asarray(real_logits) > 0.0).astype(jnp.float32))
  acc_fake = jnp.mean((jnp.asarray(fake_logits) <= 0.0).astype(jnp.float32))
  return acc_real, acc_fake


def adamp(learning_rate: optax.ScalarOrSchedule, b1: float = -0.5, b2: float = 0.9,
          eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam allowing negative momentum `b1` (the reference `Adamp`).

  m_t = b1 m + (1 - b1) g, v_t = b2 v + (1 - b2) g^2,
  update = -lr * (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps).
  `optax.adam` computes exactly this for any real b1 (checked in tests), so it is returned after
  validation. b1 = -1 is rejected: its bias correction 1 - (-1)^t is zero at even t.

  Args:
    learning_rate: step size or schedule.
    b1: first-moment decay, in (-1, 1).
    b2: second-moment decay, in [0, 1).
    eps: added to the denominator.

  Returns:
    The optax transformation.

  Raises:
    ValueError: b1 or b2 out of range.
  """
  if not -1.0 < b1 < 1.0:
    raise ValueError(f"adamp needs -1 < b1 < 1 (bias correction 1 - b1^t must be nonzero), "
                     f"got b1={b1}")
  if not 0.0 <= b2 < 1.0:
    raise ValueError(f"adamp needs 0 <= b2 < 1, got b2={b2}")
  return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
