"""The sbatch script ``launcher=slurm`` renders: every launcher field on its #SBATCH line, the
overrides quoted so that bash hands the ranks exactly what the user typed, and the submission's
failure modes (no sbatch, a refused job) as one ``error:`` line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bigscale.cli import main as cli_main
from bigscale.config.compose import compose_config
from bigscale.config.validate import Hardware
from bigscale.errors import ConfigError
from bigscale.launch.plan import Plan, make_plan
from bigscale.launch.slurm import render_script, write_job

EVERY_FIELD = [
    "launcher=slurm",
    "launcher.nodes=4",
    "launcher.gpus_per_node=8",
    "launcher.cpus_per_task=64",
    "launcher.partition=gpu",
    "launcher.account=proj42",
    "launcher.qos=high",
    "launcher.time=04:00:00",
    "launcher.constraint='a100&ib'",
    "launcher.job_name=sft-7b",
    "launcher.sbatch_extra=[--exclusive,'#SBATCH --mem=0']",
    "launcher.setup=['module load cuda/12.4','source /opt/venv/bin/activate']",
    "launcher.signal_seconds=300",
    "launcher.max_requeues=5",
    "launcher.max_restarts=2",
]


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, own_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def plan_for(overrides: list[str]) -> Plan:
    return make_plan(compose_config(overrides), overrides, hw=Hardware())


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_every_launcher_field_reaches_its_sbatch_line(tmp_path: Path) -> None:
    plan = plan_for([*EVERY_FIELD, f"run_dir={tmp_path / 'run'}"])
    script = render_script(plan)
    run = tmp_path / "run"
    assert sbatch_lines(script) == [
        "#SBATCH --job-name=sft-7b",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=64",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        "#SBATCH --qos=high",
        "#SBATCH --time=04:00:00",
        "#SBATCH --constraint=a100&ib",
        "#SBATCH --exclusive",
        "#SBATCH --mem=0",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=USR1@300",
        f"#SBATCH --chdir={tmp_path}",
        f"#SBATCH --output={run}/slurm-%j.out",
        f"#SBATCH --error={run}/slurm-%j.out",
    ]
    body = script.splitlines()
    setup = body.index("module load cuda/12.4")
    assert body[setup + 1] == "source /opt/venv/bin/activate"
    srun = next(i for i, line in enumerate(body) if line.startswith("srun "))
    assert setup < srun
    assert body[srun] == f"srun --kill-on-bad-exit=1 --cpus-per-task=64 bash {run}/node.sh \\"
    assert "export BIGSCALE_NPROC_PER_NODE=8" in body
    assert "export BIGSCALE_MAX_RESTARTS=2" in body
    assert f"export BIGSCALE_PYTHON={sys.executable}" in body


def test_defaults_ask_only_for_what_is_set(tmp_path: Path) -> None:
    plan = plan_for(["launcher=slurm", f"run_dir={tmp_path / 'run'}"])
    lines = sbatch_lines(render_script(plan))
    assert "#SBATCH --job-name=bigscale-demo" in lines
    assert "#SBATCH --nodes=1" in lines
    assert "#SBATCH --signal=USR1@120" in lines
    for absent in ("--gpus-per-node", "--cpus-per-task", "--partition", "--account", "--qos"):
        assert not any(absent in line for line in lines), absent
    assert plan.world_size == 2  # CPU nodes: nproc_per_node=auto is 2 ranks per node


def test_signal_goes_to_the_job_step_not_only_the_batch_shell(tmp_path: Path) -> None:
    script = render_script(plan_for(["launcher=slurm", f"run_dir={tmp_path}"]))
    signal = [line for line in sbatch_lines(script) if "--signal" in line]
    assert signal == ["#SBATCH --signal=USR1@120"]  # "B:USR1" would reach the batch shell only


def test_no_signal_when_disabled(tmp_path: Path) -> None:
    script = render_script(
        plan_for(["launcher=slurm", "launcher.signal_seconds=0", f"run_dir={tmp_path}"])
    )
    assert not any("--signal" in line for line in sbatch_lines(script))


def test_sbatch_options_precede_the_first_command(tmp_path: Path) -> None:
    """sbatch stops reading #SBATCH lines at the first command."""
    lines = render_script(plan_for([*EVERY_FIELD, f"run_dir={tmp_path}"])).splitlines()
    first_command = next(
        i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#")
    )
    last_option = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert last_option < first_command


