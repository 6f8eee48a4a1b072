"""Runs the first code cell of notebooks/tour.ipynb (its install cell) in this interpreter, so CI
installs score_jax exactly as the notebook does. Run it from outside the checkout, with
SCORE_JAX_SOURCE naming what pip installs (the checkout's path)."""

import json
import pathlib
import sys

notebook = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "tour.ipynb"
cells = json.loads(notebook.read_text())["cells"]
source = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
if pathlib.Path.cwd().resolve().is_relative_to(notebook.parents[1]):
  sys.exit("run notebook_install.py from outside the checkout (it would use the checkout)")
exec(compile(source, f"{notebook}:first code cell", "exec"), {"__name__": "__main__"})
