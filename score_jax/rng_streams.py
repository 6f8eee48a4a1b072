"""The named random streams of a run: one table from a stream's name to the integer it folds in.

Every key a run uses is derived, never stored (STYLE.md, "State and randomness"): a stream's key
is `fold(parent, name)`, `jax.random.fold_in(parent, STREAMS[name])`. A name without a dot has the
run's root key `jax.random.key(seed)` as its parent (`key(seed, name)`); a dotted name is folded
from the key its prefix names (e.g. "sample.toy_truth" from the "sample" key), except
"step.discriminator", which is folded from a training step's own key (`steps.py`). The numbers
are those earlier versions folded in at each place, so every draw stays what it was; "eval_loss"
and "eval" share one number: they are different jobs (the training loop's EMA loss, the eval
mode's samples and statistics) that never meet.

The samplers' own sub-streams of "sample" are in their registry entries (`sampling.SAMPLERS`).
"""

from __future__ import annotations

import types

import jax

STREAMS = types.MappingProxyType({
    "init": 0x1A17,                 # the model's initial parameters
    "init.discriminator": 0xD,      # the discriminator's
    "step.discriminator": 0xD15C,   # a training step's discriminator updates
    "eval_loss": 0xE7A1,            # the training loop's EMA evaluation loss
    "sample": 0x5A3,                # the sample mode's samples (a sub-stream per sampler)
    "sample.toy_metrics": 7,        # the toy sample metrics' reference draws
    "sample.toy_truth": 11,         # the toy comparison plot's true samples
    "inpaint": 0x1AA,               # the inpainting completions
    "eval": 0xE7A1,                 # the eval and sampler-sweep modes
    "eval.samples": 0,              # their samples
    "eval.reference": 1,            # the toy reference samples they compare with
    "eval.kid": 2,                  # the KID subsets
    "likelihood_test_set": 0x7E57,  # the toy test set of --mode=likelihood
    "likelihood_examples": 0x11C,   # its per-example keys (then folded with the example index)
})


def fold(parent: jax.Array, name: str) -> jax.Array:
  """The key of stream `name` (a key of `STREAMS`) derived from `parent`."""
  if name not in STREAMS:
    raise KeyError(f"no random stream {name!r}; the streams are {', '.join(STREAMS)}")
  return jax.random.fold_in(parent, STREAMS[name])


def key(seed: int, name: str) -> jax.Array:
  """The key of stream `name` folded from the root key of the run seeded with `seed`."""
  return fold(jax.random.key(seed), name)
