"""Step time on 2 ranks: bigscale's real Trainer against a bare DeepSpeed loop and HF Trainer with
the same model, data and DeepSpeed config, alternating in one invocation, several rounds, median.

    .venv/bin/python bench/step_time.py [--hidden 256 --layers 4 --seq-len 64 --micro-batch 4
                                         --grad-accum 2 --steps 40 --warmup-steps 10 --rounds 3]

Every side is one ``torchrun --standalone --nproc_per_node 2`` (gloo on CPU, ZeRO-2, fp32):

- bigscale: ``torchrun ... -m bigscale.train <overrides>``, the same entry ``bigscale train``
  spawns; its per-step time is read from metrics.jsonl (``step_time_s``, wall time over each
  logging window of ``--warmup-steps`` steps), the first window left out as warm-up. Nothing in
  bigscale is instrumented.
- bare: this file re-entered under torchrun: ``deepspeed.initialize`` with the dict bigscale
  builds (``build_ds_config`` on the same composed config), fused ``torch.optim.AdamW`` as
  bigscale's ``_build_optimizer`` makes it, a constant ``LambdaLR``, a plain DataLoader with a
  DistributedSampler, and forward / backward / step.
- hf: ``transformers.Trainer`` with ``deepspeed=`` that same dict, ``optim=adamw_torch_fused``,
  the same batch sizes, clipping and AdamW hyper-parameters, ``max_steps``, logging and saving
  off; a TrainerCallback stamps ``on_step_end``.

Same model: the tiny preset's Llama shape at ``--hidden``/``--layers`` (made once with
``model.create_if_missing``), loaded with ``from_pretrained`` by all three. Same data: fixed-length
text lines (BOS + ``seq_len - 2`` characters + EOS), so no side pads; the baselines take bigscale's
own ``encode_example`` of the same lines. All sides leave out the same first ``--warmup-steps``
optimizer steps and report wall time per step over the rest: from the end of the last warm-up
step to the end of the last step, divided by the steps in between (data loading included)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RANKS = 2
SIDES = ("bigscale", "bare", "hf")


def main() -> None:
    parser = argparse.ArgumentParser()
    add_workload_args(parser)
    parser.add_argument("--rounds", type=int, default=3)
    # The baselines' ranks re-enter this file under torchrun; these are theirs.
    parser.add_argument("--child", choices=["bare", "hf"])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.steps % args.warmup_steps:
        parser.error("--steps must be a multiple of --warmup-steps (bigscale's logging window)")
    if args.child:
        child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-steptime-"))
    try:
        prepare(args, work)
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        splits: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        for r in range(args.rounds):
            # Rotate who goes first, so no side always follows the same neighbour on a shared
            # machine whose load drifts.
            order = SIDES[r % 3 :] + SIDES[: r % 3]
            for side in order:
                result = (
                    run_bigscale(args, work, f"bigscale-{r}")
                    if side == "bigscale"
                    else run_child(args, work, side)
                )
                times[side].append(result["step_s"])
                splits[side].append(result)
            print(
                f"round {r + 1}: "
                + ", ".join(f"{s} {times[s][-1] * 1000:.1f} ms/step" for s in SIDES),
                flush=True,
            )
        report(args, work, times, splits)
    except BaseException:
        print(f"kept for a look: {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The model and run shape; bench/switches.py takes the same."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=10, help="left out of the timing")


def overrides(args: argparse.Namespace, work: Path, run_dir: Path) -> list[str]:
    """bigscale's config for the run; the baselines compose the same list to get its DeepSpeed
    dict, so the three cannot drift apart."""
    hidden = args.hidden
    return [
        "experiment=none",
        "strategy=zero2",
        f"launcher.nproc_per_node={RANKS}",
        "logger=disabled",
        f"run_dir={run_dir}",
        f"model.name_or_path={work / 'model'}",
        f"model.create_if_missing.hidden_size={hidden}",
        f"model.create_if_missing.num_layers={args.layers}",
        f"model.create_if_missing.num_heads={max(1, hidden // 64)}",
        f"model.create_if_missing.intermediate_size={hidden * 3}",
        f"model.create_if_missing.max_position_embeddings={max(256, args.seq_len)}",
        "data=text_files",
        f"data.path={work / 'train.jsonl'}",
        f"data.max_length={args.seq_len}",
        "data.packing=false",  # every line is exactly seq_len tokens: nothing to pad or pack
        f"data.cache_dir={work / 'tokenized'}",
        "trainer.precision=fp32",
        f"trainer.max_steps={args.steps}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.grad_accum={args.grad_accum}",
        f"trainer.log_every={args.warmup_steps}",
        "trainer.eval_batches=1",
        "trainer.progress_bar=false",
        "optim.lr=1e-4",
        "optim.weight_decay=0.0",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "optim.grad_clip=1.0",
        "eval.exact_match=false",
        "export.at_end=false",
    ]


def prepare(args: argparse.Namespace, work: Path) -> None:
    """The model directory (as ``model.create_if_missing`` writes it) and the text lines."""
    sys.path.insert(0, str(REPO))
    from bigscale.config.compose import compose_config
    from bigscale.model.tiny import create_tiny_model

    cfg = compose_config(overrides(args, work, work / "unused"))
    assert cfg.model.create_if_missing is not None
    create_tiny_model(Path(cfg.model.name_or_path), cfg.model.create_if_missing)
    # Enough lines that no side reaches the end of an epoch (bigscale holds 5% out for eval).
    needed = args.steps * args.micro_batch * args.grad_accum * RANKS
    rows = math.ceil(needed / 0.9) + 64
    rng = random.Random(0)
    letters = string.ascii_lowercase + " "
    with (work / "train.jsonl").open("w") as f:
        for _ in range(rows):
            text = "".join(rng.choice(letters) for _ in range(args.seq_len - 2))
            f.write(json.dumps({"text": text}) + "\n")


def child_env(work: Path) -> dict[str, str]:
    env = {**os.environ, "BIGSCALE_HOME": str(work / "home")}
    # torchrun sets 1 thread per rank when there are several; pinned here so all three sides
    # run with the same threads whatever the caller's environment says.
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def run(command: list[str], work: Path, log: Path) -> None:
    with log.open("w") as out:
        code = subprocess.run(
            command, cwd=REPO, env=child_env(work), stdout=out, stderr=subprocess.STDOUT
        ).returncode
    if code != 0:
        # torchrun's own report comes last; the rank's traceback is the useful part.
        text = log.read_text()
        start = text.find("Traceback")
        sys.exit(f"{' '.join(command[4:])} failed (exit {code}):\n{text[start:][:6000]}")


def run_bigscale(
    args: argparse.Namespace, work: Path, name: str, extra: Sequence[str] = ()
) -> dict[str, float]:
    """One run, ``extra`` overrides on top; ``name`` must be fresh (resume=auto finds nothing)."""
    run_dir = work / name
    command = [*torchrun(), f"--nproc_per_node={RANKS}", "-m", "bigscale.train"]
    run([*command, *overrides(args, work, run_dir), *extra], work, work / f"{name}.out")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [row for row in rows if "step_time_s" in row and row["step"] > args.warmup_steps]
    # Each window holds --warmup-steps steps, so the mean of the windows is the mean per step.
    keys = ("step_time_s", "data_wait_s", "forward_backward_s", "optimizer_s")
    mean = {key: statistics.fmean(row[key] for row in windows) for key in keys}
    return {
        "step_s": mean["step_time_s"],
        "data_s": mean["data_wait_s"],
        "forward_backward_s": mean["forward_backward_s"],
        "optimizer_s": mean["optimizer_s"],
        "peak_mem_gib": max(row["peak_mem_gib"] for row in windows),
    }


def run_child(args: argparse.Namespace, work: Path, side: str) -> dict[str, float]:
    out = work / f"{side}.json"
    command = [*torchrun(), f"--nproc_per_node={RANKS}", __file__, "--child", side]
    command += ["--work", str(work), "--out", str(out)]
    for flag in ("hidden", "layers", "seq_len", "micro_batch", "grad_accum", "steps"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    command += ["--warmup-steps", str(args.warmup_steps)]
    run(command, work, work / f"{side}.out")
    return json.loads(out.read_text())


def report(
    args: argparse.Namespace,
    work: Path,
    times: dict[str, list[float]],
    splits: dict[str, list[dict[str, float]]],
) -> None:
    config = json.loads((work / "model" / "config.json").read_text())
    params = parameter_count(config)
    med = {side: statistics.median(times[side]) for side in SIDES}
    measured = args.steps - args.warmup_steps
    print(
        f"\nmodel: Llama-shaped, hidden {config['hidden_size']}, {config['num_hidden_layers']} "
        f"layers, vocab {config['vocab_size']}, {params / 1e6:.2f}M parameters, fp32; ZeRO-2, "
        f"{RANKS} ranks (gloo, 1 thread each), micro batch {args.micro_batch} x {args.seq_len} "
        f"tokens, grad accum {args.grad_accum}, clip 1.0, fused AdamW"
    )
    print(
        f"{args.steps} optimizer steps per run, the first {args.warmup_steps} left out, "
        f"{measured} timed; median of {args.rounds} rounds "
        f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)"
    )
    print(f"\n{'side':<10}{'step':>10}  rounds")
    for side in SIDES:
        print(f"{side:<10}{med[side] * 1000:>8.1f}ms  {spread(times[side])}")
    for other in ("bare", "hf"):
        per_round = [a / b for a, b in zip(times["bigscale"], times[other], strict=True)]
        print(
            f"bigscale / {other}: {med['bigscale'] / med[other]:.3f}x (median of per-round "
            f"ratios {statistics.median(per_round):.3f}x, rounds {spread(per_round, 3)})"
        )
    print("\nper step, medians (data wait, forward+backward, boundary step):")
    for side in SIDES:
        parts = [
            f"{key} {statistics.median(s[key] for s in splits[side]) * 1000:.1f} ms"
            for key in ("data_s", "forward_backward_s", "optimizer_s")
            if key in splits[side][0]
        ]
        if "inside_step_s" in splits[side][0]:
            inside = statistics.median(s["inside_step_s"] for s in splits[side])
            parts.append(f"on_step_begin to on_step_end {inside * 1000:.1f} ms (batches fetched)")
        print(f"  {side:<9} " + ", ".join(parts))


def spread(values: list[float], digits: int = 1) -> str:
    """Every round's value: ratios (digits=3) as they are, step times in ms."""
    scale = 1 if digits == 3 else 1000
    return ", ".join(f"{v * scale:.{digits}f}" for v in values)


