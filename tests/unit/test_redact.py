"""Secrets are recognised by key name, by origin (``${oc.env:...}``), by the environment's
secret-named variables and by token shape, and removed from config.yaml, text and the sbatch
script, while ordinary values (paths under BIGSCALE_HOME, pad tokens, commit ids) stay."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from bigscale.cli import main as cli_main
from bigscale.config.compose import compose_config, to_yaml
from bigscale.config.redact import REDACTED, redact, redact_text
from bigscale.config.validate import Hardware
from bigscale.launch.plan import make_plan
from bigscale.launch.slurm import job_secrets, render_script


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, own_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_secret_keys_are_redacted_but_lookalikes_are_not() -> None:
    out = redact(
        {
            "wandb": {"api_key": "abc", "token": "xyz"},
            "hf_token": "t",
            "model": {"pad_token": "<pad>", "max_new_tokens": 8},
        }
    )
    assert out["wandb"] == {"api_key": REDACTED, "token": REDACTED}
    assert out["hf_token"] == REDACTED
    assert out["model"] == {"pad_token": "<pad>", "max_new_tokens": 8}


def test_token_shaped_values_are_redacted_anywhere() -> None:
    hf = "hf_" + "Zz9" * 12
    wandb_key = "0123456789abcdef" * 2 + "01234567"
    assert redact_text(f"--token {hf} done") == f"--token {REDACTED} done"
    assert redact({"tags": ["x", wandb_key]}) == {"tags": ["x", REDACTED]}


@pytest.mark.parametrize(
    "token",
    [
        "sk-live-SENTINEL123",
        "sk-proj-Ab3dEf9hIj",
        "hf_Q7xQ7xQ7x",
        "ghp_a1b2c3d4e5",
        "github_pat_11ABCDEFG0",
        "wandb-Key1234567",
        "xoxb-1234-5678-abcd",
        "xoxp-99887766554",
        "AKIAIOSFODNN7EXAMPLE",
    ],
)
def test_short_tokens_with_a_known_prefix_are_caught(token: str) -> None:
    assert redact_text(f"logger.tags=[{token}]") == f"logger.tags=[{REDACTED}]"
    assert redact({"logger": {"name": f"run {token}"}}) == {"logger": {"name": f"run {REDACTED}"}}


@pytest.mark.parametrize(
    "word",
    [
        "hf_transfer",
        "wandb-summary.json",
        "wandb-metadata",
        "sk-SK",
        "task-list-12345678",
        "desk-Top12345",
    ],
)
def test_words_sharing_a_prefix_are_kept(word: str) -> None:
    assert redact_text(word) == word


def test_commit_revision_is_kept() -> None:
    sha = "a" * 40
    assert redact({"revision": sha}) == {"revision": sha}


def test_values_of_secret_named_variables_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_API_KEY", "plainvalue-4821")
    monkeypatch.setenv("DB_PASSWORD_FILE_X", "hunter2hunter2")
    monkeypatch.setenv("FEATURE_TOKEN", "1")  # too short to be a credential: left alone
    text = "logger.name=plainvalue-4821 pw hunter2hunter2 step 1"
    assert redact_text(text) == f"logger.name={REDACTED} pw {REDACTED} step 1"
    assert redact({"logger": {"group": "x-plainvalue-4821"}}) == {
        "logger": {"group": f"x-{REDACTED}"}
    }


def test_values_from_oc_env_are_redacted_by_key_and_in_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MY_SECRET", "ocenv-sentinel-77")
    monkeypatch.setenv("SHORT_ONE", "q9")
    cfg = compose_config(
        ["logger.name=${oc.env:MY_SECRET}", "logger.tags=[keep,'${oc.env:SHORT_ONE}']"]
    )
    assert cfg.logger.name == "ocenv-sentinel-77"  # the run itself gets the real value
    text = to_yaml(cfg)
    assert "ocenv-sentinel-77" not in text and "q9" not in text
    logger = yaml.safe_load(text)["logger"]
    assert logger["name"] == REDACTED
    assert logger["tags"] == ["keep", REDACTED]
    assert redact_text("run ocenv-sentinel-77 started") == f"run {REDACTED} started"


def test_bigscale_home_paths_stay_readable(tmp_path: Path) -> None:
    text = to_yaml(compose_config(["model=tiny", "data=arithmetic"]))
    data = yaml.safe_load(text)
    assert data["model"]["name_or_path"] == f"{tmp_path}/home/models/tiny-llama"
    assert data["data"]["path"].startswith(f"{tmp_path}/home/data/")
    assert REDACTED not in text


def test_a_failed_conversion_does_not_quote_the_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MY_STEPS", "notanumber-secret")
    assert cli_main(["plan", "trainer.max_steps=${oc.env:MY_STEPS}"]) == 2
    err = capsys.readouterr().err
    assert "trainer.max_steps" in err and "notanumber-secret" not in err


SENTINELS = {
    "MY_SECRET": "ocenv-SENTINEL-slurm1",
    "MY_API_KEY": "envkey-SENTINEL-slurm2",
}
SHAPED = ["sk-live-SENTINEL123", "hf_SENTINELslurm3x"]


def _secret_overrides() -> list[str]:
    return [
        "launcher=slurm",
        "logger.name=${oc.env:MY_SECRET}",
        f"logger.tags=[{SHAPED[0]},{SHAPED[1]}]",
        f"logger.group={SENTINELS['MY_API_KEY']}",
        f"launcher.setup=['export OTHER={SENTINELS['MY_API_KEY']}',echo ok]",
    ]


def _all_sentinels() -> list[str]:
    return [*SENTINELS.values(), *SHAPED]


def test_sbatch_script_carries_no_secret_and_the_job_still_gets_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in SENTINELS.items():
        monkeypatch.setenv(name, value)
    overrides = [*_secret_overrides(), f"run_dir={tmp_path / 'run'}"]

    assert cli_main(["plan", *overrides]) == 0
    printed = capsys.readouterr()
    for sentinel in _all_sentinels():
        assert sentinel not in printed.out + printed.err, sentinel
    assert "srun --kill-on-bad-exit=1" in printed.out

    plan = make_plan(compose_config(overrides), overrides, hw=Hardware())
    script = render_script(plan)
    for sentinel in _all_sentinels():
        assert sentinel not in script, sentinel
    # The oc.env override holds no secret itself: it stays in the script, resolved on the nodes.
    assert "logger.name=${oc.env:MY_SECRET}" in script

    # Bash runs the script's setup and srun lines with the environment sbatch saved at
    # submission: the ranks receive exactly the overrides the user gave.
    lines = script.splitlines()
    start = lines.index("# launcher.setup")
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    body = "\n".join(
        [*lines[start:srun], "\n".join(lines[srun:]).replace("srun ", "printf '%s\\n' ", 1)]
    )
    env = {"PATH": "/usr/bin:/bin", **job_secrets(plan)}
    words = subprocess.run(
        ["bash", "-c", body], capture_output=True, text=True, check=True, env=env
    ).stdout.splitlines()
    assert words == [
        "ok",
        "--kill-on-bad-exit=1",
        "bash",
        str(plan.run_dir / "node.sh"),
        *plan.rank_overrides,
    ]

    # Submitted by hand without them, the job stops at once and says why.
    missing = subprocess.run(["bash", "-c", body], capture_output=True, text=True, env={})
    assert missing.returncode != 0
    assert "submit with bigscale train" in missing.stderr
