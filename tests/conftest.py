"""Fixtures shared by the tiers."""

import pytest


@pytest.fixture(scope="session")
def elpv_small(tmp_path_factory):
    """A class-folder tree of 80 real solar-cell images (40 defective, 40 functional),
    written from the elpv-dataset package the way `make elpv` writes all of them."""
    from common import elpv

    root = tmp_path_factory.mktemp("elpv") / "elpv"
    elpv.write_tree(str(root), "binary", per_class=40)
    return root
