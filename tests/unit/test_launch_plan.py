"""Plans for clusters, and the pre-flight checks that run before any rank starts or any job is
queued: nodes, ranks and GPUs add up; a multi-node run directory is shared; data and model
paths exist. Each bad input is one ConfigError naming the key and the fix."""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import pytest

from bigscale.checkpoint.manager import CheckpointManager
from bigscale.cli import main as cli_main
from bigscale.config.compose import compose_config
from bigscale.config.validate import Hardware
from bigscale.dist.env import DistEnv
from bigscale.errors import CheckpointError, ConfigError, DataError
from bigscale.launch import preflight
from bigscale.launch.node import node_script
from bigscale.launch.plan import Plan, make_plan, render

CPU = Hardware()
FOUR_GPUS = Hardware(cuda_devices=4, bf16_supported=True)
TWO_NODES = ["launcher=multinode", "launcher.nnodes=2", "launcher.rdzv_endpoint=node001:29500"]


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, own_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def plan_for(overrides: list[str], hw: Hardware = CPU) -> Plan:
    return make_plan(compose_config(overrides), overrides, hw=hw)


# -- world size ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "hw", "world_size"),
    [
        ([], CPU, 2),
        ([], FOUR_GPUS, 4),
        (["launcher.nproc_per_node=1"], CPU, 1),
        ([*TWO_NODES, "run_dir=r"], CPU, 4),
        ([*TWO_NODES, "run_dir=r", "launcher.nproc_per_node=3"], CPU, 6),
        ([*TWO_NODES, "run_dir=r"], FOUR_GPUS, 8),
        (["launcher=slurm", "launcher.nodes=4", "launcher.gpus_per_node=8"], CPU, 32),
        (["launcher=slurm", "launcher.nodes=3"], CPU, 6),
        (["launcher=slurm", "launcher.nodes=3", "launcher.nproc_per_node=5"], FOUR_GPUS, 15),
    ],
)
def test_world_size(overrides: list[str], hw: Hardware, world_size: int) -> None:
    assert plan_for(overrides, hw).world_size == world_size


def test_elastic_nodes_are_planned_for_the_maximum() -> None:
    plan = plan_for(["launcher=multinode", "launcher.nnodes=1:4", *TWO_NODES[2:], "run_dir=r"])
    assert plan.world_size == 8
    assert plan.topology.min_nodes == 1 and plan.topology.elastic
    assert "8 = 1-4 node(s) x 2 per node" in render(plan, with_memory=False)
    assert "elastic, sized for 4 nodes" in render(plan, with_memory=False)


def test_elastic_job_warns_that_fewer_nodes_change_the_global_batch() -> None:
    plan = plan_for(["launcher=multinode", "launcher.nnodes=2:4", *TWO_NODES[2:], "run_dir=r"])
    warning = preflight.check(plan, submitting=False)[0]
    assert "launcher.nnodes=2:4 is elastic" in warning and "down to 4 ranks" in warning
    assert "checkpoint.allow_config_change=true" in warning


def test_batch_math_counts_every_node() -> None:
    slurm = ["launcher=slurm", "launcher.nodes=4", "launcher.gpus_per_node=8"]
    plan_for([*slurm, "trainer.micro_batch_size=2", "trainer.global_batch_size=64"])
    with pytest.raises(ConfigError, match=r"x 32 data-parallel ranks = 64"):
        plan_for([*slurm, "trainer.micro_batch_size=2", "trainer.global_batch_size=16"])


def test_slurm_plans_for_the_requested_gpus_not_the_login_node() -> None:
    """fp16 needs a GPU: allowed for a GPU job planned on a CPU-only login node."""
    plan = plan_for(["launcher=slurm", "launcher.gpus_per_node=8", "trainer.precision=fp16"])
    assert plan.hardware.cuda_devices == 8
    assert "on 8 GPU(s) per node" in render(plan, with_memory=False)


# -- commands --------------------------------------------------------------------------------


