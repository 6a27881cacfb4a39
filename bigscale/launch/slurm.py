"""``launcher=slurm``: render ``slurm/train.sbatch`` for a plan and submit it with ``sbatch``.

The rendered script goes to ``RUN_DIR/train.sbatch`` with a copy of ``launch/node.sh`` beside it,
and the script runs that copy. A job may wait in the queue and be requeued for days; pinning the
node script to the run keeps every attempt on the script it was submitted with, even when the
checkout moves on, and leaves the run directory self-describing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from string import Template

from bigscale.config.redact import redact_text
from bigscale.errors import ConfigError, LaunchError
from bigscale.launch.node import common_env, node_script, repo_file
from bigscale.launch.plan import Plan

TEMPLATE = "slurm/train.sbatch"
SECRET_ENV = "BIGSCALE_SECRET_"
_MISSING = "a setting holding a secret; submit with bigscale train, which sets it"
_NEEDS_QUOTES = re.compile(r"[\s\"'#]")
_SPECIAL_IN_DOUBLE_QUOTES = re.compile(r"[\"$`\\!]")


def script_path(plan: Plan) -> Path:
    return plan.run_dir / "train.sbatch"


def log_path(plan: Plan, job_id: str = "%j") -> Path:
    return plan.run_dir / f"slurm-{job_id}.out"


def render_script(plan: Plan) -> str:
    lc = plan.cfg.launcher
    topo = plan.topology
    env = common_env(lc, topo.nproc_per_node)
    srun_options = ""
    if lc.cpus_per_task:
        # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch; without it each
        # node's torchrun and all its ranks would share one CPU.
        srun_options = f" --cpus-per-task={lc.cpus_per_task}"
    values = {
        "job_name": _sbatch_value(redact_text(lc.job_name or f"bigscale-{plan.cfg.experiment}")),
        "nodes": str(topo.max_nodes),
        "resources": "\n".join(_resource_lines(plan)),
        "signal": (
            f"#SBATCH --signal=USR1@{lc.signal_seconds}"
            if lc.signal_seconds > 0
            else "# (no --signal: launcher.signal_seconds=0)"
        ),
        "workdir": _sbatch_value(os.getcwd()),
        # '%' starts a filename pattern in --output ('%j': the job id); '%%' is a literal one.
        "log": _sbatch_value(str(plan.run_dir).replace("%", "%%") + "/slurm-%j.out"),
        "nproc_per_node": shell_quote(env["BIGSCALE_NPROC_PER_NODE"]),
        "max_restarts": shell_quote(env["BIGSCALE_MAX_RESTARTS"]),
        "python": shell_quote(sys.executable),
        "setup": _setup(plan),
        "srun_options": srun_options,
        "node_sh": shell_quote(str(plan.run_dir / "node.sh")),
        "secrets": _secrets_note(plan),
        "overrides": " \\\n".join(f"    {word}" for word in _override_words(plan)),
    }
    return Template(repo_file(TEMPLATE).read_text()).substitute(values)


def _named(plan: Plan) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Each override and ``launcher.setup`` line with the variable that would carry it."""
    overrides = [(f"{SECRET_ENV}OVERRIDE_{i}", o) for i, o in enumerate(plan.rank_overrides)]
    setup = [(f"{SECRET_ENV}SETUP_{i}", line) for i, line in enumerate(plan.cfg.launcher.setup)]
    return overrides, setup


def _holds_secret(text: str) -> bool:
    return redact_text(text) != text


def job_secrets(plan: Plan) -> dict[str, str]:
    """The overrides and ``launcher.setup`` lines that carry a secret, by the environment
    variable that brings each to the job.

    The script is kept in the run directory and printed by ``bigscale plan``, so it must not hold
    them; sbatch copies the submitting environment into the job (``--export=ALL``, its default)
    and keeps it for every requeue, so the job reads them from there."""
    overrides, setup = _named(plan)
    return {name: text for name, text in overrides + setup if _holds_secret(text)}


