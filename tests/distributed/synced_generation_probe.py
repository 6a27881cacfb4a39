"""``torchrun --nproc_per_node 2 -m tests.distributed.synced_generation_probe OUT``: each rank
builds the same memorised tiny model and generates its shard of the held-out set with
``synced=True``, as under ZeRO-3, where every forward is a collective. Rank 0's answer ends at
the text marker sooner than rank 1's; the rank writes how many forwards it ran and the gathered
answers to ``OUT/rank<N>.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bigscale.config.schema import EvalConfig
from bigscale.dist.env import DistEnv
from bigscale.train import task_eval
from tests.text_markers import memorised_model, text_marker_tokenizer, write_test_set

# Rank r generates examples r, r + 2, ...: rank 0 the short answer, rank 1 the long one.
ROWS = [("Six times seven?", "42"), ("What is the date?", "1999-07-02")]


def main(out: Path) -> None:
    env = DistEnv.from_environ()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist.init_process_group("gloo")
    own = out / f"rank{env.rank}"
    own.mkdir(parents=True, exist_ok=True)
    tokenizer = text_marker_tokenizer(own / "tokenizer")
    examples = write_test_set(own, ROWS)
    model = memorised_model(tokenizer, examples)
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    cfg = EvalConfig(max_new_tokens=40, batch_size=4)
    result = task_eval.generate(model, tokenizer, examples, cfg, env, synced=True)
    report = {"forwards": len(forwards), "answers": result.answers, "hits": result.budget_hits}
    (out / f"rank{env.rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