def test_rendered_script_is_valid_bash(tmp_path: Path) -> None:
    script = tmp_path / "train.sbatch"
    script.write_text(render_script(plan_for([*EVERY_FIELD, f"run_dir={tmp_path}"])))
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_overrides_reach_the_ranks_verbatim(tmp_path: Path) -> None:
    """Bash parses the rendered srun line; the words it yields compose to the values the user
    meant, quotes and spaces included."""
    run_dir = tmp_path / "runs dir" / "it's"
    overrides = [
        "launcher=slurm",
        "logger.name='my run'",
        'logger.tags=["a b",c]',
        "optim.lr=3e-4",
        f'run_dir="{run_dir}"',
    ]
    plan = plan_for(overrides)
    lines = render_script(plan).splitlines()
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    command = "\n".join(lines[srun:]).replace("srun ", "printf '%s\\n' ", 1)
    printed = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    node_sh = str(plan.run_dir / "node.sh")
    assert printed == ["--kill-on-bad-exit=1", "bash", node_sh, *plan.rank_overrides]
    cfg = compose_config(printed[3:])
    assert cfg.logger.name == "my run"
    assert cfg.logger.tags == ["a b", "c"]
    assert cfg.run_dir == str(run_dir)
    assert cfg.launcher.kind == "slurm"  # the ranks see launcher.max_requeues and the rest


def test_write_job_pins_node_sh_beside_the_script(tmp_path: Path) -> None:
    plan = plan_for(["launcher=slurm", f"run_dir={tmp_path / 'run'}"])
    script = write_job(plan)
    assert script == tmp_path / "run" / "train.sbatch"
    copy = tmp_path / "run" / "node.sh"
    assert copy.read_text() == (Path(__file__).parents[2] / "launch" / "node.sh").read_text()
    assert f"bash {copy} \\" in script.read_text()


@pytest.mark.parametrize("entry", ["exclusive", "--mem=0\n--exclusive"])
def test_bad_sbatch_extra_is_named(tmp_path: Path, entry: str) -> None:
    overrides = ["launcher=slurm", f"run_dir={tmp_path}"]
    cfg = compose_config(overrides)
    cfg.launcher.sbatch_extra = [entry]
    plan = make_plan(cfg, overrides, hw=Hardware())
    with pytest.raises(ConfigError, match="launcher.sbatch_extra entry"):
        render_script(plan)


def test_plan_prints_the_script_without_submitting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    code = cli_main(["plan", *EVERY_FIELD, f"run_dir={run_dir}"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"command         sbatch --parsable {run_dir}/train.sbatch" in out
    assert "ranks           32 = 4 node(s) x 8 per node" in out
    assert "slurm           4 node(s), partition gpu, account proj42, qos high, time " in out
    assert "#SBATCH --nodes=4" in out and "srun --kill-on-bad-exit=1" in out
    assert not run_dir.exists()


def _train(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli_main(["train", *args])
    return code, capsys.readouterr().err


def test_train_without_sbatch_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    run_dir = tmp_path / "run"
    code, err = _train(["launcher=slurm", f"run_dir={run_dir}"], capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sbatch not found on PATH" in errors[0], err
    assert "launcher=local" in errors[0]
    assert not run_dir.exists(), "nothing is prepared for a job that cannot be submitted"


@pytest.mark.skipif(
    shutil.which("sbatch") is None, reason="sbatch not installed (apt-get install slurm-wlm)"
)
def test_a_refused_submission_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A configuration naming no cluster: the real sbatch refuses at once, and no real cluster
    # this machine may belong to is ever contacted.
    conf = tmp_path / "slurm.conf"
    conf.write_text("")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    run_dir = tmp_path / "run"
    code, err = _train(["launcher=slurm", f"run_dir={run_dir}"], capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert f"sbatch refused {run_dir}/train.sbatch" in errors[0]
    assert (run_dir / "train.sbatch").is_file() and (run_dir / "config.yaml").is_file()
