"""Issue #6's GPU targets in one script: a Llama-3.2-1B-shaped model (random weights), bf16,
sequence 2048, one GPU, mixed-length documents; real-token throughput, MFU and peak memory of

- ``bigscale-zero2``: ``bigscale train``, packed (padding-free), ZeRO-2;
- ``bigscale-zero3``: the same under ZeRO-3;
- ``hf-defaults``: HF Trainer + DeepSpeed (the same ZeRO-2 dict) as its docs set it up: each
  batch padded to its longest document (``DataCollatorForLanguageModeling``), its default
  optimizer and attention;
- ``hf-matched``: HF Trainer with bigscale's settings: padding-free batches
  (``DataCollatorWithFlattening``), fused AdamW, the same attention kernel.

Every side is a fresh ``torchrun --nproc_per_node 1`` over the same documents, sides alternating
per round; the first ``--warmup-steps`` optimizer steps are left out. Real tokens are the
documents' tokens, never padding, so the padded side is not credited for its padding. Each
batch holds about the same number of real tokens (``--tokens-per-step``) on every side.

    .venv/bin/python bench/gpu_throughput.py             # a GPU: the figures for RESULTS.md
    .venv/bin/python bench/gpu_throughput.py --smoke     # any machine: tiny shape, fp32, CPU,
                                                         # checks the plumbing, figures mean nothing
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from step_time import run, torchrun

SIDES = ("bigscale-zero2", "bigscale-zero3", "hf-defaults", "hf-matched")
SEQ = 2048


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, fp32")
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=SIDES)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.tokens_per_step, args.steps, args.warmup_steps, args.rounds = 1024, 6, 2, 1
    if args.child:
        hf_child(args)
        return
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no GPU here: the GPU rows stay open (--smoke checks the plumbing on a CPU)")
        return
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        prepare(args, work)
        results: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        for r in range(args.rounds):
            for side in SIDES[r % 2 :] + SIDES[: r % 2]:
                results[side].append(run_side(args, work, side, r))
                print(f"round {r + 1} {side}: {results[side][-1]}", flush=True)
        report(args, work, results)
    except BaseException:
        print(f"kept for a look: {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)


def prepare(args: argparse.Namespace, work: Path) -> None:
    """The model directory (random weights, a character tokenizer: the vocabulary's size, not
    its content, sets the LM head's cost) and documents of 32 to 2000 characters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bigscale.model.shapes import LLAMA_3_2_1B
    from bigscale.model.tiny import build_char_tokenizer

    shape: dict[str, Any] = dict(LLAMA_3_2_1B)
    if args.smoke:
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        shape.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).save_pretrained(work / "model")
    build_char_tokenizer().save_pretrained(work / "model")
    rng = random.Random(0)
    letters = string.ascii_lowercase + " "
    docs = args.steps * args.tokens_per_step // 1000 * 2 + 200  # more than any side reads
    with (work / "docs.jsonl").open("w") as f:
        for _ in range(docs):
            text = "".join(rng.choice(letters) for _ in range(rng.randint(32, 2000)))
            f.write(json.dumps({"text": text}) + "\n")


def bigscale_overrides(args: argparse.Namespace, work: Path, side: str, r: int) -> list[str]:
    return [
        "experiment=none",
        f"strategy={side.removeprefix('bigscale-')}",
        "launcher.nproc_per_node=1",
        "logger=disabled",
        f"run_dir={work / f'{side}-{r}'}",
        f"model.name_or_path={work / 'model'}",
        "model.create_if_missing=null",
        "data=text_files",
        f"data.path={work / 'docs.jsonl'}",
        f"data.max_length={SEQ}",
        "data.packing=true",
        f"data.cache_dir={work / 'tokenized'}",
        f"trainer.precision={'fp32' if args.smoke else 'bf16'}",
        f"trainer.max_steps={args.steps}",
        f"trainer.micro_batch_size={max(1, args.tokens_per_step // SEQ)}",
        "trainer.grad_accum=1",
        f"trainer.log_every={args.warmup_steps}",
        "trainer.eval_every=0",
        "trainer.eval_batches=1",
        "trainer.progress_bar=false",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "eval.exact_match=false",
        "export.at_end=false",
    ]


