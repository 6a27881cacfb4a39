"""``torchrun ... -m tests.distributed.logits_probe [overrides]``: one rank of a real training
run (the same Trainer ``python -m bigscale.train`` builds), which afterwards asks the trained
engine for the logits of a fixed prompt and saves them as ``RUN_DIR/engine_logits.pt``, so a test
can compare them with the exported model's. Under ZeRO-3 the forward is collective, so every rank
runs it."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bigscale.config.compose import compose_config
from bigscale.dist.engine import init_distributed
from bigscale.dist.env import DistEnv
from bigscale.train.assets import prepare_assets
from bigscale.train.trainer import Trainer

PROMPT = "12+34=46\n7+8="


def main(overrides: list[str]) -> None:
    env = DistEnv.from_environ()
    cfg = compose_config(overrides)
    init_distributed(env)
    run_dir = Path(cfg.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        prepare_assets(cfg)  # the tiny model, as `bigscale train` creates it
    dist.barrier()
    trainer = Trainer(cfg, env, run_dir)
    trainer.fit()
    ids = [
        trainer.tokenizer.bos_token_id,
        *trainer.tokenizer(PROMPT, add_special_tokens=False)["input_ids"],
    ]
    trainer.engine.train(False)
    with torch.no_grad():
        logits = trainer.engine.module(input_ids=torch.tensor([ids])).logits
    if env.is_main:
        torch.save({"input_ids": ids, "logits": logits}, run_dir / "engine_logits.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