def parameter_count(config: dict[str, Any]) -> int:
    h, i, v, n = (
        config[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers")
    )
    per_layer = 4 * h * h + 3 * h * i + 2 * h
    return n * per_layer + 2 * v * h + h


# --- the baselines' ranks -------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    import torch

    from bigscale.config.compose import compose_config
    from bigscale.config.schema import Precision
    from bigscale.data.tokenize import encode_example
    from bigscale.dist.engine import build_ds_config

    cfg = compose_config(overrides(args, args.work, args.work / "unused"))
    world = int(os.environ["WORLD_SIZE"])
    ds_config = build_ds_config(cfg, world, Precision.fp32)
    # bigscale's own encoding of the same lines: BOS + text + EOS, no loss on BOS.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    lines = (args.work / "train.jsonl").read_text().splitlines()
    encoded = [encode_example(json.loads(line), tokenizer, cfg.data) for line in lines]
    data = {
        "input_ids": torch.tensor([e["input_ids"] for e in encoded]),
        "labels": torch.tensor([e["labels"] for e in encoded]),
    }
    data["attention_mask"] = torch.ones_like(data["input_ids"])
    torch.manual_seed(cfg.trainer.seed)
    result = (
        bare_loop(args, cfg, ds_config, data)
        if args.child == "bare"
        else hf_trainer(args, cfg, ds_config, data)
    )
    if int(os.environ["RANK"]) == 0:
        args.out.write_text(json.dumps(result))


def load_model(cfg: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path, dtype=torch.float32, attn_implementation="sdpa"
    )


def bare_loop(
    args: argparse.Namespace, cfg: Any, ds_config: dict[str, Any], data: dict[str, Any]
) -> dict[str, float]:
    """DeepSpeed as its tutorial writes it, with bigscale's DeepSpeed dict and optimizer."""
    import deepspeed
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    model = load_model(cfg)
    o = cfg.optim
    # What bigscale's _build_optimizer makes: fused AdamW, no decay on 1-D weights.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=True,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
        config=ds_config,
    )
    dataset = TensorDataset(data["input_ids"], data["labels"], data["attention_mask"])
    sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.trainer.seed)
    loader = iter(DataLoader(dataset, batch_size=args.micro_batch, sampler=sampler))
    engine.train()
    ends: list[float] = []
    data_s = compute_s = step_s = 0.0
    for step in range(args.steps):
        for _ in range(args.grad_accum):
            t0 = time.perf_counter()
            ids, labels, mask = next(loader)
            t1 = time.perf_counter()
            loss = engine(input_ids=ids, labels=labels, attention_mask=mask).loss
            engine.backward(loss)
            t2 = time.perf_counter()
            engine.step()
            t3 = time.perf_counter()
            if step >= args.warmup_steps:
                data_s, compute_s, step_s = data_s + t1 - t0, compute_s + t2 - t1, step_s + t3 - t2
        ends.append(time.perf_counter())
    measured = args.steps - args.warmup_steps
    return {
        "step_s": (ends[-1] - ends[args.warmup_steps - 1]) / measured,
        "data_s": data_s / measured,
        "forward_backward_s": compute_s / measured,
        "optimizer_s": step_s / measured,
    }


