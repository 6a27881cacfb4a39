"""The reference model's log-probs, computed once, so no second model lives beside the policy.

DPO and IPO compare the policy with the model it started from. Rather than keep a frozen copy
in memory (twice the weights; under ZeRO-3 a second partitioned engine) and run it every step,
one pass before training runs the freshly loaded engine itself (same strategy, same precision,
dropout off) over every pair of the training and validation splits and records the summed
log-probs of each completion: one forward over the data, no backward. The table is stored
beside the tokenization cache under a key of the model files, the tokenized split and the
settings that change the numbers (not ``data.packing``: the pass always pads, see
``padded_pair_collate``), so every step, rank, resumed run and rerun reads it, and a
resumed run's reference is bitwise the one its first run used.

With LoRA this pass is used too (not the base with adapters switched off each step): it costs
one forward over the data once instead of one extra forward per step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bigscale.config.schema import ObjectiveName, TrainConfig
from bigscale.data.cache import cache_root
from bigscale.data.pair_packing import padded_pair_collate
from bigscale.data.preference import (
    REFERENCE_OBJECTIVES,
    REFERENCE_TABLE_COLUMNS,
    reference_pairs,
)
from bigscale.dist.engine import Engine
from bigscale.dist.env import DistEnv
from bigscale.logging import get_logger
from bigscale.train.data_feed import cache_dir
from bigscale.train.objectives import (
    TRAIN,
    VALIDATION,
    Objective,
    PreferenceObjective,
    RewardObjective,
    sequence_logps,
)

log = get_logger(__name__)

# Bump when how the table is computed changes, so an older table is not read.
_VERSION = 1


def _model_identity(cfg: TrainConfig) -> dict[str, Any]:
    m = cfg.model
    files: list[tuple[str, int, int]] = []
    root = Path(m.name_or_path).expanduser()
    if root.is_dir():  # a local model: its files (by size and time: weights can be many GB)
        for f in sorted(root.rglob("*")):
            if f.is_file():
                stat = f.stat()
                files.append((str(f.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return {
        "name": m.name_or_path,
        "revision": m.revision,
        "dtype": str(m.dtype.value),
        "attn": str(m.attn_implementation.value),
        "chunk": m.loss_chunk_tokens,
        "files": files,
    }


def table_key(cfg: TrainConfig, split_fingerprint: str, precision: str) -> str:
    """Same model files, tokenized split and numerics settings -> the same table."""
    parts = {
        "version": _VERSION,
        "model": _model_identity(cfg),
        "split": split_fingerprint,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def split_identity(dataset: Any) -> str:
    """The tokenized split by content: its cache files are named by content keys
    (``bigscale.data.tokenize.cache_key``). ``datasets``' own fingerprint would not do: a
    concatenated split (the validation set) gets a new random one in every process."""
    names = sorted(Path(f["filename"]).name for f in dataset.cache_files)
    return json.dumps([names, len(dataset)]) if names else str(dataset._fingerprint)


def _local_rows(n: int, env: DistEnv) -> list[int]:
    return list(range(env.rank, n, env.world_size))


@torch.no_grad()
def _compute(
    engine: Engine, dataset: Any, collate: Any, env: DistEnv, batch_size: int, chunk: int
) -> torch.Tensor:
    """Every rank scores its share of the rows; ranks run the same number of forwards (a
    forward is a collective under ZeRO-3), the short ones repeating a row they discard."""
    n = len(dataset)
    mine = _local_rows(n, env)
    batches = math.ceil(math.ceil(n / env.world_size) / batch_size)
    table = torch.zeros(n, REFERENCE_TABLE_COLUMNS, dtype=torch.float64)
    for b in range(batches):
        rows = mine[b * batch_size : (b + 1) * batch_size]
        real = len(rows)
        rows = rows or [0]
        columns = dataset[rows]  # one read of the rows, column by column
        batch = collate([{k: v[i] for k, v in columns.items()} for i in range(len(rows))])
        logps, _ = sequence_logps(engine, batch, chunk)
        chosen, rejected = logps.double().cpu().chunk(2)
        if real:
            table[rows, 0], table[rows, 1] = chosen, rejected
    if dist.is_initialized() and env.world_size > 1:
        on_device = table.to(engine.device)  # NCCL reduces device tensors only
        dist.all_reduce(on_device)  # each row written by exactly one rank, zero elsewhere
        table = on_device.cpu()
    return table


def _agree(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank only when it is true on all (each rank looks at the shared cache)."""
    if not (dist.is_initialized() and env.world_size > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _save(table: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(table, tmp)
    os.replace(tmp, path)  # readers see the whole table or none


def reference_tables(
    cfg: TrainConfig,
    engine: Engine,
    splits: dict[str, Any],
    collate: Any,
    env: DistEnv,
    cache: Path,
    precision: str,
) -> dict[str, torch.Tensor]:
    """The ``[rows, 2]`` (chosen, rejected) reference log-prob table of each split, read from
    ``cache/reference`` or computed now by ``engine``, which must still hold the initial
    weights (the trainer calls this before resuming from a checkpoint)."""
    tables: dict[str, torch.Tensor] = {}
    for split in (TRAIN, VALIDATION):
        dataset = splits[split]
        if len(dataset) == 0:
            tables[split] = torch.zeros(0, REFERENCE_TABLE_COLUMNS, dtype=torch.float64)
            continue
        path = cache / "reference" / f"{table_key(cfg, split_identity(dataset), precision)}.pt"
        if _agree(path.is_file(), env, engine.device):
            tables[split] = torch.load(path, weights_only=True)
            log.info("reference log-probs of the %s pairs read from %s", split, path)
            continue
        start = time.perf_counter()
        engine.train(False)  # the reference is the model without dropout
        table = _compute(
            engine,
            dataset,
            collate,
            env,
            reference_pairs(cfg),
            cfg.model.loss_chunk_tokens,
        )
        engine.train(True)
        if env.is_main:
            _save(table, path)
        tables[split] = table
        log.info(
            "reference pass: %d %s pairs scored by the initial model in %.1fs, saved to %s",
            len(dataset),
            split,
            time.perf_counter() - start,
            path,
        )
    return tables


def build_objective(
    cfg: TrainConfig, engine: Engine, data: Any, env: DistEnv, run_dir: Path, precision: str
) -> Objective:
    """The run's objective; for DPO and IPO the reference tables first (``data`` is the
    trainer's DataFeed: its tokenized splits and collate)."""
    name = ObjectiveName(cfg.objective.name)
    if name is ObjectiveName.sft:
        return Objective()
    if name is ObjectiveName.reward:
        return RewardObjective()
    reference = None
    if name in REFERENCE_OBJECTIVES:
        bundle = data.data
        splits = {TRAIN: bundle.train, VALIDATION: bundle.validation}
        cache = cache_root(cache_dir(cfg, run_dir), cfg.data.cache_scope)
        collate = padded_pair_collate(bundle.collate)  # the table does not depend on packing
        reference = reference_tables(cfg, engine, splits, collate, env, cache, precision)
    return PreferenceObjective(cfg, reference)
