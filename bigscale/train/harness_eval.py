"""``eval.harness.tasks``: lm-evaluation-harness tasks at every ``trainer.eval_every``.

Rank 0 alone runs them, on the live model (the LoRA adapter applied, nothing exported), through
the same task loading and score naming as ``bigscale eval`` (``bigscale.commands.evaluate``);
the other ranks wait for its scores, so every rank's evaluation row, and so early stopping's
judgement, is the same. Rank 0 alone is the simplest split, and is why layouts where rank 0 holds
only part of the weights (ZeRO-3, tensor or sequence parallelism) are refused at validation.

Importing this module imports neither torch nor lm_eval: validation runs in the launcher."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bigscale.config.schema import TrainConfig
from bigscale.errors import ConfigError
from bigscale.logging import get_logger

log = get_logger(__name__)

PREFIX = "harness"
"""Scores of lm-eval tasks are named ``harness/<task>/<metric>`` (here and by ``bigscale eval``)."""


def check(cfg: TrainConfig) -> None:
    """Validation of ``eval.harness.*``; raises ConfigError naming the keys and the fix."""
    h, s = cfg.eval.harness, cfg.strategy
    watched = cfg.eval.early_stopping.metric or ""
    if not h.tasks:
        if watched.startswith(f"{PREFIX}/"):
            raise ConfigError(
                f"eval.early_stopping.metric={watched} is a harness score; set "
                f"eval.harness.tasks=[{watched.split('/')[1]}] so it is measured at every "
                "evaluation"
            )
        return
    if cfg.trainer.eval_every <= 0:
        raise ConfigError(
            "eval.harness.tasks needs trainer.eval_every > 0 (how often to run them); after "
            "training use `bigscale eval RUN_DIR --tasks ...` instead"
        )
    if s.zero_stage == 3 or s.tensor_parallel_size > 1 or s.sequence_parallel_size > 1:
        raise ConfigError(
            "eval.harness.tasks runs the tasks on rank 0 alone, which under strategy.zero_stage"
            f"={s.zero_stage}, strategy.tensor_parallel_size={s.tensor_parallel_size}, "
            f"strategy.sequence_parallel_size={s.sequence_parallel_size} holds only part of the "
            "model: use strategy=zero2 (or ddp) with no tensor or sequence parallelism, or run "
            "the tasks on the checkpoints afterwards with `bigscale eval RUN_DIR --tasks ...`"
        )
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            "eval.harness.tasks needs EleutherAI's lm-evaluation-harness: "
            "pip install 'bigscale[eval]'"
        )
    for folder in h.include_path:
        if not Path(folder).is_dir():
            raise ConfigError(f"eval.harness.include_path: {folder} is not a folder of task YAMLs")
    if h.batch_size < 1:
        raise ConfigError(f"eval.harness.batch_size={h.batch_size} must be at least 1")
    if h.limit is not None and h.limit < 1:
        raise ConfigError(f"eval.harness.limit={h.limit} must be at least 1 (or null: all)")


def watches_harness(cfg: TrainConfig) -> bool:
    """Whether early stopping watches a harness score of one of ``eval.harness.tasks`` (which
    ``bigscale.train.early_stop.check`` then accepts); refuses one of another task."""
    metric = cfg.eval.early_stopping.metric or ""
    if not metric.startswith(f"{PREFIX}/"):
        return False
    parts = metric.split("/")
    if len(parts) < 3 or parts[1] not in cfg.eval.harness.tasks:
        raise ConfigError(
            f"eval.early_stopping.metric={metric}: a harness score is named "
            f"{PREFIX}/<task>/<metric> with <task> one of eval.harness.tasks="
            f"{list(cfg.eval.harness.tasks)} (as logged in metrics.jsonl, e.g. "
            f"{PREFIX}/<task>/acc)"
        )
    return True


class HarnessEval:
    def __init__(self, cfg: TrainConfig, run_dir: Path, is_main: bool):
        self.cfg = cfg.eval.harness
        self.out_dir = run_dir / "eval"
        self.is_main = is_main
        self.manager: Any = None
        if self.cfg.tasks and is_main:  # an unknown task fails here, before any step
            from bigscale.commands.evaluate import task_manager

            self.manager = task_manager(list(self.cfg.include_path), list(self.cfg.tasks))

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.tasks)

    def run(self, model: Any, tokenizer: Any, step: int) -> dict[str, float]:
        """The scores (``harness/<task>/<metric>``) on every rank; collective when
        distributed."""
        if not self.enabled:
            return {}
        import torch.distributed as dist

        box: list[dict[str, float] | None] = [None]
        if self.is_main:
            box[0] = self._evaluate(model, tokenizer, step)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0] or {}

    def _evaluate(self, model: Any, tokenizer: Any, step: int) -> dict[str, float]:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        from bigscale.commands.evaluate import flat_scores, write_results

        was_training = model.training
        model.eval()
        try:
            with _random_state_kept():
                # A copy: lm-eval may set a pad token or padding side on the tokenizer it gets.
                lm = HFLM(
                    pretrained=model,
                    tokenizer=copy.deepcopy(tokenizer),
                    batch_size=self.cfg.batch_size,
                )
                results = simple_evaluate(
                    model=lm,
                    tasks=list(self.cfg.tasks),
                    num_fewshot=self.cfg.num_fewshot,
                    limit=self.cfg.limit,
                    task_manager=self.manager,
                    log_samples=False,
                )
        finally:
            model.train(was_training)
        if results is None:
            raise ConfigError("eval.harness.tasks: lm-eval returned no results")
        write_results(self.out_dir, results, step, "training")
        scores = flat_scores(results["results"])
        log.info("harness at step %d: %s", step, {k: round(v, 4) for k, v in scores.items()})
        return scores


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """lm-eval seeds Python's, numpy's and torch's generators; training's dropout masks and
    data order must go on as if it had not run (an exact resume depends on it)."""
    import numpy as np
    import torch

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
