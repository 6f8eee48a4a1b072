"""The package's import graph (read with `ast`, nothing imported): no circles, host loops apart."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "score_jax"


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
