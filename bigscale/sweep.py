"""``python -m bigscale.sweep``: bigscale under ``@hydra.main``, for Hydra's sweeper plugins.

``bigscale train -m`` expands grids itself (Hydra's basic sweeper) and needs nothing else. A
*search*, where each trial is chosen from the results so far, needs a sweeper plugin that calls
a task function and reads back a number; this module is that function. Each trial runs one
bigscale training through the normal launcher (``bigscale train``, in a child process: pre-flight,
plan, torchrun or one rank), in Hydra's job directory as its run directory, and returns the
``sweep.objective`` key of the run's final metrics::

    pip install 'bigscale[sweep]'   # hydra-optuna-sweeper
    python -m bigscale.sweep -m hydra/sweeper=optuna hydra.sweeper.n_trials=20 \\
        hydra.sweep.dir=outputs/lr_search 'optim.lr=tag(log, interval(1e-5, 1e-3))'

Trials share one W&B group (the sweep directory's name) unless ``logger.group`` is given.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bigscale.config.compose import SCHEMA_NAME, config_dir
from bigscale.config.schema import TrainConfig

ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
# The Optuna sweeper's dependencies log every plugin they register at INFO under Hydra's config.
logging.getLogger("alembic").setLevel(logging.WARNING)


class TrialFailed(RuntimeError):
    """A trial's training failed or lacks the objective; the sweeper records the trial as failed
    (and stops the study unless ``hydra.sweeper.max_failure_rate`` allows it)."""


def final_metric(run_dir: Path, objective: str) -> float:
    """``final/<objective>`` from the run's last summary row in ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    finals = [r for r in rows if any(k.startswith("final/") for k in r)]
    if not finals:
        raise TrialFailed(f"{path} has no final metrics row: the run did not finish")
    key = f"final/{objective}"
    if finals[-1].get(key) is None:
        found = sorted(k.removeprefix("final/") for k in finals[-1] if k.startswith("final/"))
        raise TrialFailed(f"sweep.objective={objective!r} is not a final metric; found {found}")
    return float(finals[-1][key])


def trial_overrides(task: list[str], run_dir: Path, group: str) -> list[str]:
    """The trial's overrides for ``bigscale train``: Hydra's job directory is the run dir."""
    out = [o for o in task if not o.startswith(("run_dir=", "+run_dir="))]
    out.append(f"run_dir={run_dir}")
    if not any(o.startswith("logger.group=") for o in task):
        out.append(f"logger.group={group}")
    return out


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir).resolve()
    group = Path(hc.sweep.dir).name if hc.mode is not None and hc.mode.name == "MULTIRUN" else ""
    overrides = trial_overrides(list(hc.overrides.task), run_dir, group or run_dir.name)
    proc = subprocess.run([sys.executable, "-m", "bigscale.cli", "train", *overrides], check=False)
    if proc.returncode != 0:
        raise TrialFailed(
            f"trial {hc.job.num} failed with exit code {proc.returncode}; see {run_dir}/train.log"
        )
    value = final_metric(run_dir, cfg.sweep.objective)
    logging.getLogger(__name__).info("trial %s: %s = %g", hc.job.num, cfg.sweep.objective, value)
    return value


if __name__ == "__main__":
    main()
