"""The package's imports (read with `ast`, nothing imported): no circles, host loops apart, a
stated reason on every function-local import of the package's own modules, and `ml_collections`
only at the config boundary (STYLE.md: the CLI, the schema, `experiment.py`, `stored_config.py`
and the model factory)."""

import ast
import io
import pathlib
import re
import tokenize

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "score_jax"

# The modules that may read a ConfigDict; everything below them takes plain values.
ML_COLLECTIONS_IMPORTERS = {"score_jax/cli.py", "score_jax/config_schema.py",
                            "score_jax/experiment.py", "score_jax/stored_config.py",
                            "score_jax/models/__init__.py"}

_REASON = re.compile(r"#\s*local import:\s*\S")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The package modules `path` imports anywhere in its body (function-level imports included)."""
  name = _module_name(path)
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      candidates = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      # `from score_jax.models import mlp` imports the submodule; `from score_jax.noise import
      # ladder` imports the module that defines the name.
      candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names]
    else:
      continue
    for candidate in candidates:
      # A dotted name that is no module of the package stands for its nearest module parent.
      while candidate and candidate not in modules:
        candidate = candidate.rpartition(".")[0]
      if candidate and candidate != name and candidate != "score_jax":
        found.add(candidate)
  return found


def import_graph() -> dict[str, set[str]]:
  paths = sorted(PACKAGE.rglob("*.py"))
  modules = {_module_name(p) for p in paths}
  return {_module_name(p): _imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle of `graph` as `[a, b, ..., a]`, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_a_circle_and_accepts_a_tree():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_reads_the_package():
  graph = import_graph()
  assert "score_jax.experiment" in graph["score_jax.cli"] or "score_jax.experiment" in {
      m for deps in graph.values() for m in deps}
  assert "score_jax.noise" in graph["score_jax.experiment"]


def test_no_import_circle_in_the_package():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_host_loops_do_not_import_each_other():
  graph = import_graph()
  for reader in ("score_jax.sample", "score_jax.evaluate"):
    assert "score_jax.train" not in graph[reader], f"{reader} imports score_jax.train"
  assert "score_jax.evaluate" not in graph["score_jax.sample"]
  assert "score_jax.sample" not in graph["score_jax.evaluate"]


def test_eval_package_does_not_import_the_host_loops():
  graph = import_graph()
  eval_modules = [m for m in graph if m == "score_jax.eval" or m.startswith("score_jax.eval.")]
  assert {"score_jax.eval.inception", "score_jax.eval.evaluators"} <= set(eval_modules)
  loops = {"score_jax.train", "score_jax.sample", "score_jax.evaluate", "score_jax.likelihood_eval",
           "score_jax.cli"}
  for module in eval_modules:
    assert not graph[module] & loops, f"{module} imports {sorted(graph[module] & loops)}"


def _package_files() -> list[pathlib.Path]:
  """The package's modules; `score_jax/configs` (a link to the configs, which are the config
  and build ConfigDicts) is not walked."""
  return [p for p in sorted(PACKAGE.rglob("*.py"))
          if p.relative_to(PACKAGE).parts[0] != "configs"]


def _is_package_import(node: ast.AST) -> bool:
  if isinstance(node, ast.ImportFrom):
    return bool(node.level) or node.module == "score_jax" or (
        node.module or "").startswith("score_jax.")
  if isinstance(node, ast.Import):
    return any(a.name == "score_jax" or a.name.startswith("score_jax.") for a in node.names)
  return False


def unexplained_local_imports(source: str) -> list[int]:
  """Lines of the function-local imports of score_jax modules in `source` without a reason.

  A reason is a `# local import: <why>` comment on the import's own lines, or among the comment
  lines right above it, where other imports of the same function may stand between the two
  (one comment can explain a group of imports).
  """
  comments: dict[int, str] = {}
  comment_only: set[int] = set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string
      if not tok.line[:tok.start[1]].strip():
        comment_only.add(tok.start[0])
  lines = source.splitlines()
  missing = set()
  for fn in ast.walk(ast.parse(source)):
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    imports = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    import_lines = {i for n in imports for i in range(n.lineno, n.end_lineno + 1)}
    for node in imports:
      if not _is_package_import(node):
        continue
      found = [comments.get(i, "") for i in range(node.lineno, node.end_lineno + 1)]
      above = node.lineno - 1
      while above >= 1 and lines[above - 1].strip() and (
          above in comment_only or above in import_lines):
        if above in comment_only:
          found.append(comments[above])
        above -= 1
      if not any(_REASON.search(c) for c in found):
        missing.add(node.lineno)
  return sorted(missing)


def test_unexplained_local_imports_finds_the_imports_without_a_reason():
  source = """
from score_jax import noise


def a():
  from score_jax import data
  import numpy as np
  return data, np


def b():
  # local import: grain, for image datasets only
  import os
  from score_jax import image_data
  from . import toy  # local import: a reason on its own line
  return image_data, toy, os


class C:
  def c(self):
    import score_jax.models
    # local import: a comment above a blank line does not count

    from score_jax.eval import (
        inception)  # local import: on a continuation line
    return score_jax.models, inception


def d():
  import jax  # local import: another import's trailing comment does not count
  from ..score_jax import samplers
  return jax, samplers
"""
  assert unexplained_local_imports(source) == [6, 21, 31]


def test_every_function_local_package_import_states_its_reason():
  missing = [f"{path.relative_to(PACKAGE.parent)}:{line}"
             for path in _package_files()
             for line in unexplained_local_imports(path.read_text())]
  assert not missing, (
      "function-local imports of score_jax modules without a `# local import: <reason>` comment "
      "(move them to the top of the module, or say why they must stay: an optional or heavy "
      "dependency, fast usage errors, an import circle): " + ", ".join(missing))


def ml_collections_importers() -> set[str]:
  """The package files that import ml_collections anywhere (functions included)."""
  found = set()
  for path in _package_files():
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
      if any(n == "ml_collections" or n.startswith("ml_collections.") for n in names):
        found.add(path.relative_to(PACKAGE.parent).as_posix())
  return found


def test_only_the_config_boundary_imports_ml_collections():
  found = ml_collections_importers()
  assert "score_jax/config_schema.py" in found  # the walk sees the package
  extra = sorted(found - ML_COLLECTIONS_IMPORTERS)
  assert not extra, (
      f"{', '.join(extra)} import ml_collections; only {', '.join(sorted(ML_COLLECTIONS_IMPORTERS))}"
      " may: pass the Experiment (experiment.build) or the plain values a module needs instead")
