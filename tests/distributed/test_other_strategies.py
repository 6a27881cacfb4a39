"""The remaining strategy presets on real engines: ZeRO-1 in bf16, and ZeRO-3 with optimizer
state and parameters offloaded to CPU, on DeepSpeed's CPU Adam (`make test` builds the op first:
built on first use inside the run, under a busy suite it ran past the timeout)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.cli import QUICK, bigscale, explain, train_rows

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(("strategy", "precision"), [("zero1", "bf16"), ("zero3_offload", "fp32")])
def test_strategy_trains_and_exports(
    strategy: str, precision: str, tmp_path: Path, bigscale_home: Path
) -> None:
    run_dir = tmp_path / strategy
    proc = bigscale(
        [
            "train",
            f"strategy={strategy}",
            f"trainer.precision={precision}",
            "launcher.nproc_per_node=2",
            f"run_dir={run_dir}",
            *QUICK,
        ],
        cwd=tmp_path,
        home=bigscale_home,
        timeout=900,
    )
    assert proc.returncode == 0, explain(proc)
    rows = train_rows(run_dir)
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], rows
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert next(model.parameters()).dtype == expected
