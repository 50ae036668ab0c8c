"""Docs cannot go stale silently: the site builds with mkdocs --strict; every file the
README, the docs, the Makefile or a docstring or comment in the code names exists;
every flag and make target the README and the docs name exists; and no document
carries development history."""

import glob
import os
import re
import subprocess
import sys

from tests.helpers import REPO

NAMED = re.compile(r"\b((?:common|train_torch|train_tf|slurm|tests|benchmarks|docs|\.ci)/[\w./-]*\w)")
FLAG = re.compile(r"(?<![\w/-])--[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
MAKE_TARGET = re.compile(r"(?:`|^\s*)make ([a-z][a-z-]*)\b", re.M)  # in code: `make x`, or a command line
ARGUMENT = re.compile(r"add_argument\(\s*\"(--[a-z][a-z0-9_-]*)\"(?:,\s*\"(--[a-z][a-z0-9_-]*)\")?")
# Flags of the tools around ours that the docs show, by tool.
EXTERNAL_FLAGS = {
    "mpirun": "--mca --hostfile --bind-to --map-by --oversubscribe --allow-run-as-root --npernode --host",
    "horovodrun": "--network-interface --check-build --min-np --max-np --host-discovery-script --gloo --hosts "
                  "--timeline-filename --timeline-mark-cycles --blacklist-cooldown-range --verbose",
    "docker": "--cpus",
    "srun and sbatch": "--test-only --mpi --nodes --ntasks --ntasks-per-node --cpus-per-task --gpus-per-node "
                       "--cpu-bind --signal --requeue --time --partition --gres --exclusive --nodelist --overlap",
    "torchrun": "--nproc_per_node --nnodes --master_port",
    "pip, pytest, tensorboard, py-spy, mkdocs, git": "--upgrade --no-deps --no-binary --logdir --native --format "
                                                     "--strict --help --version",
}


def exists(path):
    """A file or directory, or a module's attribute such as common/core/trainer.Trainer.run."""
    folder, _, name = path.rpartition("/")
    module = os.path.join(folder, name.split(".")[0] + ".py")
    return os.path.exists(os.path.join(REPO, path)) or os.path.exists(os.path.join(REPO, module))


def user_documents():
    yield "README.md"
    yield from sorted(os.path.relpath(path, REPO) for path in glob.glob(os.path.join(REPO, "docs", "*.md")))
    yield from ("benchmarks/README.md", "tests/README.md")


def documents():
    yield from user_documents()
    yield "Makefile"
    yield "mkdocs.yml"
    for folder in ("common", "train_torch", "train_tf", "slurm", "benchmarks", "tests", "docs"):
        for root, _, names in os.walk(os.path.join(REPO, folder)):
            yield from (os.path.relpath(os.path.join(root, name), REPO) for name in names
                        if name.endswith((".py", ".sh", ".sbatch")))


def read(document):
    with open(os.path.join(REPO, document), encoding="utf-8") as handle:
        return handle.read()


def test_every_file_the_docs_name_exists():
    missing = []
    for document in documents():
        missing += [f"{document}: {path}" for path in sorted(set(NAMED.findall(read(document)))) if not exists(path)]
    assert not missing, f"files named but missing: {missing}"


def test_the_readme_is_short_and_names_the_files_it_explains():
    readme = read("README.md")
    assert len(readme.splitlines()) <= 300
    assert len(set(NAMED.findall(readme))) > 10


def known_flags():
    from common.core.config import build_parser

    flags = {flag for action in build_parser()._actions for flag in action.option_strings}
    for folder in ("common", "benchmarks"):
        for path in glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True):
            flags |= {flag for pair in ARGUMENT.findall(read(path)) for flag in pair if flag}
    return flags | {flag for names in EXTERNAL_FLAGS.values() for flag in names.split()}


def test_every_flag_the_docs_name_exists():
    known = known_flags()
    assert "--microbatches" in known and "--repeat" in known and "--no-progress" in known
    unknown = [f"{document}: {flag}" for document in user_documents()
               for flag in sorted(set(FLAG.findall(read(document)))) if flag not in known]
    assert not unknown, f"flags named but accepted by nothing here: {unknown}"


def test_every_make_target_the_docs_name_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", read("Makefile"), re.M))
    assert {"train", "test", "lint", "docs", "bench"} <= targets
    unknown = [f"{document}: make {target}" for document in user_documents()
               for target in sorted(set(MAKE_TARGET.findall(read(document)))) if target not in targets]
    assert not unknown, f"make targets named but missing: {unknown}"


def test_no_document_carries_development_history():
    history = re.compile(r"\b[Ii]ssues? \d+|\b(?:in one|this|that|the previous) session\b|\bas it was[,:)]"
                         r"|\bbefore changing anything\b|\bthe previous run\b")
    found = [f"{document}: {match.group(0)}" for document in user_documents()
             for match in history.finditer(read(document))]
    assert not found, found


def test_the_site_builds_strictly_with_the_generated_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (tmp_path / "cli" / "index.html").read_text()
    from common.core.config import build_parser

    for action in build_parser()._actions[1:]:  # every flag of the parser but -h, none kept by hand
        for flag in action.option_strings:
            assert f"<code>{flag}</code>" in reference, flag


def test_every_config_file_the_docs_show_is_accepted(tmp_path):
    from common.core.config import parse_config

    blocks = [block for document in user_documents()
              for block in re.findall(r"```toml\n(.*?)```", read(document), re.S)]
    assert blocks
    for index, block in enumerate(blocks):
        path = tmp_path / f"shown{index}.toml"
        path.write_text(block)
        assert parse_config(["--config", str(path)])  # raises UsageError on any key or value it would refuse
