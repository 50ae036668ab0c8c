"""Fixtures shared by the tiers."""

import os

import pytest

from tests.helpers import local_hosts


@pytest.fixture(scope="session")
def elpv_small(tmp_path_factory):
    """A class-folder tree of 80 real solar-cell images (40 defective, 40 functional),
    written from the elpv-dataset package the way `make elpv` writes all of them."""
    from common.data import elpv

    root = tmp_path_factory.mktemp("elpv") / "elpv"
    elpv.write_tree(str(root), "binary", per_class=40)
    return root


@pytest.fixture(scope="session")
def hosts(tmp_path_factory):
    """Three hosts, node1..node3, from slurm/local_hosts.sh (network namespaces with their
    own hostnames and sshd); removed at the end, also after failures."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces and sshd need root (CI runs as root)")
    directory = tmp_path_factory.mktemp("hosts")
    started = local_hosts("start", 3, directory, timeout=600)
    assert started.returncode == 0, started.stdout + started.stderr
    yield directory
    local_hosts("stop", directory)
