"""One rank's life: compose and validate the config, join the group, train, clean up.

This is what ``python -m bigscale.train`` runs (under torchrun, srun, or a user's own torchrun)
and what the local launcher calls in-process for a single rank."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from bigscale.checkpoint.precheck import checkpoint_root, start_precheck
from bigscale.checkpoint.storage import check_writable
from bigscale.config.compose import compose_config, to_yaml
from bigscale.config.redact import redact_text
from bigscale.config.schema import TrainConfig
from bigscale.config.validate import Hardware, validate
from bigscale.dist.env import DistEnv
from bigscale.errors import BigscaleError
from bigscale.logging import get_logger, log_to_file_only, setup_logging
from bigscale.quiet import quiet_third_party
from bigscale.train import lease
from bigscale.train.assets import prepare_assets
from bigscale.train.rundir import default_run_dir

log = get_logger(__name__)

ERROR_GRACE_S = 5.0
"""How long a rank other than 0 stays after a user error, for rank 0 to print it."""


def run_rank(overrides: list[str]) -> dict[str, float]:
    env = DistEnv.from_environ()
    cfg = compose_config(overrides)
    validate(cfg, env.world_size, Hardware.detect())
    quiet_third_party()

    from bigscale.dist.engine import init_distributed
    from bigscale.dist.watchdog import backstop_minutes

    init_distributed(env, timeout_minutes=backstop_minutes(cfg.dist.timeout_minutes))
    held: lease.Lease | None = None
    try:
        run_dir = _agree_on_run_dir(cfg, env)
        held = _claim_run_dir(run_dir, env)  # before anything is written into it
        setup_logging(env.rank, run_dir)
        config_text = to_yaml(cfg)  # as composed, before the trainer derives anything
        if held is not None and held.note:
            log.info("%s", held.note)
        # Hashing the likely resume point's files overlaps the imports and model loading below.
        precheck = start_precheck(
            checkpoint_root(run_dir), cfg.resume, cfg.checkpoint.verify, (env.rank, env.world_size)
        )
        if env.is_main:
            prepare_assets(cfg)
        _barrier()
        # Imported late: the trainer pulls in transformers/deepspeed, which the config checks
        # above do not need.
        from bigscale.train.trainer import Trainer

        trainer = Trainer(cfg, env, run_dir, precheck=precheck)
        # Only once the resume decision passed: a refused resume leaves config.yaml describing
        # the checkpoints beside it.
        if env.is_main:
            (run_dir / "config.yaml").write_text(config_text)
        summary = trainer.fit()
        if held is not None and held.holder.job and "stopped_at_step" in summary:
            held.keep()  # stopped to be requeued: the job keeps its run directory
        return summary
    finally:
        if held is not None:
            held.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def _claim_run_dir(run_dir: Path, env: DistEnv) -> lease.Lease | None:
    """Under a Slurm job or a user's own torchrun, rank 0 takes the run directory's lease (no
    ``bigscale train`` launcher holds it for them) and every rank learns whether it may go on."""
    if os.environ.get(lease.ENV_TOKEN):
        return None  # the launcher that started these ranks holds it
    held, refusal = None, [None]
    if env.is_main:
        try:
            held = lease.acquire(run_dir, job=os.environ.get("SLURM_JOB_ID"))
            held.start_heartbeat()
        except lease.RunDirBusyError as exc:
            refusal[0] = str(exc)
    if env.world_size > 1:
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise lease.RunDirBusyError(refusal[0])
    return held


def _agree_on_run_dir(cfg: TrainConfig, env: DistEnv) -> Path:
    """The launcher normally fixes ``run_dir``; under a user's own torchrun rank 0 picks it and
    tells the others, so no rank invents its own timestamped directory."""
    chosen = [str(Path(cfg.run_dir).resolve()) if cfg.run_dir else None]
    if chosen[0] is None and env.is_main:
        chosen[0] = str(default_run_dir(cfg).resolve())
    if env.world_size > 1:
        dist.broadcast_object_list(chosen, src=0)
    run_dir = Path(chosen[0])
    check_writable(run_dir)  # also under a user's own torchrun, where no launcher checked
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run_dir)
    return run_dir


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # started by torchrun's agent: die with it
        from bigscale.dist.parent_death import die_with_parent

        die_with_parent(f"rank {os.environ.get('RANK', '?')}")
    try:
        run_rank(overrides)
    except BigscaleError as exc:
        env = DistEnv.from_environ()
        if env.is_main:
            print(f"error: {redact_text(str(exc))}", file=sys.stderr)
            log_to_file_only(f"error: {exc}")
        elif env.world_size > 1:
            # The checks are the same on every rank, so rank 0 is saying this too; torchrun's
            # agent stops the other ranks as soon as one exits, so leaving first could cut
            # rank 0 off before its one line is printed.
            time.sleep(ERROR_GRACE_S)
        return exc.exit_code
    return 0
