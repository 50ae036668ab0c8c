"""The import graph the design promises: common/ never imports a framework, the
two framework folders never import each other, the pure modules never reach MPI,
the training core never reaches the parallel drivers, and no module cycle exists."""

import ast
import os

from tests.helpers import REPO

PACKAGES = ("common", "train_torch", "train_tf")
FRAMEWORKS = ("torch", "tensorflow", "keras", "horovod.torch", "horovod.tensorflow")


MPI = ("mpi4py", "horovod")
# The modules that drive MPI or Horovod; everything else in common/ is pure.
DRIVERS = {"common.parallel.pipeline", "common.parallel.parameter_server", "common.parallel.data_parallel",
           "common.parallel.p2p", "common.parallel.collectives", "common.parallel.drivers", "common.launch.entry",
           "common.launch.ray", "common.parallel.auto"}


def modules():
    for package in PACKAGES:
        for root, folders, names in os.walk(os.path.join(REPO, package)):
            folders[:] = sorted(folder for folder in folders if folder != "__pycache__")
            for name in sorted(names):
                if name.endswith(".py"):
                    dotted = os.path.relpath(os.path.join(root, name[:-3]), REPO).replace(os.sep, ".")
                    yield dotted.removesuffix(".__init__"), os.path.join(root, name)


def is_main_block(node):
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("__name__ == '__main__'", '__name__ == "__main__"')


def imports(path):
    """Every module ``path`` imports, at any depth (function-level imports included), but
    its ``if __name__ == "__main__":`` block."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    tree.body = [node for node in tree.body if not is_main_block(node)]  # runs only as a command
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


def reaches(name):
    """Every module of ours ``name`` imports, directly or through others, and the outside
    modules those import."""
    seen, frontier = set(), [name]
    while frontier:
        for imported in GRAPH[frontier.pop()]:
            if imported not in seen:
                seen.add(imported)
                if imported in GRAPH:
                    frontier.append(imported)
    return seen


def test_common_is_grouped_into_packages():
    packages = {name for name, path in modules() if path.endswith("__init__.py")}
    flat = [name for name in GRAPH if name.count(".") == 1 and name.startswith("common.") and name not in packages]
    assert not flat, f"modules outside a package of common/: {flat}"
    assert {name.split(".")[1] for name in GRAPH if name.count(".") == 2 and name.startswith("common.")} == \
        {"core", "parallel", "model", "data", "observe", "launch"}


def test_pure_modules_never_reach_mpi():
    pure = [name for name in GRAPH if name.startswith("common.") and name not in DRIVERS]
    assert "common.parallel.plan" in pure and "common.parallel.schedule" in pure and len(pure) > 30
    for name in pure:
        reached = [module for module in reaches(name) if module.split(".")[0] in MPI]
        assert not reached, f"{name} reaches {reached}"


def test_the_core_never_reaches_the_parallel_drivers():
    for name in (name for name in GRAPH if name.startswith("common.core.")):
        reached = [module for module in reaches(name) if module in DRIVERS]
        assert not reached, f"{name} reaches {reached}"


def test_the_framework_folders_mirror_each_other_file_for_file():
    def python_files(folder):
        return {name for name in os.listdir(os.path.join(REPO, folder)) if name.endswith(".py")}

    assert python_files("train_torch") == python_files("train_tf")
    assert {"main.py", "model.py", "stage.py", "data_parallel.py", "horovod_glue.py"} <= python_files("train_torch")


def test_a_stage_reaches_horovod_only_through_the_horovod_module():
    for framework in ("train_torch", "train_tf"):
        assert f"{framework}.data_parallel" not in GRAPH[f"{framework}.stage"]
        assert f"{framework}.horovod_glue" in GRAPH[f"{framework}.stage"]
