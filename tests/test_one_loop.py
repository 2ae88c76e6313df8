"""Layout of the training library (issue #23): one loop, trainers that never import each other, no import circle,
the demo recipe outside the package, old import paths that still work or name the new place."""

from __future__ import annotations

import ast
import importlib
import os

import pytest

from helios_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 700  # issue #23: no module passes 700 lines


def _modules(package_dir: str, prefix: str) -> dict[str, str]:
  """{dotted module name: path} of every .py under ``package_dir`` (a package's own name for __init__.py)."""
  out = {}
  for folder, _, files in os.walk(os.path.join(ROOT, package_dir)):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
  return {k: v for k, v in out.items() if k.startswith(prefix)}


def _imports(path: str, known: set[str]) -> set[str]:
  """Modules of ``known`` that ``path`` imports anywhere (top level or inside functions)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
  return {n for n in names if n in known}


def _graph(prefix: str) -> dict[str, set[str]]:
  mods = _modules("helios_jax", "helios_jax")
  known = set(mods)
  return {m: _imports(p, known) for m, p in mods.items() if m.startswith(prefix)}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle among the graph's own nodes, or None."""
  state, stack = {}, []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if n not in graph:
        continue
      if state.get(n) == 1:
        return stack[stack.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_the_cycle_finder_finds_a_circle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_in_the_training_library():
  graph = _graph("helios_jax.training")
  assert len(graph) > 20  # the walk found the library
  assert _cycle(graph) is None, _cycle(graph)


def test_trainers_import_only_the_library():
  graph = _graph("helios_jax.training")
  trainers = {m for m in graph if m.startswith("helios_jax.training.trainers.")}
  assert {"helios_jax.training.trainers.base", "helios_jax.training.trainers.ode",
          "helios_jax.training.trainers.ahd"} <= trainers
  shims = {"helios_jax.training.trainer", "helios_jax.training.ahd_trainer", "helios_jax.training.dispatch"}
  for m in trainers:
    assert not (graph[m] & (trainers | shims)), (m, graph[m] & (trainers | shims))
    assert "run_from_config" in open(_modules("helios_jax", m)[m], encoding="utf-8").read()  # the one loop
  for m, deps in graph.items():  # nothing in the library imports the old paths or the dispatcher
    if m not in shims:
      assert not deps & shims, (m, deps & shims)


def test_the_package_never_imports_recipes_configs_or_scripts():
  for m, path in _modules("helios_jax", "helios_jax").items():
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      for n in names:
        assert n.split(".")[0] not in ("recipes", "configs", "benchmarks", "train", "sample", "serve"), (m, n)


def test_modules_stay_under_the_line_limit_and_configs_recipes_keep_sys_path_alone():
  for package in ("helios_jax/training", "recipes", "configs"):
    for path in _modules(package, "").values():
      text = open(path, encoding="utf-8").read()
      assert text.count("\n") <= MAX_LINES, path
      if package != "helios_jax/training":
        assert "sys.path.insert" not in text, path


def test_old_import_paths_still_work_or_name_the_new_place():
  from helios_jax.training import ahd_trainer, dispatch, export, loop, sources, trainer
  from helios_jax.training.trainers import ahd
  assert trainer.train is dispatch.train and trainer.make_source is sources.make_source
  assert trainer.export_merged is export.export_merged and trainer.TrainingError is loop.TrainingError
  assert ahd_trainer.train is ahd.train and ahd_trainer.Phases is ahd.Phases
  assert ahd_trainer.negative_embeds is sources.negative_embeds
  from helios_jax.training import ode
  with pytest.raises(AttributeError, match="helios_jax.training.trainers.ode.train"):
    ode.train  # noqa: B018
  for name in ("demo", "scenes", "vae_train"):
    with pytest.raises(ImportError, match=f"recipes.demo.{name}"):
      importlib.import_module(f"helios_jax.training.{name}")


def test_dispatch_picks_the_trainer_of_the_stage():
  from helios_jax.training import dispatch
  assert dispatch.trainer_for("base").__name__ == "helios_jax.training.trainers.base"
  assert dispatch.trainer_for("mid").__name__ == "helios_jax.training.trainers.base"
  assert dispatch.trainer_for("ode").__name__ == "helios_jax.training.trainers.ode"
  assert dispatch.trainer_for("ahd").__name__ == "helios_jax.training.trainers.ahd"
  with pytest.raises(InputError, match="config.stage must be one of"):
    dispatch.trainer_for("vae")


def _data(source, data_dir=""):
  import ml_collections
  return ml_collections.ConfigDict(dict(data=dict(source=source, data_dir=data_dir)))


def test_sources_by_registered_name_and_import_path(monkeypatch, tmp_path):
  from helios_jax.training import sources
  monkeypatch.setattr(sources, "_REGISTRY", {})
  with pytest.raises(InputError, match="registered by configs/demo_base.py"):
    sources.make_source(_data("demo"))
  with pytest.raises(InputError, match="a registered name"):
    sources.make_source(_data("nothing_like_this"))
  with pytest.raises(InputError, match="cannot import"):
    sources.make_source(_data("no_such_package_xyz.mod:source"))
  with pytest.raises(InputError, match="has no attribute"):
    sources.make_source(_data("helios_jax.training.sources:no_such_factory"))
  with pytest.raises(InputError, match="built in"):
    sources.register_source("synthetic", lambda d: None)
  seen = []
  sources.register_source("mine", lambda d: seen.append(d.data_dir) or "the source")
  assert sources.make_source(_data("mine", "somewhere")) == "the source" and seen == ["somewhere"]
  # the demo config registers its source as an import path; the recipe is imported only when it is built
  from configs import demo_base
  importlib.reload(demo_base)
  assert sources._REGISTRY["demo"] == "recipes.demo.demo:source"
  with pytest.raises(InputError, match="no encoded demo dataset"):
    sources.make_source(_data("demo", str(tmp_path)))
