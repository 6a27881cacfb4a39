"""``torchrun ... -m tests.distributed.data_cache_probe DATA TOKENIZER CACHE OUT``: each rank
builds the datasets as a training run does, under a collective timeout shorter than the
builder's tokenization (``BIGSCALE_FAULT_TOKENIZE_DELAY_S``), then checks the group still works
with a collective, and builds once more from a missing file to see rank 0's error arrive. Every
rank logs INFO to ``OUT/rank<r>.log`` and writes what it saw to ``OUT/rank<r>.json``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from bigscale.config.schema import DataConfig
from bigscale.data.pipeline import build_datasets
from bigscale.dist.engine import init_distributed
from bigscale.dist.env import DistEnv
from bigscale.errors import DataError

TIMEOUT_MINUTES = 0.05  # 3 s


def main(data: str, tokenizer_dir: str, cache: str, out: str) -> None:
    env = DistEnv.from_environ()
    logger = logging.getLogger("bigscale")
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.FileHandler(Path(out) / f"rank{env.rank}.log"))
    init_distributed(env, timeout_minutes=TIMEOUT_MINUTES)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = DataConfig(path=data, validation_fraction=0.1, packing=True, max_length=64)
    bundle = build_datasets(cfg, tokenizer, env, 0, Path(cache))
    rows = torch.tensor([len(bundle.train)])
    dist.all_reduce(rows)  # the group survived the wait
    try:
        build_datasets(DataConfig(path=f"{data}.missing"), tokenizer, env, 0, Path(cache))
        error = None
    except DataError as e:
        error = str(e)
    result = {"train": len(bundle.train), "sum": int(rows), "error": error}
    (Path(out) / f"rank{env.rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
