"""bigscale's DPO against TRL's DPOTrainer on 2 ranks with DeepSpeed: steps per second and peak
memory per rank, same model, same pairs, same batch, alternating in one invocation.

    PYTHONPATH=. .venv/bin/python bench/dpo_vs_trl.py [--hidden 256 --layers 4 --micro-batch 8
                                                       --steps 40 --warmup-steps 10 --rounds 2
                                                       --pairs N]

Every side is one ``torchrun --standalone --nproc_per_node 2`` (gloo on CPU, ZeRO-2, fp32, 1
thread per rank):

- bigscale: ``-m bigscale.train experiment=dpo_arithmetic`` with the model and batch below; its
  reference log-probs come from the one pass before step 1 (outside the timed steps, reported
  apart as part of the run's wall time). Step time is read from metrics.jsonl (``step_time_s``
  over each logging window of ``--warmup-steps`` steps, the first window left out).
- trl: this file re-entered under torchrun: ``trl.DPOTrainer`` (sigmoid loss, the same beta,
  learning rate, clipping, AdamW) with ``deepspeed=`` the dict bigscale builds for the same
  composed config, and, as TRL does by default, the reference model resident beside the policy
  and run every step.
- trl-precompute: the same with ``precompute_ref_log_probs=True`` (TRL's own pass before
  training; no reference model kept).

Same model: the tiny preset's Llama shape at ``--hidden``/``--layers`` (made once by
``model.create_if_missing``), loaded with ``from_pretrained`` by every side. Same data: the
``arithmetic_pairs`` training pairs (``"23+45="`` -> ``"68"`` against a near miss), which TRL
tokenizes itself from the same strings (it adds EOS but no BOS; bigscale writes BOS + prompt +
completion + EOS: one token more per sequence, reported). Same batch: ``--micro-batch`` pairs per
rank, no accumulation. Memory: peak RSS of each rank's process (``ru_maxrss``; this is a CPU
machine, so resident memory, libraries included, stands in for accelerator memory), the larger
of the two ranks."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import REPO, run, torchrun

RANKS = 2
SIDES = ("bigscale", "trl", "trl-precompute")


def overrides(args: argparse.Namespace, work: Path, run_dir: Path) -> list[str]:
    h, n = args.hidden, args.layers
    return [
        "experiment=dpo_arithmetic",
        "strategy=zero2",
        "trainer.precision=fp32",
        f"launcher.nproc_per_node={RANKS}",
        "logger=disabled",
        f"run_dir={run_dir}",
        f"model.name_or_path={work / 'home' / 'models' / f'llama-{h}x{n}'}",
        f"model.create_if_missing.hidden_size={h}",
        f"model.create_if_missing.num_layers={n}",
        f"model.create_if_missing.num_heads={max(1, h // 64)}",
        f"model.create_if_missing.intermediate_size={3 * h}",
        f"trainer.micro_batch_size={args.micro_batch}",
        "trainer.grad_accum=1",
        f"trainer.max_steps={args.steps}",
        f"trainer.log_every={args.warmup_steps}",
        "trainer.eval_every=0",
        "trainer.eval_batches=1",
        "trainer.progress_bar=false",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "eval.exact_match=false",
        "export.at_end=false",
        *subset_overrides(args, work),
    ]


def subset_overrides(args: argparse.Namespace, work: Path) -> list[str]:
    """With ``--pairs N``: the first N training pairs (and 64 validation pairs) as the user's
    own files, so both sides' passes before training stay short on a larger model."""
    if not args.pairs:
        return []
    return [
        "data.generate=null",
        f"data.path={work / 'pairs.jsonl'}",
        f"data.validation_path={work / 'pairs_validation.jsonl'}",
        "data.test_path=null",
    ]


def prepare(args: argparse.Namespace, work: Path) -> None:
    """The model directory and the arithmetic pairs, written as a run would write them."""
    os.environ["BIGSCALE_HOME"] = str(work / "home")
    sys.path.insert(0, str(REPO))
    from bigscale.config.compose import compose_config
    from bigscale.train.assets import prepare_assets

    pairs = args.pairs
    args.pairs = 0  # the generated files first, then the subset of them
    cfg = compose_config(overrides(args, work, work / "unused"))
    prepare_assets(cfg)
    args.pairs = pairs
    if pairs:
        for source, target, n in (
            (cfg.data.path, work / "pairs.jsonl", pairs),
            (cfg.data.validation_path, work / "pairs_validation.jsonl", 64),
        ):
            lines = Path(source).read_text().splitlines(keepends=True)[:n]
            target.write_text("".join(lines))


def run_bigscale(args: argparse.Namespace, work: Path, name: str) -> dict[str, float]:
    run_dir = work / name
    command = [*torchrun(), f"--nproc_per_node={RANKS}", "-m", "bigscale.train"]
    began = time.perf_counter()
    run([*command, *overrides(args, work, run_dir)], work, work / f"{name}.out")
    wall = time.perf_counter() - began
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "step_time_s" in r and r["step"] > args.warmup_steps]
    return {
        "step_s": statistics.fmean(r["step_time_s"] for r in windows),
        "peak_rss_gib": max(r["peak_mem_gib"] for r in rows if "peak_mem_gib" in r),
        "wall_s": wall,
        "accuracy": windows[-1].get("rewards/accuracy", float("nan")),
    }


