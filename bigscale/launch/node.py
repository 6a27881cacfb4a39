"""The per-node entry ``launch/node.sh`` seen from Python: where it is and what it is told.

node.sh derives the rendezvous from Slurm's variables when srun runs it; outside Slurm
(``launcher=multinode``) it reads the ``BIGSCALE_*`` variables built here. Keeping one script for
both paths means the command that ``bigscale plan`` prints is the one a user can run by hand.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from bigscale.config.schema import LauncherConfig
from bigscale.errors import ConfigError

# A source checkout keeps launch/ and slurm/ beside the package, like conf/.
REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_file(relative: str) -> Path:
    path = REPO_ROOT / relative
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: the cluster launchers need bigscale's source checkout (its "
            f"{relative}); install with `pip install -e .` from a clone"
        )
    return path


def node_script() -> Path:
    return repo_file("launch/node.sh")


def rdzv_id(lc: LauncherConfig, run_dir: Path) -> str:
    """Every node must present the same id; the run directory is already the same on every node
    (``launcher=multinode`` requires it explicitly), so it names the rendezvous too."""
    if lc.rdzv_id:
        return lc.rdzv_id
    return "bigscale-" + hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]


def common_env(lc: LauncherConfig, nproc_per_node: int) -> dict[str, str]:
    """What node.sh needs on every node, Slurm or not."""
    return {
        "BIGSCALE_NPROC_PER_NODE": str(nproc_per_node),
        "BIGSCALE_MAX_RESTARTS": str(lc.max_restarts),
    }


def multinode_env(lc: LauncherConfig, nproc_per_node: int, run_dir: Path) -> dict[str, str]:
    """node.sh's settings for this node of a ``launcher=multinode`` run."""
    env = {"BIGSCALE_NNODES": lc.nnodes, "BIGSCALE_NODE_RANK": str(lc.node_rank)}
    if lc.rdzv_endpoint:
        env["BIGSCALE_RDZV_ENDPOINT"] = lc.rdzv_endpoint
    env["BIGSCALE_RDZV_ID"] = rdzv_id(lc, run_dir)
    return {**env, **common_env(lc, nproc_per_node), "BIGSCALE_PYTHON": sys.executable}


def multinode_command(
    lc: LauncherConfig, nproc_per_node: int, run_dir: Path, overrides: list[str]
) -> list[str]:
    """``env BIGSCALE_...=... bash launch/node.sh OVERRIDES``: runnable as printed."""
    env = multinode_env(lc, nproc_per_node, run_dir)
    return ["env", *(f"{k}={v}" for k, v in env.items()), "bash", str(node_script()), *overrides]
