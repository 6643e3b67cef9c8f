"""The code's layout: no import cycles, model.py imports nothing of ours, a library module never imports an
entry point, no entry point imports another, and every module's opening comment says what it may import (and
it imports nothing else)."""
import ast
import os
import re

from conftest import REPO

ENTRY_POINTS = ("train", "sample", "analyze", "bench", "study", "convert", "gpu_check")


def our_modules():
    """module name -> path: the entry points, model.py and the sinkgpt package."""
    modules = {name: os.path.join(REPO, f"{name}.py") for name in ENTRY_POINTS + ("model",)}
    package = os.path.join(REPO, "sinkgpt")
    for file in sorted(os.listdir(package)):
        if file.endswith(".py") and file != "__init__.py":
            modules[f"sinkgpt.{file[:-3]}"] = os.path.join(package, file)
    return modules


def imports_of(path, known):
    """Our modules that a file imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def declared_imports(path):
    """The 'May import: a, b.' (or 'Imports nothing of ours.') paragraph of a module's docstring."""
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    if "Imports nothing of ours" in doc:
        return set()
    match = re.search(r"May import: ((?:[a-z_][a-z_.]*[a-z_](?:, )?)+)\.", doc.replace("\n", " "))
    assert match, f"{path}: the opening comment does not say what the module may import"
    return {name.strip() for name in match.group(1).split(",")}


def import_graph():
    modules = our_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_every_module_imports_only_what_its_opening_comment_allows():
    modules = our_modules()
    for name, path in modules.items():
        if name in ENTRY_POINTS:
            continue
        allowed = declared_imports(path)
        assert allowed <= set(modules), (name, allowed - set(modules))
        assert imports_of(path, modules) <= allowed, (name, imports_of(path, modules) - allowed)
    assert declared_imports(modules["model"]) == set()


def test_no_entry_point_imports_another_and_libraries_import_no_entry_point():
    graph = import_graph()
    for name, imported in graph.items():
        assert not imported & set(ENTRY_POINTS), (name, imported & set(ENTRY_POINTS))


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state = {}

    def visit(name, path):
        state[name] = "open"
        for other in graph[name]:
            assert state.get(other) != "open", " -> ".join(path + [other])
            if other not in state:
                visit(other, path + [other])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
