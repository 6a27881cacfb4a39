"""Carry out a plan on this machine: one rank in-process, torchrun for several, or this node's
share of a multi-node run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from bigscale.checkpoint.select import complete_tags
from bigscale.checkpoint.storage import check_writable
from bigscale.config.compose import to_yaml
from bigscale.config.schema import LauncherKind
from bigscale.data.sources import preflight
from bigscale.dist.parent_death import pdeathsig_preexec
from bigscale.launch.plan import Plan
from bigscale.train import lease
from bigscale.train.assets import prepare_assets


def prepare(plan: Plan) -> None:
    """Everything that can fail cheaply, before any rank starts: a run directory that cannot
    be written, files the presets create, the data files' syntax and columns, and the run
    directory with its resolved config.

    A run directory that already holds checkpoints keeps its config.yaml: rank 0 rewrites it
    only once the ranks have accepted the resume (a refused one must not leave the new config
    describing the old checkpoints)."""
    check_writable(plan.run_dir)
    prepare_assets(plan.cfg)
    preflight(plan.cfg.data)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    if not complete_tags(plan.run_dir / "checkpoints"):
        (plan.run_dir / "config.yaml").write_text(to_yaml(plan.cfg))


@contextmanager
def own_run_dir(plan: Plan) -> Iterator[None]:
    """Hold the run directory's lease (``train/lease.py``) for as long as this launcher runs the
    plan, before anything is written into it; refuse if another live run holds it.

    A Slurm job takes the lease itself when it starts (its id is the owner), so submitting only
    checks. Of a multi-node run, node 0's launcher holds it; the other nodes' take no part."""
    # The lease is the first thing written into the run directory: a read-only one is named
    # here with the fix, not by the lease's own mkdir.
    check_writable(plan.run_dir)
    if plan.kind is LauncherKind.slurm:
        lease.check_free(plan.run_dir)
        yield
        return
    if plan.kind is LauncherKind.multinode and plan.cfg.launcher.node_rank != 0:
        os.environ[lease.ENV_TOKEN] = "held by node 0"
        yield
        return
    held = lease.acquire(plan.run_dir)
    if held.note:
        print(held.note, file=sys.stderr, flush=True)
    held.start_heartbeat()
    os.environ[lease.ENV_TOKEN] = held.holder.token  # the ranks: ownership is settled
    try:
        yield
    finally:
        os.environ.pop(lease.ENV_TOKEN, None)
        held.release()


def launch(plan: Plan, isolated: bool = False) -> int:
    """Returns the exit code of the run (the first failing rank's, under torchrun).

    ``isolated`` runs even a single rank as its own process, for the jobs of a sweep: DeepSpeed
    keeps process groups in module globals that outlive ``destroy_process_group``, so a second
    run in the same interpreter fails, and a first run's CUDA memory would stay held."""
    if plan.in_process and not isolated:
        from bigscale.train.run import main

        return main(plan.rank_overrides)
    command = plan.command()
    if plan.kind is LauncherKind.multinode:
        # launch/node.sh execs torchrun itself: its agent's rendezvous and restart messages are
        # what a user debugging several nodes needs to see.
        return _run(command)
    if plan.in_process:
        return _run(command)
    # The plan's torchrun command, run through torchrun's own code by a wrapper that ends a failed
    # run with the failing rank's exit code instead of torchrun's traceback (see its docstring).
    assert command[1:3] == ["-m", "torch.distributed.run"], command
    wrapped = [command[0], "-m", "bigscale.launch.torchrun", *command[3:]]
    return _run(wrapped)


def _run(command: list[str]) -> int:
    # Killed by any signal, this launcher takes torchrun's agent (or the lone rank) with it; the
    # ranks in turn die with the agent (see dist/parent_death.py).
    return subprocess.run(command, check=False, preexec_fn=pdeathsig_preexec()).returncode
