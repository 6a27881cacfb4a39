"""Time from process start to the first resumed optimizer step: bigscale resuming a real run
directory against a plain PyTorch script resuming the same model, each a fresh subprocess,
alternating, several rounds, median.

    .venv/bin/python bench/resume_time.py [--hidden 768 --layers 8 --steps-before 2 --rounds 5]

bigscale: ``bigscale train`` runs K steps of a 61.5M-parameter Llama-shaped model (ZeRO-2,
1 rank, fp32 on CPU) and checkpoints at step K; each round then starts
``python -m bigscale.train <the same overrides> trainer.max_steps=K+1`` on that run directory
and stops the clock when metrics.jsonl gains the row for step K+1 (written right after that
optimizer step; the file is polled, nothing in bigscale is instrumented). The run directory is
put back to "checkpoint K, nothing after" before every round.

Baseline: a script that imports torch and transformers, builds the same model from its config,
``torch.load``s (weights_only=True) a plain ``torch.save`` of the model's and AdamW's state
dicts, and takes one clipped AdamW step on a batch of the same shape; the clock stops when its
marker line for that step appears, polled the same way.

Both sides read files that sit in the OS page cache (just written), so this measures software
overhead, not the disk."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from runs import REPO, bigscale_train, child_env, model_dir, train_overrides

POLL_S = 0.02
TIMEOUT_S = 600.0
SEQ_LEN = 16  # the arithmetic data's max_length: bigscale's batches are at most this long
# train.log milestones of a resumed rank, in the order they are logged.
LOG_MARKS = {"data": "data: ", "model": "model: ", "resumed": "resumed from "}

if TYPE_CHECKING:  # the parent process never imports torch: it only spawns and polls
    import torch
    from transformers import PreTrainedModel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps-before", type=int, default=2, help="K: the checkpoint's step")
    parser.add_argument("--rounds", type=int, default=5)
    # The baseline's own processes re-enter this file; these are theirs.
    parser.add_argument("--child", choices=["prepare", "baseline"])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--state", type=Path)
    parser.add_argument("--marker", type=Path)
    args = parser.parse_args()
    if args.child == "prepare":
        prepare_child(args.model_dir, args.state, args.micro_batch)
        return
    if args.child == "baseline":
        baseline_child(args.model_dir, args.state, args.marker, args.micro_batch)
        return

    k = args.steps_before
    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        run_dir = work / "run"
        overrides = train_overrides(
            work, run_dir, args.hidden, args.layers, "zero2", args.micro_batch
        )
        overrides.append(f"checkpoint.every_steps={k}")
        setup_s = bigscale_train(
            work, [*overrides, f"trainer.max_steps={k}"], work / "first-run.out"
        )
        tag = (run_dir / "checkpoints" / "latest").read_text().strip()
        checkpoint = run_dir / "checkpoints" / tag
        mdir = model_dir(work, args.hidden, args.layers)
        plain = work / "plain.pt"
        child = [sys.executable, __file__, "--model-dir", str(mdir), "--state", str(plain)]
        child += ["--micro-batch", str(args.micro_batch)]
        subprocess.run([*child, "--child", "prepare"], check=True)

        resume = [sys.executable, "-m", "bigscale.train", *overrides, f"trainer.max_steps={k + 1}"]
        baseline = [*child, "--child", "baseline"]
        ours: list[dict[str, float]] = []
        base: list[dict[str, float]] = []
        imports: list[float] = []
        hashing: list[float] = []
        for r in range(args.rounds):
            # Alternate who goes first, so neither side always runs on a machine the other
            # has just warmed up (or loaded).
            sides: list[Callable[[], None]] = [
                lambda: ours.append(time_bigscale(resume, work, run_dir, tag, k)),
                lambda: base.append(time_baseline(baseline, work)),
            ]
            for side in sides if r % 2 == 0 else sides[::-1]:
                side()
            imports.append(time_import(work))
            hashing.append(time_sha256(checkpoint))
            print(
                f"round {r + 1}: bigscale {ours[-1]['total']:.2f}s, "
                f"baseline {base[-1]['total']:.2f}s",
                flush=True,
            )

        mb_ours = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()) / 1e6
        mb_base = plain.stat().st_size / 1e6
        config = json.loads((mdir / "config.json").read_text())
        report(args, setup_s, mb_ours, mb_base, config, ours, base, imports, hashing)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(
    args: argparse.Namespace,
    setup_s: float,
    mb_ours: float,
    mb_base: float,
    config: dict,
    ours_rounds: list[dict[str, float]],
    base_rounds: list[dict[str, float]],
    imports: list[float],
    hashing: list[float],
) -> None:
    k, n = args.steps_before, args.rounds
    ours = {key: statistics.median(d[key] for d in ours_rounds) for key in ours_rounds[0]}
    base = {key: statistics.median(d[key] for d in base_rounds) for key in base_rounds[0]}
    ratios = [a["total"] / b["total"] for a, b in zip(ours_rounds, base_rounds, strict=True)]
    print(
        f"\nmodel: Llama-shaped, hidden {config['hidden_size']}, {config['num_hidden_layers']} "
        f"layers, vocab {config['vocab_size']}, fp32; ZeRO-2, 1 rank, micro batch "
        f"{args.micro_batch} x {SEQ_LEN} tokens"
    )
    print(
        f"checkpoint at step {k} (first run took {setup_s:.0f}s): {mb_ours:.0f} MB (bigscale: "
        f"weights + ZeRO's fp32 master copy + Adam moments), {mb_base:.0f} MB (torch.save of "
        "model + AdamW state dicts)"
    )
    print(f"\nspawn to first resumed optimizer step done, median of {n} rounds:")
    print(
        f"  bigscale  python -m bigscale.train ... (resume=auto)  {ours['total']:6.2f} s  "
        f"(rounds: {spread(d['total'] for d in ours_rounds)})"
    )
    print(
        f"  baseline  torch + transformers, torch.load, 1 step    {base['total']:6.2f} s  "
        f"(rounds: {spread(d['total'] for d in base_rounds)})"
    )
    # A shared machine's noise hits both sides of a round alike, so the per-round ratio is
    # shown too.
    print(
        f"  ratio of medians {ours['total'] / base['total']:.2f}x; median of per-round "
        f"ratios {statistics.median(ratios):.2f}x (rounds: {spread(ratios)})"
    )
    print("\nbigscale, medians of the phases between train.log lines:")
    print(f"  start -> data ready     {ours['start->data']:6.2f} s  (interpreter, imports, config,")
    print("                                     process group, tokenizer, tokenized-data cache)")
    print(f"     importing bigscale.train.trainer alone, a separate process: {median(imports)}")
    print(f"  data -> model ready     {ours['data->model']:6.2f} s  (from_pretrained + DeepSpeed")
    print("                                     engine with its optimizer)")
    print(f"  model -> resumed        {ours['model->resumed']:6.2f} s  (sha256 of every file,")
    print("                                     DeepSpeed load, training state)")
    print(f"     sha256 of the checkpoint's files alone, in this process: {median(hashing)}")
    print(
        f"  resumed -> step {k + 1} row   {ours['resumed->step']:6.2f} s  (metrics sink, one step)"
    )
    print("baseline, medians of its own marks:")
    print(f"  start -> imports        {base['start->imports']:6.2f} s  (torch, transformers)")
    print(f"  imports -> built        {base['imports->build']:6.2f} s  (model from config, AdamW)")
    print(f"  built -> loaded         {base['build->load']:6.2f} s  (torch.load, load_state_dict)")
    print(f"  loaded -> step done     {base['load->step']:6.2f} s  (one AdamW step)")


def median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s"


def spread(values: Iterable[float]) -> str:
    v = sorted(values)
    return f"{v[0]:.2f} to {v[-1]:.2f}"


def time_bigscale(
    command: list[str], work: Path, run_dir: Path, tag: str, k: int
) -> dict[str, float]:
    reset_run_dir(run_dir, tag)
    log = run_dir / "train.log"
    offset = log.stat().st_size if log.is_file() else 0
    metrics = run_dir / "metrics.jsonl"
    with (work / "resume.out").open("w") as out:
        t0 = time.time()
        proc = subprocess.Popen(command, cwd=REPO, env=child_env(work), stdout=out, stderr=out)
        try:
            done = wait_for(lambda: step_logged(metrics, k + 1), proc, work / "resume.out")
        finally:
            # Past step K+1 the run would evaluate and save; none of that is being measured.
            proc.kill()
            proc.wait()
    marks = log_marks(log, offset)
    if f"at step {k} " not in marks.get("resumed_text", ""):
        sys.exit(f"the run did not resume from step {k}; train.log says: {marks}")
    return {
        "total": done - t0,
        "start->data": marks["data"] - t0,
        "data->model": marks["model"] - marks["data"],
        "model->resumed": marks["resumed"] - marks["model"],
        "resumed->step": done - marks["resumed"],
    }


def reset_run_dir(run_dir: Path, tag: str) -> None:
    """Back to "checkpoint ``tag`` is the latest, nothing logged after it": drop whatever a
    killed round left (a newer checkpoint, a partial one, metrics rows)."""
    root = run_dir / "checkpoints"
    for path in root.iterdir():
        if path.is_dir() and path.name != tag:
            shutil.rmtree(path)
    (root / "latest").write_text(tag + "\n")
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def step_logged(metrics: Path, step: int) -> bool:
    if not metrics.is_file():
        return False
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line being written
            continue
        if row.get("step") == step and "loss" in row:
            return True
    return False


def log_marks(log: Path, offset: int) -> dict:
    marks: dict = {}
    with log.open() as f:
        f.seek(offset)
        for line in f:
            # "2026-11-22 08:03:08,071 INFO data: ..."
            stamp, _, message = line[:23], line[24:29], line[29:].rstrip("\n")
            for key, prefix in LOG_MARKS.items():
                if message.startswith(prefix) and key not in marks:
                    marks[key] = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    if key == "resumed":
                        marks["resumed_text"] = message
    return marks


def time_baseline(command: list[str], work: Path) -> dict[str, float]:
    marker = work / "baseline-marks.jsonl"
    marker.unlink(missing_ok=True)
    with (work / "baseline.out").open("w") as out:
        t0 = time.time()
        proc = subprocess.Popen([*command, "--marker", str(marker)], stdout=out, stderr=out)
        try:
            done = wait_for(lambda: "step" in read_marks(marker), proc, work / "baseline.out")
        finally:
            proc.kill()
            proc.wait()
    m = read_marks(marker)
    return {
        "total": done - t0,
        "start->imports": m["imports"] - t0,
        "imports->build": m["build"] - m["imports"],
        "build->load": m["load"] - m["build"],
        "load->step": m["step"] - m["load"],
    }


def read_marks(marker: Path) -> dict[str, float]:
    if not marker.is_file():
        return {}
    marks = {}
    for line in marker.read_text().splitlines():
        try:
            marks.update(json.loads(line))
        except ValueError:
            continue
    return marks


def wait_for(done: Callable[[], bool], proc: subprocess.Popen, output: Path) -> float:
    """Poll until ``done()``; the wall-clock time it was first seen true."""
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
        if done():
            return time.time()
        if proc.poll() is not None:
            sys.exit(
                f"{proc.args[:4]} ended (exit {proc.returncode}) before its first step:\n"
                f"{output.read_text()[-4000:]}"
            )
        time.sleep(POLL_S)
    sys.exit(f"{proc.args[:4]} took over {TIMEOUT_S:.0f}s")


def time_import(work: Path) -> float:
    """What the rank entry imports before it can do anything: torch, transformers, DeepSpeed,
    Hydra (the trainer pulls them all in)."""
    t0 = time.time()
    subprocess.run(
        [sys.executable, "-c", "import bigscale.train.run, bigscale.train.trainer"],
        cwd=REPO,
        env=child_env(work),
        check=True,
        capture_output=True,
    )
    return time.time() - t0


def time_sha256(checkpoint: Path) -> float:
    """What ``checkpoint.verify=true`` adds on one rank: a sha256 of every file (the same
    4 MiB-block loop as CheckpointManager)."""
    t0 = time.time()
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 22), b""):
                digest.update(block)
    return time.time() - t0


# -- the baseline's processes -----------------------------------------------------------------


def prepare_child(mdir: Path, out: Path, micro_batch: int) -> None:
    """The plain checkpoint: the same model and AdamW state with moments (after one step)."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = LlamaForCausalLM.from_pretrained(mdir)
    optimizer = adamw(model)
    one_step(model, optimizer, micro_batch)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out)


def baseline_child(mdir: Path, state_path: Path, marker: Path, micro_batch: int) -> None:
    def mark(name: str) -> None:
        with marker.open("a") as f:
            f.write(json.dumps({name: time.time()}) + "\n")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    mark("imports")
    # Built from the config (random init, then overwritten), as a plain training script does.
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(mdir))
    optimizer = adamw(model)
    mark("build")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    mark("load")
    one_step(model, optimizer, micro_batch)
    mark("step")


def adamw(model: PreTrainedModel) -> torch.optim.AdamW:
    import torch

    # bigscale's optim=adamw defaults (experiment=none).
    return torch.optim.AdamW(
        model.parameters(), lr=2e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0
    )


def one_step(model: PreTrainedModel, optimizer: torch.optim.Optimizer, micro_batch: int) -> None:
    """Forward, backward, clip at 1.0 (bigscale's optim.grad_clip), AdamW step."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (micro_batch, SEQ_LEN))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()


if __name__ == "__main__":
    main()
