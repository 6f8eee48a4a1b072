"""The package list: every subpackage of score_jax, and configs/ shipped as score_jax.configs
(pyproject.toml's `packages.find` cannot add a package that lives outside score_jax/)."""

import setuptools

setuptools.setup(
  packages=setuptools.find_packages(include=["score_jax", "score_jax.*"]) + ["score_jax.configs"])
