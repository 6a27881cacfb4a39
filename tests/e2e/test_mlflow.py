"""``logger.mlflow=true`` against a real MLflow tracking server that the test starts on
loopback: the server receives the run's metrics, a resumed run continues the same MLflow run,
and a secret planted in overrides never reaches it. One short run (1 rank, 4 steps) and its
resume to step 6 are shared by the assertions; bad input is refused before any rank starts."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from bigscale.metrics.mlflow_sink import RUN_ID_FILE
from tests.cli import QUICK, bigscale, env_for, explain, metrics, train_rows
from tests.e2e.test_bad_input import assert_user_error
from tests.e2e.test_wandb_secrets import FROM_OC_ENV, FROM_SECRET_ENV, FULL_HF, SHORT_SK

pytestmark = pytest.mark.e2e

SENTINELS = [FROM_OC_ENV, SHORT_SK, FROM_SECRET_ENV, FULL_HF]
EXPERIMENT = "bigscale-e2e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    uri: str
    store: Path  # the server's backend store and artifacts: every byte it keeps


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--backend-store-uri", f"sqlite:///{store / 'store.db'}"]
    cmd += ["--artifacts-destination", str(store / "artifacts"), "--workers", "1"]
    log = (store.parent / "server.log").open("w")
    proc = subprocess.Popen(cmd, cwd=store, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, (store.parent / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the MLflow server did not answer in 180 s"
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{uri}/health", timeout=2) as answer,
        ):
            if answer.status == 200:
                break
        time.sleep(0.5)
    try:
        yield Server(uri, store)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@dataclass
class Runs:
    run_dir: Path
    run_id_first: str  # after the first 4 steps
    loss_first: list[tuple[int, float]]  # the server's loss history then


def quick(server: Server, run_dir: Path, max_steps: int) -> list[str]:
    replaced = ("logger=", "trainer.max_steps", "checkpoint.", "optim.warmup")
    kept = [o for o in QUICK if not o.startswith(replaced)]
    return [
        "train",
        *kept,
        f"trainer.max_steps={max_steps}",
        "optim.warmup_steps=1",
        "checkpoint.every_steps=2",
        "launcher.nproc_per_node=1",
        "logger=mlflow",
        f"logger.mlflow_tracking_uri={server.uri}",
        f"logger.mlflow_experiment={EXPERIMENT}",
        # The sentinels, planted through each route W&B's test uses.
        "logger.name=${oc.env:MY_SECRET}",
        f"logger.tags=[sft,{SHORT_SK},{FULL_HF}]",
        f"logger.group=g-{FROM_SECRET_ENV}",
        f"run_dir={run_dir}",
    ]


def loss_history(server: Server, run_id: str) -> list[tuple[int, float]]:
    client = MlflowClient(server.uri)
    return [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]


@pytest.fixture(scope="module")
def runs(server: Server, tmp_path_factory: pytest.TempPathFactory, bigscale_home: Path) -> Runs:
    work = tmp_path_factory.mktemp("mlflow_run")
    run_dir = work / "run"
    secrets = {"MY_SECRET": FROM_OC_ENV, "MY_API_KEY": FROM_SECRET_ENV}
    for max_steps in (4, 6):  # the second resumes from the first's step-4 checkpoint
        proc = bigscale(
            quick(server, run_dir, max_steps), cwd=work, home=bigscale_home, extra_env=secrets
        )
        assert proc.returncode == 0, explain(proc)
        if max_steps == 4:
            first = (run_dir / RUN_ID_FILE).read_text().strip()
            before = loss_history(server, first)
    assert "resumed from" in (run_dir / "train.log").read_text()
    return Runs(run_dir, first, before)


def test_server_receives_the_run(server: Server, runs: Runs) -> None:
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])  # one MLflow run for the bigscale run
    assert run.info.run_id == (runs.run_dir / RUN_ID_FILE).read_text().strip()
    assert run.info.status == "FINISHED"
    rows = train_rows(runs.run_dir)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert loss_history(server, run.info.run_id) == [
        (r["step"], pytest.approx(r["loss"])) for r in rows
    ]
    assert run.data.params["trainer.micro_batch_size"] == "8"
    assert run.data.params["logger.mlflow_experiment"] == EXPERIMENT
    final = [r for r in metrics(runs.run_dir) if "final/eval_loss" in r][-1]  # the resume's
    assert final["step"] == 6
    assert run.data.metrics["final/eval_loss"] == pytest.approx(final["final/eval_loss"])


def test_resume_continues_the_same_run(server: Server, runs: Runs) -> None:
    run_id = (runs.run_dir / RUN_ID_FILE).read_text().strip()
    assert run_id == runs.run_id_first
    assert [step for step, _ in runs.loss_first] == [2, 4]
    after = loss_history(server, run_id)
    assert after[:2] == runs.loss_first  # what the first attempt logged stays
    assert [step for step, _ in after] == [2, 4, 6]  # the resumed steps appended


def test_secret_never_reaches_mlflow(server: Server, runs: Runs) -> None:
    run = MlflowClient(server.uri).get_run(runs.run_id_first)
    told = [run.info.run_name, *run.data.params.values(), *run.data.tags.values()]
    told += [*run.data.params, *run.data.tags]
    for sentinel in SENTINELS:
        assert not [t for t in told if sentinel in t], sentinel
    assert run.info.run_name == "***REDACTED***"
    assert run.data.tags["bigscale.group"] == "g-***REDACTED***"
    assert run.data.tags["bigscale.tags"] == "sft,***REDACTED***,***REDACTED***"
    assert run.data.params["logger.name"] == "***REDACTED***"
    files = [p for p in server.store.rglob("*") if p.is_file()]
    assert any(p.name == "store.db" for p in files)
    for sentinel in SENTINELS:
        leaked = [p for p in files if sentinel.encode() in p.read_bytes()]
        assert not leaked, (sentinel, leaked)


def test_unreachable_server_is_refused_before_any_rank(tmp_path: Path, bigscale_home: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = ["train", *QUICK, "logger.mlflow=true", f"logger.mlflow_tracking_uri={uri}"]
    proc = bigscale([*args, f"run_dir={tmp_path / 'run'}"], cwd=tmp_path, home=bigscale_home)
    assert_user_error(proc, f"logger.mlflow_tracking_uri={uri}: no MLflow server answers")
    assert not (tmp_path / "run" / "train.log").exists()  # no rank started


def test_missing_mlflow_names_the_extra(tmp_path: Path, bigscale_home: Path) -> None:
    # Python's own "not installed": a None entry in sys.modules makes both importlib's
    # find_spec and `import mlflow` fail as for a package that is absent.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\n")
    path = os.pathsep.join([str(shadow), env_for(bigscale_home).get("PYTHONPATH", "")])
    proc = bigscale(
        ["train", *QUICK, "logger.mlflow=true", f"run_dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        home=bigscale_home,
        extra_env={"PYTHONPATH": path},
    )
    assert_user_error(proc, "logger.mlflow=true needs the mlflow package", "bigscale[mlflow]")
    assert not (tmp_path / "run" / "train.log").exists()
