"""Experiment configs; `default.py` is the schema and every other file overrides it.

In a source checkout this folder is the top-level package `configs`; an installed score_jax ships
it as `score_jax.configs`. The files import each other as `configs.<name>`, so when no top-level
`configs` package is importable, the installed copy also answers to that name.
"""

import importlib.util
import sys

if __name__ != "configs" and "configs" not in sys.modules and (
    importlib.util.find_spec("configs") is None):
  sys.modules["configs"] = sys.modules[__name__]
