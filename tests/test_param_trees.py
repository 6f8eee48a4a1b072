"""Every network's variable tree (paths and shapes) on tiny presets, pinned.

Checkpoints and the PyTorch-checkpoint converter address parameters by these paths, so a
refactor of the networks must leave them exactly as they are. `tests/data/param_trees.json`
holds the pinned trees; regenerate it only for a deliberate architecture change:
`python -m tests.test_param_trees`.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

PINNED = pathlib.Path(__file__).with_name("data") / "param_trees.json"
LADDER = tuple(float(s) for s in np.geomspace(1.0, 0.01, 10))


def tiny_networks() -> dict:
  """name -> (module, example input shape, whether it takes sigma)."""
  from score_jax.models import discriminator as disc
  from score_jax.models import ncsn, unet
  from score_jax.models.mlp import NoiseConditionalMLP
  return {
      "ncsn": (ncsn.NCSN(ngf=4, num_channels=1, level_sigmas=LADDER), (2, 28, 28, 1), True),
      "ncsnv2": (ncsn.NCSNv2(ngf=4), (2, 8, 8, 3), True),
      "ncsnv2_deeper": (ncsn.NCSNv2Deeper(ngf=4), (2, 16, 16, 3), True),
      "ncsnv2_deepest": (ncsn.NCSNv2Deepest(ngf=4), (2, 16, 16, 3), True),
      "unet": (unet.UNet(ch=32, ch_mult=(1, 2), attn_resolutions=(8,)), (2, 16, 16, 3), True),
      "unet_conditional": (unet.UNet(ch=32, ch_mult=(1, 2), attn_resolutions=(8,),
                                     conditional=True), (2, 16, 16, 3), True),
      "mlp": (NoiseConditionalMLP(hidden=8), (4, 2), True),
      "biggan32": (disc.BigGANDiscriminator(ch=8, resolution=32), (2, 32, 32, 3), False),
      "biggan64_attn": (disc.BigGANDiscriminator(ch=8, resolution=64, attention_resolution=32),
                        (1, 64, 64, 3), False),
      "dcgan32": (disc.DCGANDiscriminator(ch=8, resolution=32), (2, 32, 32, 3), False),
      "dcgan32_plain": (disc.DCGANDiscriminator(ch=8, resolution=32, spectral_norm=False),
                        (2, 32, 32, 3), False),
      "mlp_discriminator": (disc.MLPDiscriminator(hidden=8), (4, 2), False),
  }


def variable_tree(module, shape, takes_sigma: bool) -> dict[str, list[int]]:
  """'collection/path/to/leaf' -> shape, from `init` traced abstractly."""
  args = (jnp.zeros(shape),) + ((jnp.ones(shape[:1]),) if takes_sigma else ())
  variables = jax.eval_shape(module.init, jax.random.key(0), *args)
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  return {"/".join(str(k.key) for k in path): list(leaf.shape) for path, leaf in leaves}


@pytest.mark.parametrize("name", sorted(tiny_networks()))
def test_variable_tree_is_unchanged(name):
  pinned = json.loads(PINNED.read_text())[name]
  got = variable_tree(*tiny_networks()[name])
  missing = sorted(set(pinned) - set(got))
  extra = sorted(set(got) - set(pinned))
  assert not missing and not extra, f"{name}: missing {missing[:5]}, unexpected {extra[:5]}"
  changed = {k: (pinned[k], got[k]) for k in pinned if pinned[k] != got[k]}
  assert not changed, f"{name}: shapes changed (pinned, now): {changed}"


if __name__ == "__main__":
  trees = {name: variable_tree(*spec) for name, spec in tiny_networks().items()}
  # One leaf a line, so a diff of the file reads as a diff of the trees.
  lines = [f' "{name}": {{\n' + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}"
                                              for k, v in sorted(tree.items())) + "}"
           for name, tree in sorted(trees.items())]
  PINNED.write_text("{\n" + ",\n".join(lines) + "\n}\n")
  print(f"wrote {PINNED}: {sum(map(len, trees.values()))} leaves in {len(trees)} networks")
