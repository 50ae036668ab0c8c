"""The README cannot go stale silently: every file it names exists."""

import os
import re

from tests.helpers import REPO

NAMED = re.compile(r"\b((?:common|train_torch|train_tf|slurm|tests|benchmarks|\.ci)/[\w./-]*\w)")


def exists(path):
    """A file or directory, or a module's attribute such as common/trainer.Trainer.run."""
    folder, _, name = path.rpartition("/")
    module = os.path.join(folder, name.split(".")[0] + ".py")
    return os.path.exists(os.path.join(REPO, path)) or os.path.exists(os.path.join(REPO, module))


def test_every_file_the_readme_names_exists():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        named = set(NAMED.findall(handle.read()))
    assert len(named) > 20
    missing = sorted(path for path in named if not exists(path))
    assert not missing, f"README.md names files that do not exist: {missing}"
