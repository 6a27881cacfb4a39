"""One real Slurm cluster per test session; every test here is marked ``slurm``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.slurm.cluster import SlurmCluster, slurm_available, start_cluster


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here + os.sep):
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    reason = slurm_available()
    if reason:
        # CI installs Slurm, so a missing one there is a broken setup, not a skip.
        if os.environ.get("BIGSCALE_REQUIRE_SLURM") == "1":
            pytest.fail(f"BIGSCALE_REQUIRE_SLURM=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()
