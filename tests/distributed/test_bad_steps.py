"""A run never keeps a bad state: an injected inf loss skips the optimizer step on every
strategy (the weights stay exactly as they were, the lr schedule holds), too many bad steps in a
row end the run with exit code 3, and a checkpoint of non-finite weights is never written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bigscale.config.schema import TinyModelSpec
from bigscale.dist.ds_files import load_consolidated_weights
from bigscale.model.tiny import create_tiny_model
from tests.cli import QUICK, bigscale, explain, metrics

pytestmark = pytest.mark.distributed

# Rank 1 alone gets the inf: the ranks must still agree to skip (gradients are averaged).
INF_AT_3_AND_4 = {"BIGSCALE_FAULT_INF_LOSS_STEPS": "3,4", "BIGSCALE_FAULT_RANK": "1"}


def _args(run_dir: Path, strategy: str, *extra: str, ranks: int = 2) -> list[str]:
    keys = {e.split("=", 1)[0] for e in extra}
    quick = [q for q in QUICK if q.split("=", 1)[0] not in keys]
    return [
        "train",
        f"strategy={strategy}",
        f"launcher.nproc_per_node={ranks}",
        f"run_dir={run_dir}",
        *quick,
        "trainer.max_steps=6",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=0",
        "export.at_end=false",
        "eval.exact_match=false",
        *extra,
    ]


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_consolidated_weights(run_dir / "checkpoints", f"step_{step:08d}")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ddp runs bigscale's own skip (plain AdamW would apply the NaN), zero2 DeepSpeed's ZeRO
# overflow check; ZeRO-3's is checked by the max_bad_steps test below.
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_inf_loss_skips_the_step_and_leaves_the_weights(
    strategy: str, tmp_path: Path, bigscale_home: Path
) -> None:
    run_dir = tmp_path / strategy
    proc = bigscale(_args(run_dir, strategy), tmp_path, bigscale_home, extra_env=INF_AT_3_AND_4)
    assert proc.returncode == 0, explain(proc)
    rows = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    assert rows[3]["loss"] is None and rows[4]["loss"] is None  # inf, written as null
    assert rows[5]["loss"] < 10 and rows[6]["loss"] < 10
    # The lr schedule holds while steps are skipped and moves on after.
    assert rows[2]["lr"] == rows[3]["lr"] == rows[4]["lr"] != rows[5]["lr"]
    # Every checkpoint was written (finite weights), and the skipped steps changed nothing.
    _assert_same(_weights(run_dir, 3), _weights(run_dir, 2))
    _assert_same(_weights(run_dir, 4), _weights(run_dir, 2))
    after = _weights(run_dir, 5)
    assert any(not torch.equal(after[k], v) for k, v in _weights(run_dir, 4).items())
    for tensor in after.values():
        assert torch.isfinite(tensor).all()
    log = (run_dir / "train.log").read_text()
    assert "step 3: loss inf" in log and "optimizer step skipped (1 in a row" in log, log


def test_too_many_bad_steps_in_a_row_end_the_run(tmp_path: Path, bigscale_home: Path) -> None:
    run_dir = tmp_path / "run"
    env = {"BIGSCALE_FAULT_INF_LOSS_STEPS": "3,4,5"}
    args = _args(run_dir, "zero3", "trainer.max_bad_steps=3")
    proc = bigscale(args, tmp_path, bigscale_home, extra_env=env)
    assert proc.returncode == 3, explain(proc)
    assert "error: 3 steps in a row had a non-finite loss or gradient norm" in proc.stderr
    assert "Traceback" not in proc.stderr
    root = run_dir / "checkpoints"
    # Steps 3 and 4 were skipped, so their checkpoints hold step 2's weights; step 5 ended the
    # run before its checkpoint.
    assert (root / "latest").read_text().strip() == "step_00000004"
    _assert_same(_weights(run_dir, 4), _weights(run_dir, 2))


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path, bigscale_home: Path) -> None:
    model = tmp_path / "poisoned"
    create_tiny_model(model, TinyModelSpec())
    weights = load_file(model / "model.safetensors")
    name = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    run_dir = tmp_path / "run"
    # One rank (in-process, no torchrun): every rank loads the same poisoned file, so a second
    # adds only start-up; the exit code 3 through torchrun is the test above's.
    args = _args(run_dir, "ddp", f"model.name_or_path={model}", "trainer.max_bad_steps=10", ranks=1)
    proc = bigscale(args, tmp_path, bigscale_home)
    assert proc.returncode == 3, explain(proc)
    assert "error: step 1: the model's weights are not finite" in proc.stderr, proc.stderr
    root = run_dir / "checkpoints"
    assert not root.exists() or not any(root.iterdir()), list(root.iterdir())
    shutil.rmtree(model)
