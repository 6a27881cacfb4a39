"""Each speed or memory switch against bigscale's defaults, in the real Trainer, side by side.

    .venv/bin/python bench/switches.py [--rounds 2 --only compile,eager ...]

The runs are ``bench/step_time.py``'s bigscale side (2 ranks, gloo, ZeRO-2, fp32, the same model
and fixed-length data, its first window left out), once with the defaults and once per switch,
alternating within each round. Reported per switch: the median step time and the peak memory of
rank 0 (on CPU its resident high-water mark), both as ratios to the defaults of the same round.

On a 2-core CPU these ratios say whether a switch works end to end and what it costs there, not
what it gains on a GPU: compile, flash attention and communication overlap are GPU features, and
their GPU rows stay open until a GPU run fills them.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from step_time import add_workload_args, prepare, run_bigscale

SWITCHES = {
    "eager": ["model.attn_implementation=eager"],  # the default is sdpa on a CPU
    "chunked_loss": ["model.loss_chunk_tokens=64"],
    "checkpointing": ["model.gradient_checkpointing=true"],
    "checkpoint_every_2": ["model.gradient_checkpointing=true", "model.checkpoint_every=2"],
    "no_overlap_comm": ["strategy.overlap_comm=false"],
    "small_buckets": ["strategy.reduce_bucket_size=1000000"],
    "unfused_adamw": ["optim.fused=false"],
    "compile": ["model.compile=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default=",".join(SWITCHES), help="comma-separated switches")
    add_workload_args(parser)
    args = parser.parse_args()
    chosen = args.only.split(",")
    unknown = sorted(set(chosen) - set(SWITCHES))
    if unknown:
        parser.error(f"unknown switches {unknown}; choose from {', '.join(SWITCHES)}")

    work = Path(tempfile.mkdtemp(prefix="bench-switches-"))
    try:
        prepare(args, work)
        ratios: dict[str, list[tuple[float, float]]] = {name: [] for name in chosen}
        for r in range(args.rounds):
            for name in chosen:
                # The defaults run next to every switch, so a drifting machine load hits both.
                base = run_bigscale(args, work, f"defaults-{name}-{r}")
                switched = run_bigscale(args, work, f"{name}-{r}", SWITCHES[name])
                ratios[name].append(
                    (
                        switched["step_s"] / base["step_s"],
                        switched["peak_mem_gib"] / base["peak_mem_gib"],
                    )
                )
                print(
                    f"round {r + 1} {name}: defaults {base['step_s'] * 1000:.1f} ms, "
                    f"{base['peak_mem_gib']:.2f} GiB; switched {switched['step_s'] * 1000:.1f} "
                    f"ms, {switched['peak_mem_gib']:.2f} GiB",
                    flush=True,
                )
        print(
            f"\n{args.steps} steps per run, the first {args.warmup_steps} left out; hidden "
            f"{args.hidden}, {args.layers} layers, micro batch {args.micro_batch} x "
            f"{args.seq_len}, grad accum {args.grad_accum}; median of {args.rounds} rounds"
        )
        print(f"{'switch':<20}{'overrides':<62}{'step time':>10}{'peak mem':>10}")
        for name in chosen:
            time_ratio = statistics.median(t for t, _ in ratios[name])
            mem_ratio = statistics.median(m for _, m in ratios[name])
            print(f"{name:<20}{' '.join(SWITCHES[name]):<62}{time_ratio:>9.3f}x{mem_ratio:>9.3f}x")
    except BaseException:
        print(f"kept for a look: {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