def _env_and_args(command: list[str]) -> tuple[dict[str, str], list[str]]:
    assert command[0] == "env"
    bash = command.index("bash")
    env = dict(word.split("=", 1) for word in command[1:bash])
    return env, command[bash + 1 :]


def test_multinode_command_runs_node_sh_with_this_nodes_settings(tmp_path: Path) -> None:
    plan = plan_for([*TWO_NODES, "launcher.node_rank=1", "launcher.max_restarts=2", "run_dir=r"])
    env, args = _env_and_args(plan.command())
    assert args[0] == str(node_script())
    assert env["BIGSCALE_NNODES"] == "2"
    assert env["BIGSCALE_NODE_RANK"] == "1"
    assert env["BIGSCALE_RDZV_ENDPOINT"] == "node001:29500"
    assert env["BIGSCALE_NPROC_PER_NODE"] == "2"
    assert env["BIGSCALE_MAX_RESTARTS"] == "2"
    assert args[1:] == plan.rank_overrides
    assert args[-1] == f"run_dir={tmp_path / 'r'}"  # absolute: the same on every node


def test_every_node_derives_the_same_rendezvous_id() -> None:
    ids = {
        _env_and_args(plan_for([*TWO_NODES, f"launcher.node_rank={k}", "run_dir=r"]).command())[0][
            "BIGSCALE_RDZV_ID"
        ]
        for k in (0, 1)
    }
    other = _env_and_args(plan_for([*TWO_NODES, "run_dir=other"]).command())[0]
    assert len(ids) == 1 and other["BIGSCALE_RDZV_ID"] not in ids
    explicit = plan_for([*TWO_NODES, "launcher.rdzv_id=mine", "run_dir=r"])
    assert _env_and_args(explicit.command())[0]["BIGSCALE_RDZV_ID"] == "mine"


def test_printed_multinode_command_is_runnable_shell(tmp_path: Path) -> None:
    plan = plan_for([*TWO_NODES, "logger.name='my run'", "run_dir=r"])
    line = next(li for li in render(plan, with_memory=False).splitlines() if li.startswith("comm"))
    assert shlex.split(line.removeprefix("command").strip()) == plan.command()


@pytest.mark.parametrize("nproc", [1, 2])
def test_local_restarts_go_through_torchrun(nproc: int) -> None:
    plan = plan_for([f"launcher.nproc_per_node={nproc}", "launcher.max_restarts=2"])
    command = plan.command()
    assert not plan.in_process
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert command[command.index("--max_restarts") + 1] == "2"
    assert "--max_restarts" not in plan_for([]).command()


def test_slurm_command_submits_the_rendered_script(tmp_path: Path) -> None:
    plan = plan_for(["launcher=slurm", "run_dir=r"])
    assert plan.command() == ["sbatch", "--parsable", str(tmp_path / "r" / "train.sbatch")]
    assert not plan.in_process


