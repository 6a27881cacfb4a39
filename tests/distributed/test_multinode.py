"""Two nodes on one machine: two ``bigscale train launcher=multinode`` processes (node ranks 0 and
1, 2 ranks each) meet over a loopback c10d rendezvous through launch/node.sh and torchrun, and
train the tiny model with ZeRO-2 and ZeRO-3. Every logged loss equals a 4-rank single-node run's
bitwise: the world size, the global ranks and so the data shards and gloo's reduction order are
the same; only the process that hosts each rank differs. A node that trained with its local ranks
as global ranks, or a second node that never joined, changes the losses."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.cli import QUICK, bigscale, env_for, explain, train_rows

pytestmark = pytest.mark.distributed

# ZeRO-3 only: it partitions parameters as well as optimizer state and gradients across the
# nodes, so it covers what ZeRO-2 would; four 4-rank runs per strategy cost minutes on 2 cores.
STRATEGIES = ["zero3"]
REPLACED = {"trainer.max_steps", "checkpoint.every_steps", "trainer.log_every"}
# QUICK, shortened: 8 steps with a checkpoint at 4 keep four runs of 4 ranks on 2 cores short.
SHORT = [
    *(o for o in QUICK if o.split("=")[0] not in REPLACED),
    "trainer.max_steps=8",
    "checkpoint.every_steps=4",
    "trainer.log_every=1",
    "eval.exact_match=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        tree = psutil.Process(proc.pid)
        for p in [tree, *tree.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    proc.wait()


def run_two_nodes(args: list[str], work: Path, home: Path) -> list[str]:
    """Start node 1 first (it must wait for node 0's rendezvous store), then node 0; return each
    node's output after both exit 0."""
    endpoint = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    for node_rank in (1, 0):
        log = work / f"node{node_rank}.log"
        node_args = [
            "train",
            "launcher=multinode",
            "launcher.nnodes=2",
            f"launcher.node_rank={node_rank}",
            "launcher.nproc_per_node=2",
            f"launcher.rdzv_endpoint={endpoint}",
            *args,
        ]
        with open(log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bigscale.cli", *node_args],
                    cwd=work,
                    env=env_for(home),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        logs.append(log)
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_tree(p)
    texts = [log.read_text() for log in reversed(logs)]  # node 0 first
    assert codes == [0, 0], "\n\n".join(t[-6000:] for t in texts)
    return texts


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, bigscale_home: Path
) -> dict[str, tuple[Path, Path, list[str]]]:
    """Per strategy: (single-node run dir, two-node run dir, the two nodes' output)."""
    work = tmp_path_factory.mktemp("multinode")
    out = {}
    for strategy in STRATEGIES:
        single, multi = work / f"{strategy}_single", work / f"{strategy}_nodes"
        single_args = [f"strategy={strategy}", "launcher.nproc_per_node=4", f"run_dir={single}"]
        proc = bigscale(["train", *single_args, *SHORT], cwd=work, home=bigscale_home)
        assert proc.returncode == 0, explain(proc)
        texts = run_two_nodes(
            [f"strategy={strategy}", f"run_dir={multi}", *SHORT], work, bigscale_home
        )
        out[strategy] = (single, multi, texts)
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_nodes_match_one_node_of_four_ranks(runs: dict, strategy: str) -> None:
    single, multi, _ = runs[strategy]
    one, two = train_rows(single), train_rows(multi)
    assert [r["step"] for r in two] == list(range(1, 9))
    assert [r["loss"] for r in two] == [r["loss"] for r in one]
    assert [r["grad_norm"] for r in two] == [r["grad_norm"] for r in one]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_both_nodes_joined_one_rendezvous(runs: dict, strategy: str) -> None:
    _, multi, texts = runs[strategy]
    for node_rank, text in enumerate(texts):
        assert f"node.sh: node {node_rank} of 2" in text, text[-3000:]
        assert "ranks           4 = 2 node(s) x 2 per node" in text
    checkpoints = multi / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000008"
    assert (checkpoints / "step_00000004" / "manifest.json").is_file()
    assert (multi / "export" / "model.safetensors").is_file()
