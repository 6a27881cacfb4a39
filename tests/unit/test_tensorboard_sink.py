"""``logger.tensorboard=true``: the scalars in event files TensorBoard's own reader reads back,
and a resumed run's events replacing what a killed attempt wrote after its checkpoint."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bigscale.config.schema import LoggerConfig, LoggerMode
from bigscale.metrics.sinks import TENSORBOARD_DIR, MetricsLogger


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    events.Reload()
    return [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]


def test_scalars_reach_tensorboard_and_a_resume_purges_later_steps(tmp_path: Path) -> None:
    cfg = LoggerConfig(mode=LoggerMode.disabled, tensorboard=True)
    first = MetricsLogger(tmp_path, cfg, {}, is_main=True)
    for step in (1, 2, 3, 4):
        first.log({"step": step, "loss": 10.0 - step, "lr": 0.5, "note": "not a number"})
    first.close()
    assert scalars(tmp_path, "loss") == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]

    # Killed after step 4, resumed from the checkpoint of step 2: steps 3 and 4 are redone.
    resumed = MetricsLogger(tmp_path, cfg, {}, is_main=True, resumed_at=2)
    resumed.log({"step": 3, "loss": 1.5})
    resumed.close()
    assert scalars(tmp_path, "loss") == [(1, 9.0), (2, 8.0), (3, 1.5)]
    assert scalars(tmp_path, "lr") == [(1, 0.5), (2, 0.5)]
