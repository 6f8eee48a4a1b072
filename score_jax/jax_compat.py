"""The few JAX calls whose spelling differs across the supported range (jax 0.7.2, Colab's, to the
newest): shard_map's varying-axes type system was renamed after 0.7 (`lax.pvary` became
`lax.pcast(..., to="varying")`, `typeof(x).vma` became `typeof(x).mat.varying`)."""

from __future__ import annotations

from typing import Any

import jax
from jax import lax


def pcast_varying(tree: Any, axes: str | tuple[str, ...]) -> Any:
  """`tree` cast to vary over the mesh axes `axes` inside `shard_map` (values unchanged)."""
  if hasattr(lax, "pcast"):
    return lax.pcast(tree, axes, to="varying")
  return lax.pvary(tree, axes)


def varying_axes(x: jax.Array) -> frozenset[str]:
  """The mesh axes over which `x` varies inside `shard_map` (empty outside it)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))
