"""The package's layout rules, checked from the source (``ast``; nothing is imported or executed).

* no import circle between modules of ``helios_jax``, counting top-level imports, imports inside functions and
  relative imports alike (a circle through a local import is still a circle: it only moves the failure to run
  time);
* no ``.py`` file of the package, the entry scripts, ``benchmarks/`` or ``recipes/`` is longer than
  :data:`MAX_LINES`;
* the allowed directions of docs/architecture.md, "What may import what".

``python tests/test_architecture.py`` prints every violation (the same checks, without pytest).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "helios_jax"
MAX_LINES = 700  # the project's module size limit (docs/architecture.md)
ENTRY_SCRIPTS = ("sample.py", "train.py", "serve.py")
LINE_LIMITED_FOLDERS = (PACKAGE, "benchmarks", "recipes")
# Top-level names of this repository that are not the package: the package must never import them.
OUTSIDE_PACKAGE = ("benchmarks", "recipes", "tests", "configs", "sample", "train", "serve")

# docs/architecture.md "What may import what": a module under the key may import, of our package, only modules
# under these prefixes (its own subpackage is always allowed).
ALLOWED = {
    "helios_jax.errors": (),
    "helios_jax.models": ("helios_jax.io", "helios_jax.parallel", "helios_jax.errors"),
    "helios_jax.schedulers": ("helios_jax.io", "helios_jax.errors"),
    "helios_jax.pipelines": ("helios_jax.models", "helios_jax.schedulers", "helios_jax.io", "helios_jax.parallel",
                             "helios_jax.offload", "helios_jax.errors"),
    "helios_jax.offload": ("helios_jax.errors",),
}
# Subpackages nothing outside themselves may import.
PRIVATE_SUBPACKAGES = ("helios_jax.serving", "helios_jax.training")


@dataclasses.dataclass(frozen=True)
class Edge:
  """``source`` imports ``target`` at ``path:line`` (``path`` relative to the repository root; ``local``: inside
  a function or method)."""

  source: str
  target: str
  path: str
  line: int
  local: bool

  def where(self) -> str:
    return f"{self.path}:{self.line}{' (local)' if self.local else ''}"


def package_modules(root: str = ROOT) -> dict[str, str]:
  """Dotted module name -> file path for every ``.py`` file of the package (``pkg/__init__.py`` is ``pkg``)."""
  out = {}
  for folder, dirs, files in os.walk(os.path.join(root, PACKAGE)):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        out[".".join(parts)] = path
  return out


def _nearest_module(name: str, modules: dict[str, str]) -> str | None:
  """``name`` if it is one of our modules, else its longest prefix that is (``a.b.func`` -> ``a.b``)."""
  parts = name.split(".")
  while parts:
    candidate = ".".join(parts)
    if candidate in modules:
      return candidate
    parts.pop()
  return None


def _local_lines(tree: ast.AST) -> set[int]:
  """Ids of the import nodes that sit inside a function body (so run only when it is called)."""
  local = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      for inner in ast.walk(node):
        if isinstance(inner, (ast.Import, ast.ImportFrom)):
          local.add(id(inner))
  return local


def imported_names(module: str, path: str) -> list[tuple[str, int, bool]]:
  """Every absolute dotted name ``module`` imports, as ``(name, line, local)``, wherever the statement is.

  ``from X import a, b`` yields ``X.a`` and ``X.b`` (resolved to ``X`` later when they are not modules);
  relative imports are resolved against the module's package.
  """
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  local = _local_lines(tree)
  is_package = os.path.basename(path) == "__init__.py"
  package_parts = module.split(".") if is_package else module.split(".")[:-1]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.extend((alias.name, node.lineno, id(node) in local) for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base_parts = package_parts[:len(package_parts) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
      else:
        base = node.module or ""
      for alias in node.names:
        name = base if alias.name == "*" else f"{base}.{alias.name}"
        out.append((name, node.lineno, id(node) in local))
  return out


def import_graph(root: str = ROOT) -> tuple[dict[str, str], list[Edge], list[Edge]]:
  """``(modules, edges between our modules, imports of top-level names outside the package)``."""
  modules = package_modules(root)
  edges, outside = [], []
  for module, path in modules.items():
    rel = os.path.relpath(path, root)
    for name, line, local in imported_names(module, path):
      top = name.split(".")[0]
      if top == PACKAGE:
        target = _nearest_module(name, modules)
        if target is not None and target != module:
          edges.append(Edge(module, target, rel, line, local))
      elif top in OUTSIDE_PACKAGE:
        outside.append(Edge(module, name, rel, line, local))
  return modules, edges, outside


def find_cycles(edges: list[Edge]) -> list[list[str]]:
  """The import circles: for every strongly connected component of more than one module, one closed path
  through it (``[a, b, ..., a]``), found by breadth-first search from the component's first module."""
  graph: dict[str, set[str]] = {}
  for e in edges:
    graph.setdefault(e.source, set()).add(e.target)
    graph.setdefault(e.target, set())
  # Tarjan's strongly connected components, iteratively (no recursion limit on deep graphs).
  index, low, on_stack, stack, components = {}, {}, set(), [], []
  counter = 0
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = counter
    counter += 1
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      advanced = False
      for child in children:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
          advanced = True
          break
        if child in on_stack:
          low[node] = min(low[node], index[child])
      if advanced:
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          components.append(sorted(component))
  cycles = []
  for component in sorted(components):
    members = set(component)
    first = component[0]
    parents = {first: None}
    queue = [first]
    closing = None
    while queue and closing is None:
      node = queue.pop(0)
      for child in sorted(graph[node] & members):
        if child == first:
          closing = node
          break
        if child not in parents:
          parents[child] = node
          queue.append(child)
    path = [first]
    node = closing
    while node is not None and node != first:
      path.append(node)
      node = parents[node]
    cycles.append([first] + path[1:][::-1] + [first])
  return cycles