def run_side(args: argparse.Namespace, work: Path, side: str, r: int) -> dict[str, float]:
    if side.startswith("bigscale"):
        overrides = bigscale_overrides(args, work, side, r)
        run(
            [*torchrun(), "--nproc_per_node=1", "-m", "bigscale.train", *overrides],
            work,
            work / f"{side}-{r}.out",
        )
        rows = [json.loads(x) for x in (work / f"{side}-{r}" / "metrics.jsonl").open()]
        timed = [x for x in rows if "step_time_s" in x and x["step"] > args.warmup_steps]
        out = {
            "real_tokens_per_s": statistics.fmean(x["real_tokens_per_s"] for x in timed),
            "real_token_share": statistics.fmean(x["real_token_share"] for x in timed),
            "peak_mem_gib": max(x["peak_mem_gib"] for x in timed),
        }
        if "mfu" in timed[0]:
            out["mfu"] = statistics.fmean(x["mfu"] for x in timed)
        return out
    result = work / f"{side}-{r}.json"
    command = [*torchrun(), "--nproc_per_node=1", __file__, "--child", side, "--work", str(work)]
    for flag in ("tokens_per_step", "steps", "warmup_steps"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    run([*command, *(["--smoke"] if args.smoke else [])], work, work / f"{side}-{r}.out")
    (work / "hf.json").rename(result)
    return json.loads(result.read_text())


def report(args: argparse.Namespace, work: Path, results: dict[str, list[dict]]) -> None:
    import torch

    med = {
        side: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for side, rows in results.items()
    }
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke)"
    print(
        f"\n{device}; {args.steps} steps, the first {args.warmup_steps} left out; "
        f"~{args.tokens_per_step} real tokens per step; median of {args.rounds} rounds"
    )
    for side, m in med.items():
        print(f"  {side:<15} " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
    z2 = med["bigscale-zero2"]["real_tokens_per_s"]
    for other in ("hf-defaults", "hf-matched", "bigscale-zero3"):
        print(f"bigscale-zero2 / {other}: {z2 / med[other]['real_tokens_per_s']:.3f}x tokens/s")


# --- the HF Trainer sides' rank --------------------------------------------------------------


def hf_child(args: argparse.Namespace) -> None:
    import os

    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from bigscale.config.compose import compose_config
    from bigscale.config.schema import Precision
    from bigscale.dist.engine import build_ds_config

    matched = args.child == "hf-matched"
    cfg = compose_config(bigscale_overrides(args, args.work, "bigscale-zero2", 0))
    precision = Precision.fp32 if args.smoke else Precision.bf16
    ds_config = build_ds_config(cfg, 1, precision)
    tokenizer = AutoTokenizer.from_pretrained(args.work / "model")
    lines = (args.work / "docs.jsonl").read_text().splitlines()
    docs = [
        tokenizer(json.loads(x)["text"], truncation=True, max_length=SEQ)["input_ids"]
        for x in lines
    ]
    per_batch = max(1, round(args.tokens_per_step / statistics.fmean(map(len, docs))))
    padded = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    flat = DataCollatorWithFlattening()
    real_tokens: list[int] = []

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        real_tokens.append(sum(len(e["input_ids"]) for e in examples))
        return flat(examples) if matched else padded(examples)

    class Stamps(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    if not torch.cuda.is_available():  # the smoke run: see step_time.py's HF side
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    o = cfg.optim
    extra: dict[str, Any] = {"optim": "adamw_torch_fused"} if matched else {}
    training_args = TrainingArguments(
        output_dir=str(args.work / "hf-out"),
        deepspeed=ds_config,
        bf16=not args.smoke,
        per_device_train_batch_size=per_batch,
        max_steps=args.steps,
        learning_rate=o.lr,
        max_grad_norm=o.grad_clip,
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        accelerator_config={"use_configured_state": True} if args.smoke else None,
        **extra,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.work / "model",
        dtype=torch.float32 if args.smoke else torch.bfloat16,
        attn_implementation=_bigscale_kernel(precision) if matched else None,
    )
    stamps = Stamps()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=[{"input_ids": d} for d in docs],
        data_collator=collate,
        callbacks=[stamps],
    )
    trainer.train()
    w = args.warmup_steps
    seconds = stamps.ends[-1] - stamps.ends[w - 1]
    out = {"real_tokens_per_s": sum(real_tokens[w : args.steps]) / seconds}
    if torch.cuda.is_available():
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    (args.work / "hf.json").write_text(json.dumps(out))


def _bigscale_kernel(precision: Any) -> str:
    import torch

    from bigscale.config.schema import AttnImplementation
    from bigscale.model.attention import attention_kernel

    dtype = torch.float32 if precision.value == "fp32" else torch.bfloat16
    return attention_kernel(AttnImplementation.auto, dtype)


if __name__ == "__main__":
    main()
