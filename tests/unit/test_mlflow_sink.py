"""``logger.mlflow=true`` with the default store (SQLite in the run directory), read back with
MLflow's own client: the scalars at their steps, one run that a resume continues, the config as
redacted params."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from bigscale.config.redact import REDACTED
from bigscale.config.schema import LoggerConfig, LoggerMode
from bigscale.metrics.mlflow_sink import RUN_ID_FILE, tracking_uri
from bigscale.metrics.sinks import MetricsLogger


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_default_store_holds_one_run_that_a_resume_continues(tmp_path: Path) -> None:
    cfg = LoggerConfig(mode=LoggerMode.disabled, mlflow=True, tags=["sft"])
    config = {"optim": {"lr": 0.001}, "logger": {"token": "plain-looking-secret"}, "steps": [1, 2]}
    first = MetricsLogger(tmp_path, cfg, config, is_main=True)
    for step in (1, 2):
        first.log({"step": step, "loss": 10.0 - step, "note": "not a number"})
    first.close()
    run_id = (tmp_path / RUN_ID_FILE).read_text().strip()

    resumed = MetricsLogger(tmp_path, cfg, {**config, "extra": 5}, is_main=True, resumed_at=2)
    resumed.log({"step": 3, "loss": 1.5, "harness/bs_mc/acc": 0.5})
    resumed.close()
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == run_id

    assert tracking_uri(cfg, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri(cfg, tmp_path))
    (experiment,) = [e for e in client.search_experiments() if e.name == "bigscale"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert history(client, run_id, "loss") == [(1, 9.0), (2, 8.0), (3, 1.5)]
    assert history(client, run_id, "harness/bs_mc/acc") == [(3, 0.5)]
    assert run.data.params["optim.lr"] == "0.001"
    assert run.data.params["steps"] == "[1, 2]"
    assert run.data.params["logger.token"] == REDACTED  # a secret-named key, as W&B gets it
    assert run.data.params["extra"] == "5"  # the resume added the key the run lacked
    assert run.data.tags["bigscale.tags"] == "sft"
    assert not (Path.cwd() / "mlruns").exists()
