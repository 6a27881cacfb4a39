"""Checks that run before any rank starts or any job is queued, for ``plan`` and ``train`` alike.

The shape of the launch (nodes, ranks, GPUs) is checked when the plan is made
(``bigscale.launch.topology``) and the model path by ``bigscale.config.validate``; this module adds
what needs the launcher's surroundings: an ``sbatch`` to submit with, the run directory's
filesystem, and (for ``plan``, which prepares nothing) the data files that ``train`` checks while
preparing the run.
"""

from __future__ import annotations

import re
from pathlib import Path

from bigscale.config.schema import LauncherKind, TrainConfig
from bigscale.data.sources import preflight as check_data_files
from bigscale.launch.plan import Plan
from bigscale.launch.slurm import require_sbatch, sbatch_option
from bigscale.metrics.mlflow_sink import check_reachable as check_mlflow_server

# Filesystems that live on one machine: a run directory there is invisible to the other nodes.
# Network filesystems (nfs, lustre, gpfs, beegfs, cephfs, fuse mounts, ...) are not listed.
NODE_LOCAL_FILESYSTEMS = frozenset(
    {"tmpfs", "ramfs", "devtmpfs", "overlay", "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs"}
)
NODE_LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run")


def check(plan: Plan, submitting: bool) -> list[str]:
    """Raise on what cannot work; return warnings about what may not."""
    if plan.kind is LauncherKind.slurm:
        for line in plan.cfg.launcher.sbatch_extra:
            sbatch_option(line)
        if submitting:
            require_sbatch()
    if submitting:  # one quick request; `plan` may be run where the server is not reachable
        check_mlflow_server(plan.cfg.logger)
    warnings = []
    topo = plan.topology
    if topo.elastic:
        low, high = topo.min_nodes * topo.nproc_per_node, topo.world_size
        warnings.append(
            f"launcher.nnodes={plan.cfg.launcher.nnodes} is elastic: the global batch is "
            f"{plan.global_batch} sequences on {high} ranks but smaller on fewer nodes (down to "
            f"{low} ranks), and resuming a checkpoint with another global batch is refused "
            "unless checkpoint.allow_config_change=true"
        )
    if topo.multi_node:
        warning = shared_filesystem_warning(plan.run_dir, topo.max_nodes)
        if warning:
            warnings.append(warning)
    return warnings


def check_data(cfg: TrainConfig) -> None:
    """The data files ``train`` would check; generated ones may not exist yet, and are skipped."""
    if cfg.data.generate is None:
        check_data_files(cfg.data)


def shared_filesystem_warning(run_dir: Path, nodes: int) -> str | None:
    mount, fstype = filesystem_of(run_dir)
    local_dir = next((d for d in NODE_LOCAL_DIRS if _within(run_dir, Path(d))), None)
    if fstype not in NODE_LOCAL_FILESYSTEMS and local_dir is None:
        return None
    where = ", ".join(
        ([f"under {local_dir}"] if local_dir else [])
        + ([f"on {fstype} ({mount})"] if fstype in NODE_LOCAL_FILESYSTEMS else [])
    )
    return (
        f"run directory {run_dir} is {where}, usually local to one machine, but the {nodes} "
        "nodes all write checkpoints and read the W&B run id there: put run_dir on a "
        "filesystem every node mounts (NFS, Lustre, GPFS, ...)"
    )


def filesystem_of(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) holding ``path``, which need not exist yet; ("", "")
    where ``/proc/mounts`` is unreadable."""
    existing = path.resolve()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "", ""
    best = ("", "")
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = _unescape(fields[1])
        if _within(existing, Path(mount)) and len(mount) >= len(best[0]):
            best = (mount, fields[2])  # the last, longest match is the one in effect
    return best


def _within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _unescape(field: str) -> str:
    """/proc/mounts writes a space in a mount point as \\040 (octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)
