from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bigscale_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bigscale_home")
