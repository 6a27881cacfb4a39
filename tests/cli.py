"""Run bigscale's real entry points as a user would, in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

# Short, fast settings for runs whose point is the plumbing, not the accuracy. The model has
# dropout on, so exact-resume tests also prove every rank's random state is restored.
QUICK = [
    "experiment=arithmetic",  # the tiny model and the arithmetic task, not the default demo
    "model.name_or_path=${oc.env:BIGSCALE_HOME}/models/tiny-dropout",
    "model.create_if_missing.dropout=0.1",
    "trainer.max_steps=24",
    "trainer.micro_batch_size=8",
    "trainer.grad_accum=2",
    "trainer.log_every=2",
    "checkpoint.every_steps=8",
    "trainer.eval_every=12",
    "trainer.eval_batches=2",
    "trainer.progress_bar=false",
    "optim.warmup_steps=4",
    "eval.max_examples=32",
    "logger=disabled",
]


def env_for(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["BIGSCALE_HOME"] = str(home)  # tiny model + generated data, shared across tests
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("WANDB_API_KEY", None)
    return env


def bigscale(
    args: list[str],
    cwd: Path,
    home: Path,
    timeout: float = 600,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bigscale.cli", *args],
        cwd=cwd,
        env={**env_for(home), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def torchrun(
    nproc: int,
    args: list[str],
    cwd: Path,
    home: Path,
    timeout: float = 600,
    module: str = "bigscale.train",
) -> subprocess.CompletedProcess[str]:
    """``torchrun -m module`` (a rank entry such as ``tests.distributed.logits_probe`` needs
    ``cwd`` at the repository root)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc), "-m", module, *args]
    return subprocess.run(
        cmd, cwd=cwd, env=env_for(home), capture_output=True, text=True, timeout=timeout
    )


def start(
    args: list[str],
    cwd: Path,
    home: Path,
    capture: bool = False,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """``bigscale`` in the background, for a test to interrupt mid-run; with ``capture`` its
    output is kept (read it with ``communicate()``)."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "bigscale.cli", *args],
        cwd=cwd,
        env={**env_for(home), **(extra_env or {})},
        stdout=out,
        stderr=out,
        text=capture,
    )


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, tag: str) -> None:
    """Until ``latest`` names ``tag``; fails if the run ends first."""
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().strip() == tag):
        assert proc.poll() is None, f"the run ended before {tag}"
        assert time.monotonic() < deadline, f"no {tag} after 300 s"
        time.sleep(0.02)


def slow_checkpoint(step: int, seconds: float = 10) -> dict[str, str]:
    """The environment that makes step ``step``'s background checkpoint write wait
    ``seconds`` before its commit (bigscale/checkpoint/async_writer.py)."""
    return {
        "BIGSCALE_FAULT_CKPT_SLEEP_STEP": str(step),
        "BIGSCALE_FAULT_CKPT_SLEEP_SECONDS": str(seconds),
    }


def wait_for_background_write(proc: subprocess.Popen, run_dir: Path, tag: str) -> None:
    """Until ``tag`` is being written (its partial directory exists) but is not complete."""
    partial = run_dir / "checkpoints" / f".partial-{tag}"
    deadline = time.monotonic() + 300
    while not partial.is_dir():
        assert proc.poll() is None, f"the run ended before writing {tag}"
        assert time.monotonic() < deadline, f"no {tag} being written after 300 s"
        time.sleep(0.02)
    assert not (run_dir / "checkpoints" / tag).exists(), f"{tag} completed already"


def kill_tree(proc: subprocess.Popen) -> None:
    # torchrun starts each rank in a session of its own, so kill the whole tree explicitly.
    tree = psutil.Process(proc.pid)
    for p in [tree, *tree.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()


def kill_after_checkpoint(proc: subprocess.Popen, run_dir: Path, tag: str) -> None:
    wait_for_checkpoint(proc, run_dir, tag)
    time.sleep(0.3)  # into the next steps (or the next save): any moment must be survivable
    kill_tree(proc)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "loss" in r]


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"


def rank_process(launcher: psutil.Process, rank: int) -> psutil.Process:
    """The process of ``rank`` among the launcher's descendants, once it has started."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for p in launcher.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "bigscale.train" in p.cmdline() and p.environ().get("RANK") == str(rank):
                    return p
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} never started")
