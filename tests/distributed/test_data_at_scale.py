"""Data at scale with real process groups: tokenization on one rank outlasting the collective
timeout while the others wait on the cache's marker file (and reuse its cache, and receive its
error), and a streamed, packed run resumed from a checkpoint to the uninterrupted run's numbers,
bitwise."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bigscale.data.cache import DELAY_ENV
from tests.cli import QUICK, bigscale, env_for, explain, metrics

pytestmark = pytest.mark.distributed

STREAM = [
    *QUICK,
    "launcher.nproc_per_node=2",
    "data.streaming=true",
    "data.packing=true",
    "data.max_length=32",
    "data.stream_buffer=64",
    "data.validation_examples=64",
    "trainer.max_steps=12",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last=0",  # the resumed run starts from the uninterrupted run's step 4
    "trainer.eval_every=6",
    "eval.exact_match=false",
    "export.at_end=false",
]


def test_tokenizing_outlasts_the_collective_timeout(
    tmp_path: Path, char_tokenizer_dir: Path, bigscale_home: Path
) -> None:
    """The builder sleeps twice the 3 s collective timeout before tokenizing: the other rank
    waits on the marker file, not in a collective, so the group survives; it then reads the
    builder's cache instead of tokenizing, and a builder's error reaches it word for word."""
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} " * 3}) + "\n" for i in range(400)))
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "tests.distributed.data_cache_probe", str(data), str(char_tokenizer_dir)]
    cmd += [str(tmp_path / "cache"), str(out)]
    env = {**env_for(bigscale_home), DELAY_ENV: "6"}
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=300, cwd=Path.cwd(), check=False
    )
    assert proc.returncode == 0, explain(proc)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["train"] == ranks[1]["train"] > 0
    assert ranks[0]["sum"] == 2 * ranks[0]["train"]
    assert ranks[0]["error"] and ranks[0]["error"] == ranks[1]["error"]
    assert "no file matches data.path=" in ranks[1]["error"]
    logs = [(out / f"rank{r}.log").read_text() for r in range(2)]
    assert "Tokenizing 360 examples" in logs[0]
    assert "Tokenizing" not in logs[1] and "tokenizing here" not in logs[1]
    assert logs[1].count("tokenized cache hit") == 2  # train and validation


def test_streamed_packed_run_resumes_exactly(tmp_path: Path, bigscale_home: Path) -> None:
    """A run resumed from the uninterrupted run's step-4 checkpoint: every training and
    evaluation row after it equals the uninterrupted run's (each rank's stream position,
    mid-window, is part of the checkpoint).

    The checkpoint is the one a run killed after step 4 would resume from, written while the
    loader had read ahead, so resuming from it needs no killed run (one launch fewer); that a
    killed run's rerun finds its newest checkpoint is test_strategies.py's and
    test_resume_failures.py's to hold."""
    straight = tmp_path / "straight"
    proc = bigscale(["train", f"run_dir={straight}", *STREAM], tmp_path, bigscale_home)
    assert proc.returncode == 0, explain(proc)
    resumed = tmp_path / "resumed"
    step4 = straight / "checkpoints" / "step_00000004"
    args = ["train", f"run_dir={resumed}", f"resume={step4}", *STREAM]
    proc = bigscale(args, tmp_path, bigscale_home)
    assert proc.returncode == 0, explain(proc)
    assert re.search(r"resumed from \S*step_00000004 at step 4", proc.stderr), proc.stderr

    def rows(run_dir: Path) -> list[tuple]:
        keys = ("step", "loss", "grad_norm", "lr", "eval_loss")
        return [tuple(r.get(k) for k in keys) for r in metrics(run_dir) if "step" in r]

    expected = rows(straight)
    assert [r[0] for r in expected if r[1] is not None] == list(range(2, 13, 2))
    after = [r for r in expected if r[0] > 4]
    assert rows(resumed) == after
