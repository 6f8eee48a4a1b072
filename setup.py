"""The package list: every subpackage of score_jax, configs/ included through the symlink
score_jax/configs -> ../configs (find_packages follows it), so it ships as score_jax.configs."""

import setuptools

setuptools.setup(packages=setuptools.find_packages(include=["score_jax", "score_jax.*"]))
