"""The import graph the design promises: common/ never imports a framework, the
two framework folders never import each other, and no module cycle exists."""

import ast
import os

from tests.helpers import REPO

PACKAGES = ("common", "train_torch", "train_tf")
FRAMEWORKS = ("torch", "tensorflow", "keras", "horovod.torch", "horovod.tensorflow")


def modules():
    for package in PACKAGES:
        for name in sorted(os.listdir(os.path.join(REPO, package))):
            if name.endswith(".py"):
                yield f"{package}.{name[:-3]}", os.path.join(REPO, package, name)


def imports(path):
    """Every module ``path`` imports, at any depth (function-level imports included)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


GRAPH = {name: imports(path) for name, path in modules()}


def test_common_imports_no_framework():
    for name, imported in GRAPH.items():
        if name.startswith("common."):
            assert not [m for m in imported if m.split(".")[0] in ("torch", "tensorflow", "keras")
                        or m.startswith(FRAMEWORKS[3:])], name


def test_the_framework_folders_never_import_each_other():
    for name, imported in GRAPH.items():
        other = {"train_torch": "train_tf", "train_tf": "train_torch"}.get(name.split(".")[0])
        if other:
            assert not [m for m in imported if m.split(".")[0] == other], name


def test_no_import_cycle():
    edges = {name: {m for m in imported if m in GRAPH} for name, imported in GRAPH.items()}
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "active", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "active"
        for following in edges[node]:
            visit(following, path + [node])
        state[node] = "done"

    assert len(edges) > 20
    for node in edges:
        visit(node, [])