def _edge_where(edges: list[Edge], source: str, target: str) -> str:
  return ", ".join(e.where() for e in edges if e.source == source and e.target == target)


def cycle_report(edges: list[Edge]) -> list[str]:
  lines = []
  for cycle in find_cycles(edges):
    steps = "; ".join(f"{a} -> {b} ({_edge_where(edges, a, b)})" for a, b in zip(cycle[:-1], cycle[1:]))
    lines.append(f"import circle {' -> '.join(cycle)}: {steps}")
  return lines


def _under(module: str, prefix: str) -> bool:
  return module == prefix or module.startswith(prefix + ".")


def direction_report(edges: list[Edge], outside: list[Edge]) -> list[str]:
  """Every import that breaks a rule of docs/architecture.md "What may import what"."""
  problems = []
  for e in outside:
    problems.append(f"{e.source} imports {e.target} ({e.where()}): the package never imports the entry scripts, "
                    "benchmarks/, recipes/, configs/ or tests/")
  for e in edges:
    for private in PRIVATE_SUBPACKAGES:
      if _under(e.target, private) and not _under(e.source, private):
        problems.append(f"{e.source} imports {e.target} ({e.where()}): nothing in the package outside {private} "
                        f"may import it")
    for layer, allowed in ALLOWED.items():
      if _under(e.source, layer) and not _under(e.target, layer) and not any(_under(e.target, a) for a in allowed):
        problems.append(f"{e.source} imports {e.target} ({e.where()}): {layer} may import only "
                        f"{', '.join(allowed) or 'nothing of ours'}")
  return problems


def line_limited_files(root: str = ROOT) -> list[str]:
  paths = [os.path.join(root, s) for s in ENTRY_SCRIPTS if os.path.isfile(os.path.join(root, s))]
  for top in LINE_LIMITED_FOLDERS:
    for folder, dirs, files in os.walk(os.path.join(root, top)):
      dirs[:] = sorted(d for d in dirs if d != "__pycache__")
      paths.extend(os.path.join(folder, n) for n in sorted(files) if n.endswith(".py"))
  return paths


def length_report(root: str = ROOT) -> list[str]:
  problems = []
  for path in line_limited_files(root):
    with open(path, encoding="utf-8") as f:
      n = sum(1 for _ in f)
    if n > MAX_LINES:
      problems.append(f"{os.path.relpath(path, root)} has {n} lines (limit {MAX_LINES})")
  return problems


# ------------------------------------------------------------------------------------------------------------
# The checker itself, on small made-up packages
# ------------------------------------------------------------------------------------------------------------

