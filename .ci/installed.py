"""Prints `name==version` of every distribution installed in this interpreter, sorted (the
constraints that keep an environment's packages where they are)."""

import importlib.metadata

names = {}
for dist in importlib.metadata.distributions():
  name = dist.metadata["Name"]
  if name:
    names[name.lower().replace("_", "-")] = f"{name}=={dist.version}"
print("\n".join(names[k] for k in sorted(names)))
