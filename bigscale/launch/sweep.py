"""Turn a command line into one plan, or, with ``-m``, one plan per point of a Hydra sweep.

Sweeps are expanded with Hydra's own override grammar and basic sweeper (comma lists,
``range(...)``, ``choice(...)``), then each job is composed and validated before the first one
starts, so a typo in the third job fails in seconds, not after two trainings."""

from __future__ import annotations

import re
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from bigscale.config.compose import compose_config
from bigscale.errors import ConfigError
from bigscale.launch.plan import Plan, make_plan, override
from bigscale.train.rundir import default_run_dir


def expand(overrides: list[str]) -> list[list[str]]:
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except HydraException as exc:
        raise ConfigError(f"invalid sweep: {exc}") from None
    return jobs


def plan_jobs(overrides: list[str], multirun: bool) -> list[Plan]:
    if not multirun:
        return [make_plan(compose_config(overrides), overrides)]
    jobs = expand(overrides)
    swept = {o.split("=", 1)[0] for o in overrides if "," in o or "(" in o}
    first = compose_config(jobs[0])
    base = Path(first.run_dir) if first.run_dir else default_run_dir(first)
    plans = []
    for i, job in enumerate(jobs):
        label = "_".join(o for o in job if o.split("=", 1)[0] in swept)
        name = f"{i}_{_safe(label)}" if label else str(i)
        extra = [override("run_dir", base.resolve() / name)]
        if not any(o.startswith("logger.group=") for o in job):
            extra.append(override("logger.group", _safe(base.name)))
        job = [o for o in job if not o.startswith("run_dir=")] + extra
        plans.append(make_plan(compose_config(job), job))
    return plans


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text)[:120]
