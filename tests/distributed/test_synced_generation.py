"""Stopping at a text end-of-turn marker keeps ZeRO-3's synced generation in step: a rank
whose answers ended early keeps running forwards until every rank is done (a collective
forward would otherwise wait forever), and every rank gets all answers, each cut at its marker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli import explain, torchrun
from tests.text_markers import MARKER

pytestmark = pytest.mark.distributed

REPO = Path(__file__).parents[2]


def test_ranks_run_equal_forwards_when_one_stops_at_the_marker_first(
    tmp_path: Path, bigscale_home: Path
) -> None:
    proc = torchrun(
        2, [str(tmp_path)], REPO, bigscale_home, module="tests.distributed.synced_generation_probe"
    )
    assert proc.returncode == 0, explain(proc)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["answers"] == ["42", "1999-07-02"]
        assert report["hits"] == 0
        # Up to the longer answer's marker on both ranks, though rank 0's ended 8 tokens sooner,
        # and far from the budget of 40.
        assert report["forwards"] == len("1999-07-02") + len(MARKER)
