"""Prints `name==version` of every distribution installed in this interpreter, names normalized
(lower case, `-`), sorted: the constraints that keep an environment's packages where they are."""

import importlib.metadata

names = {}
for dist in importlib.metadata.distributions():
  name = dist.metadata["Name"]
  if name:
    key = name.lower().replace("_", "-").replace(".", "-")
    names[key] = f"{key}=={dist.version}"
print("\n".join(names[k] for k in sorted(names)))