# -- pre-flight errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "hw", "expected"),
    [
        (["launcher.nnodes=2"], CPU, "launcher.nnodes=2 needs several machines: use "),
        (["launcher.nproc_per_node=8"], FOUR_GPUS, "this machine has 4 GPU(s)"),
        (["launcher.nproc_per_node=zero"], CPU, "launcher.nproc_per_node='zero' is not valid"),
        (["launcher.max_restarts=-1"], CPU, "launcher.max_restarts=-1 must be"),
        (["launcher=multinode", "launcher.nnodes=two"], CPU, "launcher.nnodes='two' is not"),
        (["launcher=multinode", "launcher.nnodes=0"], CPU, "launcher.nnodes=0 must be at least"),
        (["launcher=multinode", "launcher.nnodes=4:2"], CPU, "write MIN:MAX, e.g. 2:4"),
        ([*TWO_NODES, "launcher.node_rank=2"], CPU, "launcher.node_rank=2 must be in 0..1"),
        ([*TWO_NODES, "launcher.node_rank=-1"], CPU, "launcher.node_rank=-1 must be in 0..1"),
        (TWO_NODES[:2], CPU, "launcher.nnodes=2 needs launcher.rdzv_endpoint=HOST:PORT"),
        ([*TWO_NODES[:2], "launcher.rdzv_endpoint=node001"], CPU, "is not HOST:PORT"),
        ([*TWO_NODES[:2], "launcher.rdzv_endpoint=node001:70000"], CPU, "is not HOST:PORT"),
        (TWO_NODES, CPU, "launcher=multinode needs run_dir=PATH"),
        (["launcher=slurm", "launcher.nodes=0"], CPU, "launcher.nodes=0 must be at least 1"),
        (["launcher=slurm", "launcher.gpus_per_node=-1"], CPU, "launcher.gpus_per_node=-1"),
        (["launcher=slurm", "launcher.cpus_per_task=0"], CPU, "launcher.cpus_per_task=0"),
        (["launcher=slurm", "launcher.signal_seconds=-5"], CPU, "launcher.signal_seconds=-5"),
        (["launcher=slurm", "launcher.max_requeues=-1"], CPU, "launcher.max_requeues=-1"),
        (["launcher=slurm", "launcher.nnodes=4"], CPU, "under Slurm set launcher.nodes=4"),
        (
            ["launcher=slurm", "launcher.gpus_per_node=8", "launcher.nproc_per_node=4"],
            CPU,
            "one rank per GPU; set launcher.nproc_per_node=auto",
        ),
        (["dist.timeout_minutes=0"], CPU, "dist.timeout_minutes=0 must be positive"),
    ],
)
def test_bad_launch_is_refused_with_the_key_and_fix(
    overrides: list[str], hw: Hardware, expected: str
) -> None:
    with pytest.raises(ConfigError) as err:
        plan_for(overrides, hw)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_prints_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", *TWO_NODES[:2], "run_dir=r"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: launcher.nnodes=2 needs launcher.rdzv_endpoint=HOST:PORT, node 0's address "
        "and a free port, the same on every node"
    ]


# -- shared run directory ---------------------------------------------------------------------


def test_node_local_run_dir_warns_for_several_nodes(tmp_path: Path) -> None:
    plan = plan_for([*TWO_NODES, f"run_dir={tmp_path / 'run'}"])
    (warning,) = preflight.check(plan, submitting=False)
    assert f"run directory {tmp_path / 'run'} is under /tmp" in warning
    assert "the 2 nodes" in warning and "shared" not in warning.split(":")[0]


def test_one_node_needs_no_shared_filesystem(tmp_path: Path) -> None:
    plan = plan_for(["launcher=slurm", f"run_dir={tmp_path / 'run'}"])
    assert preflight.check(plan, submitting=False) == []


def test_filesystem_type_is_read_from_the_mount_table() -> None:
    mount, fstype = preflight.filesystem_of(Path("/dev/shm/not/yet/created"))
    assert (mount, fstype) == ("/dev/shm", "tmpfs")
    assert "on tmpfs (/dev/shm)" in str(preflight.shared_filesystem_warning(Path("/dev/shm/r"), 2))
    assert preflight.filesystem_of(Path("/proc/self"))[1] == "proc"
    assert preflight.shared_filesystem_warning(Path("/proc/self"), 2) is None


def test_cli_warns_but_plans(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", *TWO_NODES, f"run_dir={tmp_path / 'run'}"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("warning: run directory ")
    assert "ranks           4 = 2 node(s) x 2 per node (multinode" in captured.out


# -- data and model paths --------------------------------------------------------------------


def test_plan_checks_data_files_that_are_not_generated(tmp_path: Path) -> None:
    cfg = compose_config(["model=tiny", "data=text_files", "data.path=missing.jsonl"])
    with pytest.raises(DataError, match="data.path='missing.jsonl'"):
        preflight.check_data(cfg)
    preflight.check_data(compose_config([]))  # the default job writes its data on first use


def test_plan_refuses_a_missing_model_directory(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", "model.name_or_path=./no-such-model", "data=arithmetic"])
    assert "model.name_or_path=./no-such-model does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            [],
            "attention auto, loss full logits, activation checkpointing off, compile off",
        ),
        (
            [
                "model.attn_implementation=eager",
                "model.loss_chunk_tokens=1024",
                "model.gradient_checkpointing=true",
                "model.checkpoint_every=2",
                "model.compile=true",
            ],
            "attention eager, loss chunked, 1024 tokens, activation checkpointing every 2, "
            "compile on",
        ),
    ],
    ids=["defaults", "all-switched"],
)
def test_the_plan_shows_the_speed_switches(overrides: list[str], line: str) -> None:
    rendered = render(plan_for(overrides), with_memory=False)
    assert f"speed           {line}" in rendered.splitlines()


