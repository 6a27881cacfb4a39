"""Sequence parallelism on 2 CPU ranks: peak memory per rank against sequence length, and step
time against data parallelism at equal tokens per step, with the all-to-all's share.

    PYTHONPATH=. .venv/bin/python bench/sequence_parallel.py [--lengths 512 1024 2048 4096
        --step-length 1024 --steps 6 --warmup 2]

Each measurement is one ``torchrun --standalone --nproc_per_node 2`` re-entering this file, gloo,
fp32, on bigscale's own engine path: ``build_ds_config`` and ``Engine`` on a composed config
(ZeRO-2), which under ``strategy.sequence_parallel_size=2`` routes attention through DeepSpeed's
Ulysses (``bigscale.dist.sequence_parallel.enable``), and each rank's slice cut by
``bigscale.data.shard.shard_batch``, as the trainer does. The model: a Llama shape with random
weights (hidden 256, 4 layers, 4 query / 2 key-value heads, MLP 688, vocabulary 2000; 3.4M
parameters), sdpa attention, one unpacked document per row.

1. memory: one optimizer step at each length, shortest first, on SP=1 (2 data-parallel ranks,
   each a whole sequence) and SP=2 (one sequence split across the 2 ranks); after each, the
   rank's peak RSS (``ru_maxrss``, a high-water mark, so ascending lengths give the curve).
   Reported: peak RSS per rank at each length, its growth over the shortest length, and the
   ratio of the two growths (the part of the peak that the sequence sets; the rest is the
   libraries and the model, the same on both).
2. step time: SP=2 with micro batch 2 against DP-only with micro batch 1 on each rank: 2
   sequences of ``--step-length`` per step either way, the same tokens per rank. Time per step
   after ``--warmup`` steps, and the time each rank spent inside ``all_to_all_single`` (wrapped
   with a timer; Ulysses is its only caller, ZeRO-2 reduces with all-reduce) as a share of it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = dict(
    vocab_size=2000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16384,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--step-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", choices=["memory", "time"])
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-sp-"))
    make_model(work / "model")
    memory = {sp: run(args, work, "memory", sp) for sp in (1, 2)}
    timing = {sp: run(args, work, "time", sp) for sp in (1, 2)}
    report(args, memory, timing)


def make_model(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**MODEL, attn_implementation="sdpa")).save_pretrained(path)


def run(args: argparse.Namespace, work: Path, mode: str, sp: int) -> list[dict[str, Any]]:
    out = work / f"{mode}-sp{sp}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [__file__, "--child", mode, "--sp", str(sp), "--work", str(work), "--out", str(out)]
    cmd += ["--lengths", *map(str, args.lengths), "--step-length", str(args.step_length)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"{mode} sp={sp} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


# --- the ranks ------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    import deepspeed.comm
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from bigscale.config.compose import compose_config
    from bigscale.config.schema import Precision
    from bigscale.data.shard import shard_batch
    from bigscale.dist.engine import Engine, build_ds_config, init_distributed
    from bigscale.dist.env import DistEnv

    env = DistEnv.from_environ()
    init_distributed(env)
    micro = 2 if (args.child == "time" and args.sp == 2) else 1
    cfg = compose_config(
        [
            "experiment=arithmetic",
            f"model.name_or_path={args.work / 'model'}",
            "model.attn_implementation=sdpa",
            "strategy=zero2",
            f"strategy.sequence_parallel_size={args.sp}",
            "trainer.precision=fp32",
            f"trainer.micro_batch_size={micro}",
            "trainer.grad_accum=1",
            "optim.schedule=constant",
            "optim.warmup_steps=0",
        ]
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path, dtype=torch.float32, attn_implementation="sdpa"
    )
    engine = Engine(model, cfg, build_ds_config(cfg, env.world_size, Precision.fp32), 10**6)
    engine.train()

    waited = [0.0]
    plain = deepspeed.comm.all_to_all_single

    def timed(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return plain(*a, **k)
        finally:
            waited[0] += time.perf_counter() - t0

    deepspeed.comm.all_to_all_single = timed
    # Under sequence parallelism both ranks read the same rows; else each its own.
    data_rank = 0 if args.sp == 2 else env.rank
    gen = torch.Generator().manual_seed(1000 + data_rank)

    def step(length: int) -> None:
        ids = torch.randint(3, MODEL["vocab_size"], (micro, length), generator=gen)
        batch = {"input_ids": ids, "labels": ids.clone(), "num_tokens": torch.tensor(ids.numel())}
        if args.sp > 1:
            batch = shard_batch(batch, env.rank % args.sp, args.sp)
        loss = engine.forward(batch)
        engine.backward(loss)
        engine.step()

    rows: list[dict[str, Any]] = []
    if args.child == "memory":
        for length in args.lengths:
            step(length)
            peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append({"length": length, "peak_rss_mib": peak_mib})
    else:
        for _ in range(args.warmup):
            step(args.step_length)
        dist.barrier()
        waited[0], t0 = 0.0, time.perf_counter()
        for _ in range(args.steps):
            step(args.step_length)
        dist.barrier()
        seconds = time.perf_counter() - t0
        rows.append({"step_s": seconds / args.steps, "all_to_all_s": waited[0] / args.steps})
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, rows)
    if env.rank == 0:
        args.out.write_text(json.dumps(gathered))


# --- the report -----------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    memory: dict[int, list[list[dict[str, Any]]]],
    timing: dict[int, list[list[dict[str, Any]]]],
) -> None:
    print("peak RSS per rank (MiB, the larger of the 2 ranks) against sequence length")
    print("| tokens per sequence | SP=1 (whole sequence per rank) | SP=2 (half per rank) |")
    print("| --- | --- | --- |")
    peaks = {
        sp: [max(r[i]["peak_rss_mib"] for r in memory[sp]) for i in range(len(args.lengths))]
        for sp in (1, 2)
    }
    for i, length in enumerate(args.lengths):
        print(f"| {length} | {peaks[1][i]:.0f} | {peaks[2][i]:.0f} |")
    growth = {sp: peaks[sp][-1] - peaks[sp][0] for sp in (1, 2)}
    print(
        f"growth {args.lengths[0]} -> {args.lengths[-1]} tokens: SP=1 {growth[1]:.0f} MiB, "
        f"SP=2 {growth[2]:.0f} MiB, ratio SP=1 / SP=2 = {growth[1] / max(growth[2], 1):.2f}x"
    )
    step = {sp: max(r[0]["step_s"] for r in timing[sp]) for sp in (1, 2)}
    a2a = {sp: max(r[0]["all_to_all_s"] for r in timing[sp]) for sp in (1, 2)}
    print(
        f"step time, 2 x {args.step_length} tokens per step: DP-only {step[1] * 1000:.0f} ms, "
        f"SP=2 {step[2] * 1000:.0f} ms, ratio SP=2 / DP = {step[2] / step[1]:.2f}x; "
        f"all-to-all {a2a[2] * 1000:.0f} ms per step = {a2a[2] / step[2]:.1%} of the SP=2 step"
    )


if __name__ == "__main__":
    main()
