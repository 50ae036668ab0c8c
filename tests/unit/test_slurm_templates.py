"""The sbatch templates parse, and GPU templates start one rank per GPU."""

import glob
import os
import re
import subprocess

import pytest

from tests.helpers import REPO

TEMPLATES = sorted(glob.glob(os.path.join(REPO, "slurm", "*.sbatch")))


def directives(path):
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", open(path).read(), flags=re.M))


def test_every_launcher_has_a_cpu_and_a_gpu_template():
    names = {os.path.basename(path) for path in TEMPLATES}
    assert names == {f"{kind}_{launcher}.sbatch" for kind in ("cpu", "gpu")
                     for launcher in ("srun", "mpirun", "horovodrun")}


@pytest.mark.parametrize("path", TEMPLATES + [os.path.join(REPO, "slurm", name)
                                              for name in ("job.sh", "local_cluster.sh")])
def test_scripts_parse(path):
    subprocess.run(["bash", "-n", path], check=True)


@pytest.mark.parametrize("path", TEMPLATES)
def test_template_essentials(path):
    found = directives(path)
    assert found["output"] == "%x-%j.out" and "requeue" in found and found["signal"].startswith("B:USR1@")
    if "gpu_" in os.path.basename(path):
        assert found["gpus-per-node"] == found["ntasks-per-node"], "one rank per GPU"
