"""Real torchrun, 2 processes on gloo, real DeepSpeed engines: ddp, ZeRO-2 and ZeRO-3 train the
same tiny model on the same packed data (ZeRO-3 with activation checkpointing and the chunked
loss); the loss falls, the exported model loads and generates,
ZeRO-3's export matches the unpartitioned strategies' weights, and a run killed, stopped by a
signal or restarted by torchrun ends exactly as the uninterrupted one.

Each launch costs ~15-30 s of start-up on 2 cores and the training ~2 s, so the interrupted runs
are few and each carries several claims: ZeRO-3 is stopped by a signal, then killed mid-write,
then finished (one run, three launches); ddp is restarted by torchrun (against the synchronous
reference); ZeRO-2's exact resume is held by test_resume_failures.py (a run resumed from the
previous checkpoint, every logged step equal)."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cli import (
    QUICK,
    bigscale,
    explain,
    kill_tree,
    rank_process,
    slow_checkpoint,
    start,
    train_rows,
    wait_for_background_write,
    wait_for_checkpoint,
)

pytestmark = pytest.mark.distributed

STRATEGIES = ["ddp", "zero2", "zero3"]
# Packed sequences (2-3 sums per row at 32 tokens) in every run here, so the exact-resume tests
# cover the packed data path too.
ARGS = [*QUICK, "data.packing=true", "data.max_length=32"]
# ZeRO-3 also runs with activation checkpointing and the chunked loss (the LM head's weight is
# partitioned, so the chunks depend on DeepSpeed gathering it in forward and again when backward
# recomputes them). Both compute the same values, so the losses and weights compared below
# with the other strategies must not change.
EXTRA = {"zero3": ["model.gradient_checkpointing=true", "model.loss_chunk_tokens=48"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, bigscale_home: Path) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("strategies")
    out = {}
    for strategy in STRATEGIES:
        run_dir = work / strategy
        proc = bigscale(
            [
                "train",
                f"strategy={strategy}",
                "launcher.nproc_per_node=2",
                f"run_dir={run_dir}",
                *ARGS,
                *EXTRA.get(strategy, []),
                # One reference run saves synchronously: the elastic test's run saves in the
                # background (the default), is killed and restarted, and must match it bitwise.
                *(["checkpoint.async=false"] if strategy == "ddp" else []),
            ],
            cwd=work,
            home=bigscale_home,
        )
        assert proc.returncode == 0, explain(proc)
        out[strategy] = run_dir
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_falls(runs: dict[str, Path], strategy: str) -> None:
    rows = train_rows(runs[strategy])
    assert [r["step"] for r in rows] == list(range(2, 25, 2))
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], rows
    for row in rows:
        assert row["grad_norm"] > 0 and row["lr"] > 0
        # Speed accounting: padding counted apart, the step's time split, no MFU on CPU.
        assert row["tokens_per_s"] >= row["real_tokens_per_s"] > 0
        assert 0.5 < row["real_token_share"] <= 1.0  # packed
        assert row["step_time_s"] > row["forward_backward_s"] > 0
        assert row["data_wait_s"] >= 0 and row["optimizer_s"] > 0 and row["peak_mem_gib"] > 0
        assert "mfu" not in row


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_export_loads_and_generates(runs: dict[str, Path], strategy: str) -> None:
    export = runs[strategy] / "export"
    assert (export / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    prompt = [tokenizer.bos_token_id, *tokenizer("12+34=", add_special_tokens=False)["input_ids"]]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(prompt)


def test_zero3_export_matches_unpartitioned_weights(runs: dict[str, Path]) -> None:
    """Same seed, data and steps: partitioning must not change the result, and the gathered
    ZeRO-3 export must be the whole, correctly ordered model."""
    weights = {s: load_file(runs[s] / "export" / "model.safetensors") for s in STRATEGIES}
    assert set(weights["zero3"]) == set(weights["ddp"])
    for name, tensor in weights["ddp"].items():
        for other in ("zero2", "zero3"):
            assert weights[other][name].shape == tensor.shape, name
            torch.testing.assert_close(weights[other][name], tensor, atol=2e-4, rtol=1e-3)


def test_same_losses_across_strategies(runs: dict[str, Path]) -> None:
    losses = {s: [r["loss"] for r in train_rows(runs[s])] for s in STRATEGIES}
    for other in ("zero2", "zero3"):
        assert losses[other] == pytest.approx(losses["ddp"], rel=1e-3), losses


def test_zero3_builds_the_model_partitioned_with_the_chunked_loss(runs: dict[str, Path]) -> None:
    def stored(strategy: str) -> tuple[int, int]:
        line = next(
            line
            for line in (runs[strategy] / "train.log").read_text().splitlines()
            if "stored on rank 0" in line
        )
        found = re.search(r"model: ([\d,]+) parameters, ([\d,]+) stored on rank 0", line)
        assert found, line
        return int(found[1].replace(",", "")), int(found[2].replace(",", ""))

    total3, local3 = stored("zero3")
    assert (
        "LM head and cross-entropy 48 tokens at a time" in (runs["zero3"] / "train.log").read_text()
    )
    total2, local2 = stored("zero2")
    assert total3 == total2 == local2
    assert local3 <= total3 // 2 + 1024  # about half on each of the 2 ranks


def test_export_command_matches_end_of_training_export(
    runs: dict[str, Path], tmp_path: Path, bigscale_home: Path
) -> None:
    """`bigscale export RUN_DIR` rebuilds the model from DeepSpeed's shards alone.

    ZeRO-3 only: the end-of-training export is the same function (export_checkpoint) on the
    same final checkpoint, and the tests above check it per strategy (ZeRO stage 0, 1-2 and 3
    read different shard files); what the command adds (finding the run's newest checkpoint,
    another output directory) does not depend on the strategy."""
    out = tmp_path / "exported"
    run_dir = runs["zero3"]
    proc = bigscale(["export", str(run_dir), "--out", str(out)], tmp_path, bigscale_home)
    assert proc.returncode == 0, explain(proc)
    ours = load_file(out / "model.safetensors")
    reference = load_file(run_dir / "export" / "model.safetensors")
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, atol=0, rtol=0)
    AutoModelForCausalLM.from_pretrained(out)


def test_keep_last_rotation(runs: dict[str, Path]) -> None:
    root = runs["zero2"] / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000016", "step_00000024"]
    assert not list(root.glob(".partial-*"))
    assert (root / "latest").read_text().strip() == "step_00000024"


def _fields(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows]


def _assert_same_export(run_dir: Path, reference: Path) -> None:
    resumed = load_file(run_dir / "export" / "model.safetensors")
    straight = load_file(reference / "export" / "model.safetensors")
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


def test_stopped_then_killed_run_resumes_exactly(
    runs: dict[str, Path], tmp_path: Path, bigscale_home: Path
) -> None:
    """One ZeRO-3 run (partitioned parameters, activation checkpointing, the chunked loss),
    interrupted twice, then finished by the same command each time.

    1. SIGUSR1 (Slurm's warning before the time limit) to rank 1 alone, mid-interval, while the
       step-8 checkpoint is still written in the background: both ranks finish the step, wait
       for step 8's write, checkpoint the signalled step completely, and end cleanly.
    2. The same command resumes from that step; SIGKILL the whole job while the step-16
       checkpoint is written in the background (the default, checkpoint.async=true): the
       signalled step stays the newest complete checkpoint.
    3. The same command resumes from it, and every logged step (loss, grad norm, lr) and the
       final weights equal the uninterrupted run's, bitwise, with gradient accumulation,
       dropout and a mid-epoch data position."""
    run_dir = tmp_path / "interrupted"
    args = [
        "train",
        "strategy=zero3",
        "launcher.nproc_per_node=2",
        f"run_dir={run_dir}",
        *ARGS,
        *EXTRA["zero3"],
    ]
    latest = run_dir / "checkpoints" / "latest"

    # 1. The stop signal during a background write.
    proc = start(args, tmp_path, bigscale_home, capture=True, extra_env=slow_checkpoint(8))
    rank1 = rank_process(psutil.Process(proc.pid), 1)
    wait_for_background_write(proc, run_dir, "step_00000008")
    rank1.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-6000:]
    stopped_at = int(latest.read_text().strip().split("_")[1])
    assert 8 < stopped_at < 16, stopped_at  # a checkpoint the interval would not have written
    stop_tag = f"step_{stopped_at:08d}"
    log = (run_dir / "train.log").read_text()
    assert f"stopped at step {stopped_at} on a stop signal on another rank" in log, log
    assert "checkpoint saved; not a Slurm job" in log
    assert f"checkpoint {stop_tag} waits for the background write of step_00000008" in log
    assert (run_dir / "checkpoints" / "step_00000008" / "manifest.json").is_file()
    assert not list((run_dir / "checkpoints").glob(".partial-*"))
    assert not (run_dir / "export").exists()
    assert "report: " in log and (run_dir / "report.html").is_file()  # the stop writes it too

    # 2. Resumed, then killed whole while step 16 is written in the background.
    running = start(args, tmp_path, bigscale_home, extra_env=slow_checkpoint(16, 60))
    wait_for_background_write(running, run_dir, "step_00000016")
    kill_tree(running)
    assert not (run_dir / "export").exists()
    assert latest.read_text().strip() == stop_tag
    resumed_line = rf"resumed from \S*{stop_tag} at step {stopped_at}"
    assert re.search(resumed_line, (run_dir / "train.log").read_text())

    # 3. Finished from the newest complete checkpoint.
    done = bigscale(args, tmp_path, bigscale_home)
    assert done.returncode == 0, explain(done)
    assert re.search(resumed_line, done.stderr), done.stderr
    assert _fields(train_rows(run_dir)) == _fields(train_rows(runs["zero3"]))
    _assert_same_export(run_dir, runs["zero3"])


def test_elastic_restart_resumes_from_the_latest_checkpoint(
    runs: dict[str, Path], tmp_path: Path, bigscale_home: Path
) -> None:
    """With launcher.max_restarts=1, a rank killed mid-run makes torchrun restart the group,
    which resumes from the latest checkpoint and ends as the uninterrupted run did, bitwise:
    ddp, saving in the background (the default) against the reference that saved
    synchronously, so the background save neither changes the training nor misses state."""
    run_dir = tmp_path / "elastic"
    args = ["train", "strategy=ddp", "launcher.nproc_per_node=2", f"run_dir={run_dir}", *ARGS]
    proc = start([*args, "launcher.max_restarts=1"], tmp_path, bigscale_home, capture=True)
    rank1 = rank_process(psutil.Process(proc.pid), 1)
    wait_for_checkpoint(proc, run_dir, "step_00000008")
    rank1.kill()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-6000:]
    log = (run_dir / "train.log").read_text()
    assert re.search(r"resumed from \S+step_00000008 at step 8", log), log
    assert _fields(train_rows(run_dir)) == _fields(train_rows(runs["ddp"]))
    _assert_same_export(run_dir, runs["ddp"])


def test_dead_rank_ends_the_job_naming_it(tmp_path: Path, bigscale_home: Path) -> None:
    """No restarts: a rank killed mid-run ends the whole job at once (well within the
    collective timeout) with an error that names the rank."""
    run_dir = tmp_path / "dead"
    args = ["train", "strategy=zero2", "launcher.nproc_per_node=2", f"run_dir={run_dir}", *ARGS]
    proc = start([*args, "dist.timeout_minutes=1"], tmp_path, bigscale_home, capture=True)
    rank1 = rank_process(psutil.Process(proc.pid), 1)
    wait_for_checkpoint(proc, run_dir, "step_00000008")
    pid = rank1.pid
    rank1.kill()
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - killed < 60  # dist.timeout_minutes=1
    assert proc.returncode == 128 + signal.SIGKILL
    assert f"error: rank 1 (pid {pid}) was killed by SIGKILL" in stderr, stderr
    assert "error: run failed with exit code 137" in stderr
