"""model.loss_chunk_tokens on real ZeRO-3 engines, 2 ranks: the LM head's weight is partitioned,
so the chunked loss depends on DeepSpeed gathering it (forward) and again for the recomputation in
backward. The same run with the model's own loss gives the same loss and gradient norm, step by
step."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import QUICK, bigscale, explain, train_rows

pytestmark = pytest.mark.distributed

ARGS = [
    *QUICK,
    "strategy=zero3",
    "model.gradient_checkpointing=true",
    "launcher.nproc_per_node=2",
    "trainer.max_steps=5",
    "trainer.log_every=1",
    "trainer.eval_every=5",
    "checkpoint.every_steps=0",
    "export.at_end=false",
    "eval.exact_match=false",
]


def test_chunked_loss_trains_as_the_model_loss_under_zero3(
    tmp_path: Path, bigscale_home: Path
) -> None:
    rows: dict[int, list[dict]] = {}
    # 8 rows of up to 16 tokens per micro batch, padded to the longest: 2 or 3 chunks, a number
    # that differs between ranks and steps, while ZeRO-3 gathers the head's weight collectively.
    for chunk in (0, 48):
        run_dir = tmp_path / f"chunk{chunk}"
        args = ["train", *ARGS, f"model.loss_chunk_tokens={chunk}", f"run_dir={run_dir}"]
        proc = bigscale(args, cwd=tmp_path, home=bigscale_home, timeout=900)
        assert proc.returncode == 0, explain(proc)
        said = "LM head and cross-entropy 48 tokens at a time" in proc.stdout + proc.stderr
        assert said == bool(chunk), explain(proc)
        rows[chunk] = train_rows(run_dir)
    full, chunked = rows[0], rows[48]
    assert [r["step"] for r in chunked] == [1, 2, 3, 4, 5]
    for a, b in zip(full, chunked, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (a, b)
    assert chunked[-1]["loss"] < chunked[0]["loss"]