def _from_env(name: str) -> str:
    # ':?' stops the job with this message when the script is submitted by hand without it.
    return f'"${{{name}:?{_MISSING}}}"'


def _override_words(plan: Plan) -> list[str]:
    overrides, _ = _named(plan)
    return [_from_env(n) if _holds_secret(o) else shell_quote(o) for n, o in overrides]


def _setup(plan: Plan) -> str:
    _, setup = _named(plan)
    # A setup line is shell code: run from the variable with eval, as if written here.
    lines = [f"eval {_from_env(n)}" if _holds_secret(line) else line for n, line in setup]
    return "\n".join(lines) if lines else "# (none)"


def _secrets_note(plan: Plan) -> str:
    lines = [
        f"# ${name}: {redact_text(text)}  (set by `bigscale train` when it submits)"
        for name, text in job_secrets(plan).items()
    ]
    return "\n".join(lines) if lines else "# (none)"


def shell_quote(word: str) -> str:
    """``shlex.quote``, but a Hydra override holding single quotes (``logger.name='my run'``) is
    wrapped in double quotes instead of the unreadable ``'"'"'`` splicing, when that is safe."""
    quoted = shlex.quote(word)
    if "'" in word and quoted != word and not _SPECIAL_IN_DOUBLE_QUOTES.search(word):
        return f'"{word}"'
    return quoted


def _resource_lines(plan: Plan) -> list[str]:
    lc = plan.cfg.launcher
    lines = []
    if lc.gpus_per_node > 0:
        lines.append(f"#SBATCH --gpus-per-node={lc.gpus_per_node}")
    if lc.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={lc.cpus_per_task}")
    for key in ("partition", "account", "qos", "time", "constraint"):
        value = getattr(lc, key)
        if value:
            lines.append(f"#SBATCH --{key}={_sbatch_value(str(value))}")
    lines += [f"#SBATCH {sbatch_option(line)}" for line in lc.sbatch_extra]
    return lines


def sbatch_option(line: str) -> str:
    """One ``launcher.sbatch_extra`` entry as an sbatch option; a leading ``#SBATCH`` is allowed."""
    option = line.strip().removeprefix("#SBATCH").strip()
    if not option.startswith("-") or "\n" in option:
        raise ConfigError(
            f"launcher.sbatch_extra entry {line!r} is not an sbatch option; write one option per "
            "entry, like 'launcher.sbatch_extra=[--exclusive,\"--mem=0\"]'"
        )
    return option


def _sbatch_value(value: str) -> str:
    """sbatch splits ``#SBATCH`` lines on whitespace but honours double quotes."""
    if not _NEEDS_QUOTES.search(value):
        return value
    if '"' in value or "\n" in value:
        raise ConfigError(f"{value!r} cannot be written on an #SBATCH line (a quote or newline)")
    return f'"{value}"'


def require_sbatch() -> str:
    found = shutil.which("sbatch")
    if found is None:
        raise LaunchError(
            "sbatch not found on PATH: launcher=slurm submits the job with Slurm's sbatch; run "
            "this on a Slurm login node (or load Slurm's module), or use launcher=local"
        )
    return found


def write_job(plan: Plan) -> Path:
    """RUN_DIR/train.sbatch and the node.sh it runs."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(node_script(), plan.run_dir / "node.sh")
    script = script_path(plan)
    script.write_text(render_script(plan))
    return script


def submit(plan: Plan) -> int:
    """Submit without waiting: print the job id and where its output goes."""
    sbatch = require_sbatch()
    script = write_job(plan)
    proc = subprocess.run(
        [sbatch, "--parsable", str(script)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **job_secrets(plan)},
    )
    if proc.returncode != 0:
        reason = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
        raise LaunchError(f"sbatch refused {script}: {reason.splitlines()[-1]}")
    job_id = proc.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
    log = log_path(plan, job_id)
    print(
        f"submitted Slurm job {job_id}\n"
        f"log             {log}\n"
        f"follow          tail -f {shlex.quote(str(log))}\n"
        f"status          squeue -j {job_id}   (cancel: scancel {job_id})",
        flush=True,
    )
    return 0
