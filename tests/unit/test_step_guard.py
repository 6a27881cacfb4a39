"""The step guard's decisions, step by step, on made-up loss sequences."""

from __future__ import annotations

import math

import pytest

from bigscale.config.schema import LossSpikeConfig, SpikePolicy
from bigscale.errors import DivergenceError
from bigscale.train.guard import StepGuard
from bigscale.train.state import TrainState


def _guard(policy: SpikePolicy = SpikePolicy.log, max_bad: int = 3) -> StepGuard:
    return StepGuard(max_bad, LossSpikeConfig(policy=policy, window=4, factor=2.0), TrainState())


def test_non_finite_steps_are_counted_and_a_good_step_resets_the_run_of_them() -> None:
    g = _guard()
    assert g.judge(1, math.inf, 1.0, applied=False).skipped
    assert g.judge(2, 1.0, math.nan, applied=False).skipped
    assert not g.judge(3, 1.0, 1.0, applied=True).skipped
    assert g.judge(4, math.nan, None, applied=False).skipped
    assert (g.state.skipped_steps, g.state.bad_steps_in_row) == (3, 1)


def test_max_bad_steps_in_a_row_stop_the_run() -> None:
    g = _guard(max_bad=3)
    g.judge(1, math.inf, None, applied=False)
    g.judge(2, math.inf, None, applied=False)
    with pytest.raises(DivergenceError, match="3 steps in a row") as err:
        g.judge(3, math.inf, None, applied=False)
    assert err.value.exit_code == 3


def test_a_step_the_optimizer_skipped_is_bad_even_with_a_finite_loss() -> None:
    # fp16 loss scaling: finite loss, overflowing gradients, DeepSpeed skipped the step.
    assert _guard().judge(1, 2.0, math.inf, applied=False).skipped


def test_spike_needs_a_full_window_and_stays_out_of_the_mean() -> None:
    g = _guard()
    assert not any(g.judge(s, 10.0, 1.0, applied=True).spike for s in range(1, 4))
    assert not g.judge(4, 1.0, 1.0, applied=True).spike  # window not full before this step
    assert g.state.recent_losses == [10.0, 10.0, 10.0, 1.0]
    assert g.judge(5, 16.0, 1.0, applied=True).spike  # mean 7.75, factor 2
    assert g.judge(6, 16.0, 1.0, applied=True).spike  # the first spike did not raise the mean
    assert not g.judge(7, 15.0, 1.0, applied=True).spike
    assert g.state.loss_spikes == 2


def test_spike_policy_stop_ends_the_run() -> None:
    g = _guard(SpikePolicy.stop)
    for s in range(1, 5):
        g.judge(s, 1.0, 1.0, applied=True)
    with pytest.raises(DivergenceError, match="loss_spike.policy=stop"):
        g.judge(5, 2.5, 1.0, applied=True)


def test_guard_state_survives_a_checkpoint_round_trip() -> None:
    g = _guard()
    for s, loss in enumerate([1.0, 2.0, math.inf], start=1):
        g.judge(s, loss, 1.0, applied=math.isfinite(loss))
    restored = TrainState()
    restored.load_state_dict(g.state.state_dict())
    assert restored.recent_losses == [1.0, 2.0]
    assert (restored.skipped_steps, restored.bad_steps_in_row) == (1, 1)
