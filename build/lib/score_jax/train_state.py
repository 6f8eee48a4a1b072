"""Training state: a Flax `TrainState` extended with EMA copies of the parameters, and the
`AdversarialState` of adversarial score matching (score network + discriminator)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state


class TrainState(train_state.TrainState):
  """`TrainState` plus `ema_params`: one parameter tree per EMA rate, in the config's order."""
  ema_params: tuple[Any, ...]

  def update_ema(self, decays: tuple[float, ...]) -> "TrainState":
    """EMA update `ema <- d * ema + (1 - d) * params` for every rate (Polyak averaging)."""
    ema = tuple(
        jax.tree.map(lambda e, p, d=d: d * e + (1.0 - d) * p, tree, self.params)
        for d, tree in zip(decays, self.ema_params))
    return self.replace(ema_params=ema)


def create_train_state(rng: jax.Array, model: nn.Module, x_example: jax.Array,
                       tx: optax.GradientTransformation, ema_decays: tuple[float, ...]) -> TrainState:
  """Initializes parameters on `x_example` ([b, ...]) and starts each EMA as a copy of them.

  The EMA trees are copies, not the same buffers: a donated step would otherwise free an alias.
  """
  sigma = jnp.ones((x_example.shape[0],), jnp.float32)
  variables = model.init({"params": rng, "dropout": rng}, x_example, sigma, train=False)
  params = variables["params"]
  ema = tuple(jax.tree.map(jnp.copy, params) for _ in ema_decays)
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx, ema_params=ema)


def param_count(params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


class DiscriminatorState(train_state.TrainState):
  """The discriminator's params and optimizer state plus its spectral-norm power-iteration state."""
  spectral_stats: Any


class AdversarialState(struct.PyTreeNode):
  """Score network and discriminator states, updated in a fixed order by one step.

  `step`, `params` and `ema_params` are the score network's, so sampling and logging code that
  reads a `TrainState` reads this too.
  """
  score: TrainState
  disc: DiscriminatorState

  @property
  def step(self):
    return self.score.step

  @property
  def params(self):
    return self.score.params

  @property
  def ema_params(self):
    return self.score.ema_params


def create_discriminator_state(rng: jax.Array, model: nn.Module, x_example: jax.Array,
                               tx: optax.GradientTransformation) -> DiscriminatorState:
  variables = model.init(rng, x_example, train=False)
  return DiscriminatorState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                   spectral_stats=variables.get("spectral_stats", {}))