def _write_package(root, files: dict[str, str]) -> str:
  for rel, text in files.items():
    path = os.path.join(str(root), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
  return str(root)


def test_checker_finds_a_circle_through_a_local_relative_import(tmp_path):
  root = _write_package(tmp_path, {
      "helios_jax/__init__.py": "",
      "helios_jax/a/__init__.py": "",
      "helios_jax/a/x.py": "from helios_jax.a.y import thing\n",
      "helios_jax/a/y.py": "def thing():\n  from .z import other\n  return other\n",
      "helios_jax/a/z.py": "from . import x\n",
      "helios_jax/b.py": "import helios_jax.a.x\n",
  })
  _, edges, _ = import_graph(root)
  assert find_cycles(edges) == [["helios_jax.a.x", "helios_jax.a.y", "helios_jax.a.z", "helios_jax.a.x"]]
  local = [e for e in edges if e.local]
  assert [(e.source, e.target, e.line) for e in local] == [("helios_jax.a.y", "helios_jax.a.z", 2)]
  assert "helios_jax.a.y -> helios_jax.a.z (helios_jax/a/y.py:2 (local))" in cycle_report(edges)[0]


def test_checker_accepts_one_way_imports_and_flags_rule_breaks(tmp_path):
  root = _write_package(tmp_path, {
      "helios_jax/__init__.py": "",
      "helios_jax/errors.py": "",
      "helios_jax/models/__init__.py": "from helios_jax.models.m import M\n",
      "helios_jax/models/m.py": "from helios_jax import errors\n\nclass M:\n  def f(self):\n"
                                "    from helios_jax.pipelines import p\n",
      "helios_jax/pipelines/__init__.py": "",
      "helios_jax/pipelines/p.py": "from helios_jax.models import M\nimport benchmarks.fps\n",
      "helios_jax/training/__init__.py": "",
      "helios_jax/training/t.py": "from ..models.m import M\n",
      "helios_jax/io/__init__.py": "from helios_jax.training import t\n",
  })
  _, edges, outside = import_graph(root)
  assert find_cycles(edges) == [["helios_jax.models", "helios_jax.models.m", "helios_jax.pipelines.p",
                                 "helios_jax.models"]]
  problems = direction_report(edges, outside)
  assert any(p.startswith("helios_jax.pipelines.p imports benchmarks.fps") for p in problems)
  assert any(p.startswith("helios_jax.io imports helios_jax.training") for p in problems)
  assert any(p.startswith("helios_jax.models.m imports helios_jax.pipelines.p") for p in problems)
  assert not any(p.startswith("helios_jax.training.t") for p in problems)  # training -> models is allowed
  assert len(problems) == 3, problems


def test_checker_counts_lines(tmp_path):
  root = _write_package(tmp_path, {"helios_jax/__init__.py": "x = 1\n" * MAX_LINES,
                                   "benchmarks/long.py": "x = 1\n" * (MAX_LINES + 1), "sample.py": ""})
  assert length_report(root) == [f"benchmarks/long.py has {MAX_LINES + 1} lines (limit {MAX_LINES})"]


# ------------------------------------------------------------------------------------------------------------
# The repository
# ------------------------------------------------------------------------------------------------------------

def test_the_graph_sees_the_package():
  modules, edges, _ = import_graph()
  assert "helios_jax.models.transformer" in modules and "helios_jax.schedulers.dmd" in modules
  # A known one-way edge, so an empty graph (a parser that sees nothing) cannot pass the checks below.
  assert any(e.source == "helios_jax.pipelines.denoise" and _under(e.target, "helios_jax.schedulers")
             for e in edges)


def test_no_import_circle():
  _, edges, _ = import_graph()
  problems = cycle_report(edges)
  assert not problems, "\n".join(problems)


def test_no_module_over_the_line_limit():
  problems = length_report()
  assert not problems, "\n".join(problems)


def test_imports_follow_the_allowed_directions():
  _, edges, outside = import_graph()
  problems = direction_report(edges, outside)
  assert not problems, "\n".join(problems)


if __name__ == "__main__":
  _, all_edges, all_outside = import_graph()
  found = cycle_report(all_edges) + length_report() + direction_report(all_edges, all_outside)
  print("\n".join(found) if found else "no violations")
  sys.exit(1 if found else 0)