# -- what runs -------------------------------------------------------------------------------


def test_epochs_are_planned_as_steps_from_the_tokenized_data() -> None:
    overrides = ["experiment=arithmetic", "trainer.epochs=0.5", "trainer.micro_batch_size=16"]
    overrides.append("optim.warmup_steps=1")
    plan = plan_for(overrides)
    data = plan.shape.data
    assert data is not None and not data.packed and 0 < data.longest <= plan.cfg.data.max_length
    per_rank = data.rows // 2
    expected = -(-per_rank // 16) // 2 + (-(-per_rank // 16) % 2 > 0)  # ceil(0.5 x batches)
    assert plan.shape.max_steps == expected
    assert plan.cfg.trainer.max_steps == compose_config(overrides).trainer.max_steps  # untouched
    line = next(li for li in render(plan, with_memory=False).splitlines() if li.startswith("step"))
    assert line == f"steps           {expected} ({plan.shape.steps_from})"
    assert plan.shape.steps_from.startswith(f"from trainer.epochs=0.5: {data.rows} examples / 2")
    with pytest.raises(ConfigError, match=f"makes {expected} optimizer steps"):
        plan_for([*overrides[:-1], "optim.warmup_steps=500"])


def _checkpoint(root: Path, tag: str, damaged: bool) -> None:
    directory = root / tag
    directory.mkdir(parents=True)
    (directory / "state.pt").write_bytes(b"weights")
    files = {"state.pt": {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}}
    if damaged:
        files["zero_pp_rank_1_optim_states.pt"] = {"size": 3, "sha256": "0" * 64}
    (directory / "manifest.json").write_text(json.dumps({"tag": tag, "files": files}))


def test_the_plan_names_the_checkpoint_resume_will_use(tmp_path: Path) -> None:
    root = tmp_path / "r" / "checkpoints"
    _checkpoint(root, "step_00000016", damaged=False)
    _checkpoint(root, "step_00000024", damaged=True)
    (root / "latest").write_text("step_00000024\n")
    lines = render(plan_for(["run_dir=r"]), with_memory=False).splitlines()
    start = lines.index("resume          from step_00000016 (resume=auto)")
    assert lines[start + 1].startswith("                skipped: newer step_00000024 is damaged")
    assert "zero_pp_rank_1_optim_states.pt is missing" in lines[start + 1]
    # The ranks' own rule picks the same one.
    ranks = CheckpointManager(root, compose_config([]).checkpoint, DistEnv())
    assert ranks.resume_point("auto") == root / "step_00000016"
    with pytest.raises(CheckpointError, match="resume=never but"):
        render(plan_for(["run_dir=r", "resume=never"]), with_memory=False)


def test_the_plan_warns_of_bf16_on_a_cpu_that_emulates_it() -> None:
    plan = make_plan(compose_config(["trainer.precision=bf16"]), [], Hardware())
    line = next(li for li in render(plan, with_memory=False).splitlines() if li.startswith("prec"))
    assert "bf16 on CPU (warning: this CPU has no bf16 matrix units" in line
    fast = make_plan(compose_config(["trainer.precision=bf16"]), [], Hardware(cpu_bf16_units=True))
    assert "warning" not in render(fast, with_memory=False)
    # The default job asks for auto: fp32 on any CPU, whatever its units.
    assert (
        make_plan(compose_config([]), [], Hardware(cpu_bf16_units=True)).precision.value == "fp32"
    )
