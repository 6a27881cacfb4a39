"""launch/node.sh, run by bash with the environment srun (or a user) gives it: the rendezvous it
derives and the torchrun command it would exec (``BIGSCALE_DRY_RUN=1`` prints it). Slurm's node
lists are expanded by the real ``scontrol show hostnames``, pointed at a minimal configuration."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NODE_SH = Path(__file__).resolve().parents[2] / "launch" / "node.sh"
OVERRIDES = ["trainer.max_steps=5", "logger.name='my run'", 'data.path="a b.jsonl"']


def node_sh(
    env: dict[str, str], args: list[str] = OVERRIDES, dry_run: bool = True
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "BIGSCALE_"))}
    base.update({"BIGSCALE_NPROC_PER_NODE": "2", "BIGSCALE_PYTHON": "python-for-bigscale"})
    if dry_run:
        base["BIGSCALE_DRY_RUN"] = "1"
    return subprocess.run(
        ["bash", str(NODE_SH), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def torchrun_args(env: dict[str, str]) -> dict[str, str]:
    """The exec'd command's ``--flag value`` pairs; the overrides must come through verbatim."""
    proc = node_sh(env)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    assert words[:3] == ["python-for-bigscale", "-m", "torch.distributed.run"]
    split = words.index("-m", 3)
    assert words[split : split + 2] == ["-m", "bigscale.train"]
    assert words[split + 2 :] == OVERRIDES
    flags = words[3:split]
    return dict(zip(flags[::2], flags[1::2], strict=True))


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol not installed (apt-get install slurm-wlm)")
    # scontrol refuses to start without a configuration, even to expand a host list.
    conf = tmp_path_factory.mktemp("slurm") / "slurm.conf"
    conf.write_text(
        "ClusterName=unit\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
        "PartitionName=test Nodes=localhost\n"
    )
    return conf


def slurm_env(conf: Path, node_id: int, **extra: str) -> dict[str, str]:
    return {
        "SLURM_CONF": str(conf),
        "SLURM_JOB_ID": "123457",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": str(node_id),
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        **extra,
    }


def test_one_node_without_slurm_rendezvouses_on_loopback() -> None:
    args = torchrun_args({})
    assert args == {
        "--nnodes": "1",
        "--nproc_per_node": "2",
        "--rdzv_backend": "c10d",
        "--rdzv_endpoint": "127.0.0.1:0",
        "--rdzv_id": "bigscale",
        "--rdzv_conf": "is_host=1",
        "--max_restarts": "0",
    }


@pytest.mark.parametrize("node_rank", [0, 1])
def test_by_hand_settings_reach_torchrun(node_rank: int) -> None:
    args = torchrun_args(
        {
            "BIGSCALE_NNODES": "2",
            "BIGSCALE_NODE_RANK": str(node_rank),
            "BIGSCALE_RDZV_ENDPOINT": "node001:29500",
            "BIGSCALE_RDZV_ID": "run-7",
            "BIGSCALE_NPROC_PER_NODE": "4",
            "BIGSCALE_MAX_RESTARTS": "3",
        }
    )
    assert args["--nnodes"] == "2"
    assert args["--rdzv_endpoint"] == "node001:29500"
    assert args["--rdzv_id"] == "run-7"
    assert args["--nproc_per_node"] == "4"
    assert args["--max_restarts"] == "3"
    # Only node 0 hosts the rendezvous store; the others connect to it.
    assert args["--rdzv_conf"] == f"is_host={int(node_rank == 0)}"


def test_elastic_node_count_passes_through() -> None:
    args = torchrun_args({"BIGSCALE_NNODES": "1:4", "BIGSCALE_RDZV_ENDPOINT": "node001:29500"})
    assert args["--nnodes"] == "1:4"


def test_several_nodes_without_an_endpoint_fail_with_the_fix() -> None:
    proc = node_sh({"BIGSCALE_NNODES": "2", "BIGSCALE_NODE_RANK": "1"})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "node.sh: error:" in proc.stderr and "BIGSCALE_RDZV_ENDPOINT=HOST:PORT" in proc.stderr


@pytest.mark.parametrize("node_id", [0, 1])
def test_slurm_rendezvous_from_the_node_list_and_job_id(slurm_conf: Path, node_id: int) -> None:
    args = torchrun_args(slurm_env(slurm_conf, node_id))
    assert args["--nnodes"] == "2"
    # The first host of gpu[07-08]; the port is 20000 + 123457 % 10000, the same on every node.
    assert args["--rdzv_endpoint"] == "gpu07:23457"
    assert args["--rdzv_id"] == "123457"
    assert args["--rdzv_conf"] == f"is_host={int(node_id == 0)}"


def test_slurm_port_can_be_overridden(slurm_conf: Path) -> None:
    args = torchrun_args(slurm_env(slurm_conf, 1, BIGSCALE_RDZV_PORT="31000"))
    assert args["--rdzv_endpoint"] == "gpu07:31000"


def test_explicit_settings_win_over_slurm(slurm_conf: Path) -> None:
    args = torchrun_args(
        slurm_env(
            slurm_conf,
            1,
            BIGSCALE_NNODES="3",
            BIGSCALE_NODE_RANK="0",
            BIGSCALE_RDZV_ENDPOINT="login1:29999",
            BIGSCALE_RDZV_ID="mine",
        )
    )
    assert args["--nnodes"] == "3"
    assert args["--rdzv_endpoint"] == "login1:29999"
    assert args["--rdzv_id"] == "mine"
    assert args["--rdzv_conf"] == "is_host=1"


def test_one_slurm_node_needs_no_host_lookup(tmp_path: Path) -> None:
    # No scontrol on PATH and a node list that would need one: one node uses loopback.
    env = {
        "PATH": str(tmp_path),
        "SLURM_JOB_ID": "99",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "gpu01",
        "BIGSCALE_NPROC_PER_NODE": "1",
        "BIGSCALE_PYTHON": "py",
        "BIGSCALE_DRY_RUN": "1",
    }
    proc = subprocess.run(
        ["/bin/bash", str(NODE_SH)], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "--rdzv_endpoint 127.0.0.1:0 --rdzv_id 99" in proc.stdout


def test_missing_scontrol_is_named(tmp_path: Path) -> None:
    env = {
        "PATH": str(tmp_path),
        "SLURM_JOB_ID": "99",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "BIGSCALE_NPROC_PER_NODE": "1",
        "BIGSCALE_DRY_RUN": "1",
    }
    proc = subprocess.run(
        ["/bin/bash", str(NODE_SH)], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "scontrol not found" in proc.stderr and "BIGSCALE_RDZV_ENDPOINT" in proc.stderr


def test_slurm_node_id_is_required_under_slurm(slurm_conf: Path) -> None:
    env = slurm_env(slurm_conf, 0)
    del env["SLURM_NODEID"]  # the batch script itself, not a task that srun started
    proc = node_sh(env)
    assert proc.returncode != 0
    assert "SLURM_NODEID" in proc.stderr and "srun" in proc.stderr


def test_auto_ranks_ask_the_interpreter_for_its_gpus() -> None:
    proc = node_sh({"BIGSCALE_NPROC_PER_NODE": "auto", "BIGSCALE_PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    import torch

    expected = torch.cuda.device_count() or 2
    assert words[words.index("--nproc_per_node") + 1] == str(expected)


def test_sigusr1_is_ignored_by_torchrun_and_catchable_by_ranks(tmp_path: Path) -> None:
    """The interpreter node.sh execs starts with SIGUSR1 ignored (so Slurm's warning signal
    cannot kill torchrun's agent), and a handler installed later, as a training rank does, still
    receives it."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, signal\n"
        'print("ignored" if signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN else "default")\n'
        'signal.signal(signal.SIGUSR1, lambda *_: print("handled"))\n'
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        'print(os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"])\n'
    )
    probe = tmp_path / "python"  # stands in for the interpreter; ignores torchrun's arguments
    probe.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(script))}\n")
    probe.chmod(0o755)
    proc = node_sh({"BIGSCALE_PYTHON": str(probe)}, dry_run=False)
    assert proc.returncode == 0, proc.stderr
    # ...and torchrun gives every restart attempt a fresh store (pytorch#135712).
    assert proc.stdout.split() == ["ignored", "handled", "1"]
    assert "node.sh: node 0 of 1" in proc.stderr
