"""The package's shape: farmer_jax/ modules import each other in one direction only (no cycle, lazy
imports included) and never reach into another module's private names."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "farmer_jax"


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse_package() -> dict[str, ast.Module]:
  return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def imports(tree: ast.Module, modules: set[str]) -> dict[str, str]:
  """{local alias: imported farmer_jax module}, from every import statement (top-level or in a
  function body: a lazy import is still a dependency)."""
  found = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("farmer_jax"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        found[alias.asname or alias.name] = full if full in modules else node.module
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("farmer_jax"):
          found[alias.asname or alias.name] = alias.name
  return found


def test_the_import_graph_has_no_cycle():
  trees = parse_package()
  graph = {m: set(imports(t, set(trees)).values()) & set(trees) - {m} for m, t in trees.items()}
  state = {}

  def visit(m, path):
    state[m] = "active"
    for d in sorted(graph[m]):
      assert state.get(d) != "active", f"import cycle: {' -> '.join(path + [m, d])}"
      if d not in state:
        visit(d, path + [m])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [])
  assert "farmer_jax.distill" not in graph["farmer_jax.train"]   # train is imported downward
  assert "farmer_jax.train" not in graph["farmer_jax.rundir"]


def test_no_private_name_is_used_across_modules():
  trees = parse_package()
  offences = []
  for name, tree in trees.items():
    aliases = imports(tree, set(trees))
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("farmer_jax"):
        offences += [f"{name}: from {node.module} import {a.name}" for a in node.names
                     if a.name.startswith("_")]
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_")
          and aliases[node.value.id] != name):
        offences.append(f"{name}: {node.value.id}.{node.attr}")
  assert not offences, offences
