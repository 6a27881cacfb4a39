"""Early stopping: end training once a watched metric stops improving.

Every rank sees the same evaluation row (losses are all-reduced, generation metrics gathered or
broadcast from rank 0), and the decision is rank 0's, broadcast, so all ranks leave the loop
after the same step. The state rides in the checkpoint's metadata: a resumed run keeps its
patience count, and a run that stopped early does not train on when started again."""

from __future__ import annotations

import math
from typing import Any

from bigscale.config.schema import EarlyStoppingConfig, StopMode, TrainConfig
from bigscale.errors import ConfigError
from bigscale.logging import get_logger
from bigscale.train import harness_eval
from bigscale.train.metric_fn import load_metric_fn

log = get_logger(__name__)

LOWER_IS_BETTER = ("eval_loss", "eval_ppl")
GENERATION_METRICS = ("exact_match",)
PAIR_EVAL_METRICS = (
    "eval_rewards/chosen",
    "eval_rewards/rejected",
    "eval_rewards/accuracy",
    "eval_rewards/margin",
    "eval_logps/chosen",
    "eval_logps/rejected",
)
"""A preference objective's held-out metrics (``bigscale.train.objectives.PAIR_METRICS``)."""


def generation_enabled(cfg: TrainConfig) -> bool:
    """Whether the held-out generation eval runs (``eval.exact_match``, on by default with a
    ``data.test_path``)."""
    enabled = cfg.eval.exact_match
    return bool(cfg.data.test_path) if enabled is None else enabled


def check(cfg: TrainConfig) -> None:
    """Cross-field rules of ``eval.*``; raises ConfigError naming the keys and the fix."""
    e, every = cfg.eval, cfg.trainer.eval_every
    flags = {"eval.during_training": e.during_training, "eval.metric_fn": e.metric_fn}
    needs_generation = [key for key, on in flags.items() if on]
    if needs_generation and not generation_enabled(cfg):
        raise ConfigError(
            f"{needs_generation[0]} needs the generation eval: set data.test_path (a held-out "
            "file) and leave eval.exact_match unset or true"
        )
    load_metric_fn(e.metric_fn)  # importable here, or the launcher says so before any rank starts
    harness_eval.check(cfg)
    if e.during_training and every <= 0:
        raise ConfigError(
            "eval.during_training=true needs trainer.eval_every > 0 (how often to evaluate)"
        )
    s = e.early_stopping
    if s.metric is None:
        return
    if every <= 0:
        raise ConfigError(
            f"eval.early_stopping.metric={s.metric} needs trainer.eval_every > 0: it is judged "
            "at every evaluation"
        )
    if s.patience < 1:
        raise ConfigError(f"eval.early_stopping.patience={s.patience} must be at least 1")
    if s.min_delta < 0:
        raise ConfigError(f"eval.early_stopping.min_delta={s.min_delta:g} must be >= 0")
    if s.metric in LOWER_IS_BETTER or s.metric in PAIR_EVAL_METRICS:
        return
    if harness_eval.watches_harness(cfg):  # harness/<task>/<metric>, measured on rank 0
        return
    if not e.during_training:
        raise ConfigError(
            f"eval.early_stopping.metric={s.metric} is a generation metric; set "
            "eval.during_training=true so it is measured at every evaluation, or watch eval_loss"
        )
    if s.metric not in GENERATION_METRICS and not e.metric_fn:
        raise ConfigError(
            f"eval.early_stopping.metric={s.metric!r} is none of eval_loss, eval_ppl, "
            "exact_match; for a metric of your own set eval.metric_fn=package.module:function"
        )


class EarlyStopper:
    def __init__(self, cfg: EarlyStoppingConfig):
        self.cfg = cfg
        mode = StopMode(cfg.mode)
        if mode is StopMode.auto:
            mode = StopMode.min if cfg.metric in LOWER_IS_BETTER else StopMode.max
        self.sign = 1.0 if mode is StopMode.min else -1.0  # compare sign*value: lower is better
        self.best: float | None = None
        self.bad_evals = 0
        self.stopped_at: int | None = None
        self.reason = ""

    @property
    def enabled(self) -> bool:
        return self.cfg.metric is not None

    def update(self, step: int, row: dict[str, float]) -> bool:
        """Record one evaluation; True when training should stop after it. Collective when
        distributed: every rank takes rank 0's state."""
        if not self.enabled or self.stopped_at is not None:
            return self.stopped_at is not None
        self._judge(step, row)
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [self.state_dict()]
            dist.broadcast_object_list(box, src=0)
            self.load_state_dict(box[0])
        return self.stopped_at is not None

    def _judge(self, step: int, row: dict[str, float]) -> None:
        metric = self.cfg.metric
        if metric not in row:
            raise ConfigError(
                f"eval.early_stopping.metric={metric!r} is not among the evaluation's metrics "
                f"{sorted(k for k in row if k != 'step')}"
            )
        value = float(row[metric])
        score = self.sign * value if math.isfinite(value) else math.inf
        if self.best is None or score < self.sign * self.best - self.cfg.min_delta:
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals < self.cfg.patience:
            return
        self.stopped_at = step
        self.reason = (
            f"early stopping at step {step}: {metric} has not improved by more than "
            f"{self.cfg.min_delta:g} on its best ({self.best:.6g}) for {self.bad_evals} "
            f"evaluation(s) (patience {self.cfg.patience}); last value {value:.6g}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.cfg.metric,
            "best": self.best,
            "bad_evals": self.bad_evals,
            "stopped_at": self.stopped_at,
            "reason": self.reason,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state or state.get("metric") != self.cfg.metric:
            return  # watching another metric now (or none): start afresh
        self.best, self.bad_evals = state["best"], int(state["bad_evals"])
        self.stopped_at, self.reason = state["stopped_at"], state["reason"]

    def resume(self, state: dict[str, Any] | None) -> None:
        """The state saved in a checkpoint's metadata; says why a run that had stopped early
        trains no further."""
        self.load_state_dict(state)
        if self.stopped_at is not None:
            log.info("not training further: the run ended by %s", self.reason)
