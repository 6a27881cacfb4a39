"""What a step's numbers say about the run's health: a step with a non-finite loss or gradient
norm is skipped (the optimizer leaves the weights alone) and counted, too many in a row stop the
run, and a loss far above its recent mean is a spike that is logged or stops the run.

The guard only decides; the counters it keeps live in ``TrainState`` so a resumed run judges
its steps exactly as the uninterrupted run would have."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bigscale.config.schema import LossSpikeConfig, SpikePolicy
from bigscale.errors import DivergenceError
from bigscale.logging import get_logger
from bigscale.train.state import TrainState

log = get_logger(__name__)


@dataclass(frozen=True)
class Verdict:
    skipped: bool
    spike: bool


class StepGuard:
    def __init__(self, max_bad_steps: int, spike: LossSpikeConfig, state: TrainState):
        self.max_bad_steps, self.spike, self.state = max_bad_steps, spike, state

    def judge(self, step: int, loss: float, grad_norm: float | None, applied: bool) -> Verdict:
        """Called once per optimizer step with the loss averaged over ranks and micro batches.
        ``applied`` is whether the optimizer changed the weights; raises DivergenceError when
        the run must stop."""
        s = self.state
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if not finite or not applied:
            s.skipped_steps += 1
            s.bad_steps_in_row += 1
            log.warning(
                "step %d: loss %s, grad norm %s: not finite, optimizer step %s (%d in a row, "
                "trainer.max_bad_steps=%d)",
                step,
                loss,
                grad_norm,
                "skipped" if not applied else "applied by the optimizer (finite gradients)",
                s.bad_steps_in_row,
                self.max_bad_steps,
            )
            if s.bad_steps_in_row >= self.max_bad_steps:
                raise DivergenceError(
                    f"{s.bad_steps_in_row} steps in a row had a non-finite loss or gradient norm "
                    f"(up to step {step}); stopping. The weights were not updated by those steps "
                    "and the last checkpoint is intact: lower optim.lr, check the data around "
                    "this step, or raise trainer.max_bad_steps"
                )
            return Verdict(skipped=True, spike=False)
        s.bad_steps_in_row = 0
        spike = self._is_spike(loss)
        if not spike:  # a spike stays out of the mean, so the next one is still caught
            s.recent_losses = [*s.recent_losses, loss][-self.spike.window :]
        if spike:
            s.loss_spikes += 1
            message = (
                f"step {step}: loss {loss:.4g} is above {self.spike.factor:g}x the mean of the "
                f"last {self.spike.window} steps"
            )
            if self.spike.policy == SpikePolicy.stop:
                raise DivergenceError(
                    f"{message} (trainer.loss_spike.policy=stop); the last checkpoint is "
                    "intact: resume from it with a lower optim.lr, or set "
                    "trainer.loss_spike.policy=log to only report spikes"
                )
            log.warning("%s (spike %d of this run)", message, s.loss_spikes)
        return Verdict(skipped=False, spike=spike)

    def _is_spike(self, loss: float) -> bool:
        recent = self.state.recent_losses
        if len(recent) < self.spike.window:
            return False
        return loss > self.spike.factor * (sum(recent) / len(recent))
