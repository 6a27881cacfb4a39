"""Checkpoint save/load throughput: bigscale's CheckpointManager against plain torch.save /
torch.load of the same state, side by side in one process, alternating, several rounds.

    .venv/bin/python bench/checkpoint_io.py [--hidden 512 --layers 8 --rounds 3]

One rank (a process group of one, gloo on CPU / nccl on GPU), ZeRO-2, a Llama-shaped model built
from a config (random weights). bigscale's save does more than the baseline: DeepSpeed's sharded
files, the per-rank training state, the Hugging Face config, sha256 of every file, the manifest
and the atomic rename; its load verifies the checksums first. The ratio says what that costs.
The asynchronous row (``checkpoint.async=true``) times the training loop's stall (the copy to
host memory) and, separately, the background write up to the commit."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from bigscale.checkpoint.manager import CheckpointManager
    from bigscale.config.compose import compose_config
    from bigscale.config.schema import CheckpointConfig, Precision
    from bigscale.dist import engine as ds
    from bigscale.dist.ds_files import weights_only_loading
    from bigscale.dist.env import DistEnv
    from bigscale.quiet import quiet_third_party
    from bigscale.train.state import TrainState

    quiet_third_party()
    env = DistEnv()
    ds.init_distributed(env)
    cfg = compose_config(["strategy=zero2", "launcher.nproc_per_node=1", "logger=disabled"])
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 3,
            num_hidden_layers=args.layers,
            num_attention_heads=8,
            num_key_value_heads=8,
        )
    )
    engine = ds.Engine(
        model, cfg, ds.build_ds_config(cfg, 1, Precision.fp32), cfg.trainer.max_steps
    )
    # One optimizer step so Adam's moments exist and are saved.
    batch = {"input_ids": torch.randint(0, args.vocab, (2, 64))}
    batch["labels"] = batch["input_ids"]
    engine.backward(engine.forward(batch))
    engine.step()
    state = TrainState()

    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    manager = CheckpointManager(work / "bigscale", CheckpointConfig(keep_last=1, async_=False), env)
    background = CheckpointManager(
        work / "bigscale-async", CheckpointConfig(keep_last=1, async_=True), env
    )
    baseline_state = {
        "model": engine.module.state_dict(),
        "optimizer": engine.optimizer.state_dict(),
    }
    results: dict[str, list[float]] = {
        k: []
        for k in ("ours_save", "ours_load", "base_save", "base_load", "async_stall", "async_total")
    }
    size_ours = size_base = 0
    try:
        for step in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            manager.save(step, engine, state, lambda s=step: {"step": s}, force=True)
            results["ours_save"].append(time.perf_counter() - t0)
            tag = (work / "bigscale" / "latest").read_text().strip()
            size_ours = sum(
                p.stat().st_size for p in (work / "bigscale" / tag).rglob("*") if p.is_file()
            )

            t0 = time.perf_counter()
            point = manager.resume_point("auto")
            assert point is not None
            manager.load(point, engine, state)
            results["ours_load"].append(time.perf_counter() - t0)

            # Asynchronous: the stall is what the training loop waits for; the total runs until
            # the background write is committed.
            t0 = time.perf_counter()
            background.save(step, engine, state, lambda s=step: {"step": s}, force=True, wait=False)
            results["async_stall"].append(time.perf_counter() - t0)
            background.wait()
            results["async_total"].append(time.perf_counter() - t0)

            path = work / "torch.pt"
            t0 = time.perf_counter()
            torch.save(baseline_state, path)
            results["base_save"].append(time.perf_counter() - t0)
            size_base = path.stat().st_size

            t0 = time.perf_counter()
            with weights_only_loading():  # the ZeRO optimizer state holds a LossScaler
                torch.load(path, map_location="cpu", weights_only=True)
            results["base_load"].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    params = sum(p.numel() for p in engine.module.parameters())
    med = {k: statistics.median(v) for k, v in results.items()}
    mb_ours, mb_base = size_ours / 1e6, size_base / 1e6
    print(
        f"model: {params / 1e6:.1f}M params; checkpoint {mb_ours:.0f} MB (bigscale), "
        f"{mb_base:.0f} MB (torch.save of model+optimizer state)"
    )
    print(f"median of {args.rounds} rounds")
    print(
        f"save: bigscale {med['ours_save']:.2f}s ({mb_ours / med['ours_save']:.0f} MB/s), "
        f"torch.save {med['base_save']:.2f}s ({mb_base / med['base_save']:.0f} MB/s), "
        f"time ratio {med['ours_save'] / med['base_save']:.2f}x"
    )
    print(
        f"load: bigscale {med['ours_load']:.2f}s ({mb_ours / med['ours_load']:.0f} MB/s), "
        f"torch.load {med['base_load']:.2f}s ({mb_base / med['base_load']:.0f} MB/s), "
        f"time ratio {med['ours_load'] / med['base_load']:.2f}x"
    )
    print(
        f"async save: training stalls {med['async_stall']:.2f}s, background write and commit "
        f"done after {med['async_total']:.2f}s"
    )
    print(f"async stall / sync save: {med['async_stall'] / med['ours_save']:.3f} x")
    print(f"sync save / torch.save: {med['ours_save'] / med['base_save']:.3f} x")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
