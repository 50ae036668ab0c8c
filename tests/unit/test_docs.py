"""Docs cannot go stale silently: every file the README, the Makefile or a
docstring or comment in the code names exists."""

import os
import re

from tests.helpers import REPO

NAMED = re.compile(r"\b((?:common|train_torch|train_tf|slurm|tests|benchmarks|\.ci)/[\w./-]*\w)")


def exists(path):
    """A file or directory, or a module's attribute such as common/core/trainer.Trainer.run."""
    folder, _, name = path.rpartition("/")
    module = os.path.join(folder, name.split(".")[0] + ".py")
    return os.path.exists(os.path.join(REPO, path)) or os.path.exists(os.path.join(REPO, module))


def documents():
    yield "README.md"
    yield "Makefile"
    for folder in ("common", "train_torch", "train_tf", "slurm", "benchmarks", "tests"):
        for root, _, names in os.walk(os.path.join(REPO, folder)):
            yield from (os.path.relpath(os.path.join(root, name), REPO) for name in names
                        if name.endswith((".py", ".sh", ".sbatch")))


def test_every_file_the_docs_name_exists():
    missing = []
    for document in documents():
        with open(os.path.join(REPO, document), encoding="utf-8") as handle:
            named = set(NAMED.findall(handle.read()))
        missing += [f"{document}: {path}" for path in sorted(named) if not exists(path)]
    assert not missing, f"files named but missing: {missing}"


def test_the_readme_names_the_files_it_explains():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        assert len(set(NAMED.findall(handle.read()))) > 20
