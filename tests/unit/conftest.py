"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models import plan_llama_config


@pytest.fixture
def plan_llama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A planning setup with no GPU: the test's own BIGSCALE_HOME and working directory, and
    the path of a tiny Llama's config (all the memory estimate reads; no weights), long enough
    for 64k-token sequences. The tests hand ``make_plan`` the hardware they pretend to have."""
    monkeypatch.setenv("BIGSCALE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "llama"
    plan_llama_config(max_position_embeddings=65536).save_pretrained(path)
    return path
