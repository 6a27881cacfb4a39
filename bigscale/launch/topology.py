"""How many nodes and ranks a launch has, checked before anything starts.

One object answers the shape questions (nodes, ranks per node, world size) for every launcher, so
the plan, the sbatch script and the per-node command agree. Each impossible combination is one
``ConfigError`` naming the key and the fix.

The world size used to validate the batch arithmetic is the largest the launch can have: for an
elastic ``launcher.nnodes=MIN:MAX`` that is ``MAX`` nodes. The ranks check the batch again with the
world size they actually got, so a smaller elastic group is still validated before it trains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bigscale.config.schema import LauncherConfig, LauncherKind, TrainConfig
from bigscale.config.validate import Hardware, resolve_nproc
from bigscale.errors import ConfigError

_NNODES = re.compile(r"^(\d+)(?::(\d+))?$")
_ENDPOINT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d+)$")


@dataclass(frozen=True)
class Topology:
    kind: LauncherKind
    min_nodes: int
    max_nodes: int
    nproc_per_node: int

    @property
    def world_size(self) -> int:
        return self.max_nodes * self.nproc_per_node

    @property
    def elastic(self) -> bool:
        return self.min_nodes < self.max_nodes

    @property
    def multi_node(self) -> bool:
        return self.max_nodes > 1

    def describe(self) -> str:
        if self.kind is LauncherKind.local:
            how = "in-process" if self.world_size == 1 else "torchrun"
            return f"{self.world_size} ({how})"
        nodes = f"{self.min_nodes}-{self.max_nodes}" if self.elastic else str(self.max_nodes)
        text = (
            f"{self.world_size} = {nodes} node(s) x {self.nproc_per_node} per node "
            f"({self.kind.value}: torchrun on every node)"
        )
        if self.elastic:
            text += f"; elastic, sized for {self.max_nodes} nodes"
        return text


def resolve_topology(cfg: TrainConfig, hw: Hardware) -> Topology:
    """The launch's shape from ``cfg.launcher``; ``hw`` is the hardware of the nodes that run the
    ranks (see ``node_hardware``)."""
    lc = cfg.launcher
    kind = LauncherKind(lc.kind)
    if lc.max_restarts < 0:
        raise ConfigError(
            f"launcher.max_restarts={lc.max_restarts} must be 0 (no restarts) or positive"
        )
    if kind is LauncherKind.slurm:
        return _slurm(lc)
    nproc = resolve_nproc(lc.nproc_per_node, hw)
    if hw.cuda_devices and nproc > hw.cuda_devices:
        raise ConfigError(
            f"launcher.nproc_per_node={nproc} but this machine has {hw.cuda_devices} GPU(s), one "
            f"per rank; set launcher.nproc_per_node={hw.cuda_devices} (or auto)"
        )
    min_nodes, max_nodes = parse_nnodes(lc.nnodes)
    if kind is LauncherKind.local:
        if max_nodes != 1:
            raise ConfigError(
                f"launcher.nnodes={lc.nnodes} needs several machines: use launcher=multinode "
                "(torchrun on each node) or launcher=slurm"
            )
        return Topology(kind, 1, 1, nproc)
    _check_multinode(lc, max_nodes)
    return Topology(kind, min_nodes, max_nodes, nproc)


def node_hardware(cfg: TrainConfig, here: Hardware) -> Hardware:
    """The hardware the ranks will see. A Slurm job is planned on a login node, so its GPUs are
    the ones requested, assumed bf16-capable; each rank validates the real hardware again."""
    if LauncherKind(cfg.launcher.kind) is LauncherKind.slurm:
        gpus = cfg.launcher.gpus_per_node
        return Hardware(cuda_devices=gpus, bf16_supported=gpus > 0)
    return here


def parse_nnodes(value: str) -> tuple[int, int]:
    found = _NNODES.match(value.strip())
    if not found:
        raise ConfigError(
            f"launcher.nnodes={value!r} is not valid; use a node count like 2, or MIN:MAX like "
            "1:4 for an elastic job"
        )
    low = int(found[1])
    high = int(found[2]) if found[2] is not None else low
    if low < 1:
        raise ConfigError(f"launcher.nnodes={value} must be at least 1")
    if low > high:
        raise ConfigError(
            f"launcher.nnodes={value}: the minimum is above the maximum; write MIN:MAX, e.g. "
            f"{high}:{low}"
        )
    return low, high


def split_endpoint(value: str) -> tuple[str, int]:
    found = _ENDPOINT.match(value.strip())
    if not found or not 0 < int(found[2]) < 65536:
        raise ConfigError(
            f"launcher.rdzv_endpoint={value!r} is not HOST:PORT; give node 0's address and a free "
            "port, e.g. launcher.rdzv_endpoint=node001:29500"
        )
    return found[1], int(found[2])


def _check_multinode(lc: LauncherConfig, max_nodes: int) -> None:
    if not 0 <= lc.node_rank < max_nodes:
        raise ConfigError(
            f"launcher.node_rank={lc.node_rank} must be in 0..{max_nodes - 1} for "
            f"launcher.nnodes={lc.nnodes}; give every node its own index, 0 on the node at "
            "launcher.rdzv_endpoint"
        )
    if lc.rdzv_endpoint:
        split_endpoint(lc.rdzv_endpoint)
    elif max_nodes > 1:
        raise ConfigError(
            f"launcher.nnodes={lc.nnodes} needs launcher.rdzv_endpoint=HOST:PORT, node 0's "
            "address and a free port, the same on every node"
        )


def _slurm(lc: LauncherConfig) -> Topology:
    if lc.nodes < 1:
        raise ConfigError(f"launcher.nodes={lc.nodes} must be at least 1")
    if lc.gpus_per_node < 0:
        raise ConfigError(
            f"launcher.gpus_per_node={lc.gpus_per_node} must be 0 (CPU-only) or positive"
        )
    if lc.cpus_per_task is not None and lc.cpus_per_task < 1:
        raise ConfigError(
            f"launcher.cpus_per_task={lc.cpus_per_task} must be at least 1 (or null for "
            "Slurm's default)"
        )
    if lc.signal_seconds < 0:
        raise ConfigError(
            f"launcher.signal_seconds={lc.signal_seconds} must be 0 (no signal) or positive"
        )
    if lc.max_requeues < 0:
        raise ConfigError(f"launcher.max_requeues={lc.max_requeues} must be 0 or positive")
    if parse_nnodes(lc.nnodes) != (1, 1):
        raise ConfigError(
            f"launcher.nnodes={lc.nnodes} is for launcher=multinode; under Slurm set "
            f"launcher.nodes={lc.nnodes.split(':')[-1]}"
        )
    if lc.gpus_per_node > 0:
        if lc.nproc_per_node not in ("auto", str(lc.gpus_per_node)):
            raise ConfigError(
                f"launcher.nproc_per_node={lc.nproc_per_node} but launcher.gpus_per_node="
                f"{lc.gpus_per_node}: one rank per GPU; set launcher.nproc_per_node=auto"
            )
        return Topology(LauncherKind.slurm, lc.nodes, lc.nodes, lc.gpus_per_node)
    # A CPU-only job: the login node's hardware says nothing about the compute nodes.
    nproc = resolve_nproc(lc.nproc_per_node, Hardware())
    return Topology(LauncherKind.slurm, lc.nodes, lc.nodes, nproc)