def run_trl(args: argparse.Namespace, work: Path, side: str) -> dict[str, float]:
    out = work / f"{side}.json"
    command = [*torchrun(), f"--nproc_per_node={RANKS}", __file__, "--child", side]
    command += ["--work", str(work), "--out", str(out)]
    for flag in ("hidden", "layers", "micro_batch", "steps", "warmup_steps", "pairs"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    began = time.perf_counter()
    run(command, work, work / f"{side}.out")
    wall = time.perf_counter() - began
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob(f"{side}.json.rank*"))]
    return {
        "step_s": ranks[0]["step_s"],
        "peak_rss_gib": max(r["peak_rss_gib"] for r in ranks),
        "wall_s": wall,
        "accuracy": ranks[0]["accuracy"],
        "engine": ranks[0]["engine"],
        "ref_model": ranks[0]["ref_model"],
    }


# --- TRL's ranks ----------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    import torch
    from accelerate import PartialState
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from bigscale.config.compose import compose_config
    from bigscale.config.schema import Precision
    from bigscale.dist.engine import build_ds_config

    cfg = compose_config(overrides(args, args.work, args.work / "unused"))
    ds_config = build_ds_config(cfg, int(os.environ["WORLD_SIZE"]), Precision.fp32)
    # As in bench/step_time.py: accelerate knows no DeepSpeed backend on a CPU and would count
    # one process; a gloo PartialState made first gives it the 2 ranks torchrun started.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]
    # From the file with an on-disk cache every rank shares: TRL maps it on the main process
    # first and the others read that cache.
    dataset = load_dataset(
        "json", data_files=cfg.data.path, split="train", cache_dir=str(args.work / "hf-cache")
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)

    def model() -> Any:
        return AutoModelForCausalLM.from_pretrained(
            cfg.model.name_or_path, dtype=torch.float32, attn_implementation="sdpa"
        )

    class Stamps(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.accuracy = float("nan")

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.ends.append(time.perf_counter())

        def on_log(self, _a: Any, _s: Any, _c: Any, logs: dict | None = None, **__: Any) -> None:
            if logs and "rewards/accuracies" in logs:
                self.accuracy = logs["rewards/accuracies"]

    o = cfg.optim
    training_args = DPOConfig(
        output_dir=str(args.work / f"{args.child}-out"),
        deepspeed=ds_config,
        bf16=False,  # TRL's default; fp32 as bigscale's side
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
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
        beta=cfg.objective.beta,
        loss_type=["sigmoid"],
        max_length=cfg.data.max_length,
        precompute_ref_log_probs=args.child == "trl-precompute",
        logging_steps=args.warmup_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=cfg.trainer.seed,
        accelerator_config={"use_configured_state": True},
    )
    stamps = Stamps()
    trainer = DPOTrainer(
        model=model(),
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[stamps],
    )
    trainer.train()
    measured = args.steps - args.warmup_steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    result = {
        "step_s": (stamps.ends[-1] - stamps.ends[args.warmup_steps - 1]) / measured,
        "peak_rss_gib": rss,
        "accuracy": stamps.accuracy,
        # That TRL ran under DeepSpeed (not plain DDP): the engine it trained.
        "engine": type(trainer.model_wrapped).__name__,
        "ref_model": type(trainer.ref_model).__name__ if trainer.ref_model is not None else None,
    }
    Path(f"{args.out}.rank{os.environ['RANK']}").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=0, help="train on the first N pairs only")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--child", choices=SIDES[1:])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.steps % args.warmup_steps:
        parser.error("--steps must be a multiple of --warmup-steps (bigscale's logging window)")
    if args.child:
        child(args)
        return
    sides = tuple(args.sides.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-trl-"))
    try:
        prepare(args, work)
        results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        for r in range(args.rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
            for side in order:
                result = (
                    run_bigscale(args, work, f"bigscale-{r}")
                    if side == "bigscale"
                    else run_trl(args, work, side)
                )
                results[side].append(result)
                print(f"round {r + 1} {side}: {json.dumps(result)}", flush=True)
        report(args, results)
    except BaseException:
        print(f"kept for a look: {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)


def report(args: argparse.Namespace, results: dict[str, list[dict[str, float]]]) -> None:
    numbers = ("step_s", "peak_rss_gib", "wall_s", "accuracy")
    med = {
        side: {k: statistics.median(r[k] for r in rs) for k in numbers}
        for side, rs in results.items()
    }
    print(
        f"\nLlama-shaped hidden {args.hidden}, {args.layers} layers, fp32, ZeRO-2, {RANKS} ranks "
        f"(gloo, 1 thread each), {args.micro_batch} pairs per rank per step, {args.steps} steps "
        f"(first {args.warmup_steps} left out), median of {args.rounds} rounds"
    )
    print(f"{'side':<16}{'steps/s':>9}{'peak RSS/rank':>15}{'run wall':>10}{'acc':>6}")
    for side, m in med.items():
        print(
            f"{side:<16}{1 / m['step_s']:>9.2f}{m['peak_rss_gib']:>13.2f}Gi"
            f"{m['wall_s']:>9.1f}s{m['accuracy']:>6.2f}"
        )
    if "bigscale" in med:
        for side in med:
            if side != "bigscale":
                ratio = med[side]["step_s"] / med["bigscale"]["step_s"]
                print(f"steps/s bigscale / {side}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
