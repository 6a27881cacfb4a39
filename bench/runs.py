"""What the process-level benchmarks share: a real run directory made by ``bigscale train``.

The model is the tiny preset's Llama shape made big enough for loading to matter on a CPU
(``model.create_if_missing``: 768 wide, 8 layers, 61.5M parameters, 246 MB in fp32), created on
first use and then loaded with ``from_pretrained`` like any hub model. Everything (model, the
arithmetic data, run directories) lives under one scratch directory, through BIGSCALE_HOME and
explicit paths, so a benchmark never touches the repository's .cache or outputs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# The benchmarks' children run from the repository root, where `bigscale` is importable.
REPO = Path(__file__).resolve().parent.parent


def model_dir(work: Path, hidden: int, layers: int) -> Path:
    # Under the children's BIGSCALE_HOME (child_env): bigscale creates models only there.
    return work / "home" / "models" / f"llama-{hidden}x{layers}"


def model_overrides(work: Path, hidden: int, layers: int) -> list[str]:
    return [
        f"model.name_or_path={model_dir(work, hidden, layers)}",
        f"model.create_if_missing.hidden_size={hidden}",
        f"model.create_if_missing.num_layers={layers}",
        f"model.create_if_missing.num_heads={hidden // 64}",
        f"model.create_if_missing.intermediate_size={hidden * 3}",
    ]


def train_overrides(
    work: Path,
    run_dir: Path,
    hidden: int,
    layers: int,
    strategy: str,
    micro_batch: int,
    ranks: int = 1,
) -> list[str]:
    """A short, quiet job: no W&B, no exact-match generation, no export at the end, one
    validation batch, a metrics row every step; the learning rate is constant so that a resumed
    step is a real update whatever max_steps says."""
    return [
        "experiment=none",
        # The presets the defaults named when these benchmarks were first run (the defaults
        # are now the demo's, which a run naming its own model leaves out).
        "model=tiny",
        "data=arithmetic",
        f"strategy={strategy}",
        f"launcher.nproc_per_node={ranks}",
        "logger=disabled",
        f"run_dir={run_dir}",
        *model_overrides(work, hidden, layers),
        f"trainer.micro_batch_size={micro_batch}",
        "trainer.log_every=1",
        "trainer.eval_batches=1",
        "trainer.progress_bar=false",
        "optim.schedule=constant",
        "eval.exact_match=false",
        "export.at_end=false",
    ]


def child_env(work: Path) -> dict[str, str]:
    # The data presets resolve their paths from BIGSCALE_HOME.
    return {**os.environ, "BIGSCALE_HOME": str(work / "home")}


def bigscale_train(work: Path, overrides: list[str], log: Path) -> float:
    """``bigscale train <overrides>`` to completion; seconds taken. Output goes to ``log``,
    shown if the run fails."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(
            [sys.executable, "-m", "bigscale.cli", "train", *overrides],
            cwd=REPO,
            env=child_env(work),
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    if code != 0:
        sys.exit(f"bigscale train failed (exit {code}):\n{log.read_text()[-4000:]}")
    return time.perf_counter() - t0