def hf_trainer(
    args: argparse.Namespace, cfg: Any, ds_config: dict[str, Any], data: dict[str, Any]
) -> dict[str, float]:
    import torch
    from accelerate import PartialState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data["input_ids"])

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {k: v[i] for k, v in data.items()}

    class Stamps(TrainerCallback):
        """Wall time at each optimizer step's end; begin-to-end (forward, backward and the
        optimizer, without fetching the step's batches) on the side."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.inside: list[float] = []
            self.began = 0.0

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.began = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            now = time.perf_counter()
            self.ends.append(now)
            self.inside.append(now - self.began)

    # accelerate finds no backend for DeepSpeed on a CPU (it only knows nccl and the like there)
    # and would count 1 process; a PartialState made first with gloo, which TrainingArguments
    # then takes as configured, gives it the 2 ranks torchrun started. The training loop is
    # untouched: this only fixes the world size HF sees.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]
    o = cfg.optim
    training_args = TrainingArguments(
        output_dir=str(args.work / "hf-out"),
        deepspeed=ds_config,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_epsilon=o.eps,
        max_grad_norm=o.grad_clip,
        optim="adamw_torch_fused",
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=cfg.trainer.seed,
        accelerator_config={"use_configured_state": True},
    )
    stamps = Stamps()
    trainer = Trainer(
        model=load_model(cfg), args=training_args, train_dataset=Rows(), callbacks=[stamps]
    )
    trainer.train()
    measured = args.steps - args.warmup_steps
    return {
        "step_s": (stamps.ends[-1] - stamps.ends[args.warmup_steps - 1]) / measured,
        "inside_step_s": statistics.fmean(stamps.inside[args.warmup_steps :]),
    }


if __name__ == "__main__":
    main()
