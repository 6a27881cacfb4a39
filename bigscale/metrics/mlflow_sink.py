"""``logger.mlflow=true``: the run's metrics in an MLflow run, through ``mlflow.MlflowClient``.

The client, not MLflow's fluent ``mlflow.start_run``: the fluent API keeps a process-global
active run and tags it from its surroundings (the command line as ``mlflow.source.name``, the
user, the git commit), which would carry an override's secret past redaction. Here the run gets
exactly what is listed below, all of it redacted by ``bigscale.config.redact`` as W&B's is.

Importing this module does not import mlflow (the launcher runs its checks before any rank)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bigscale.config.redact import redact, redact_text
from bigscale.config.schema import LoggerConfig
from bigscale.errors import ConfigError
from bigscale.logging import get_logger

log = get_logger(__name__)

RUN_ID_FILE = "mlflow_run_id"
"""The MLflow run id, in the run directory: a resumed or requeued run logs into the same run."""
DEFAULT_STORE = "mlflow.db"
INSTALL = "pip install 'bigscale[mlflow]'"
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_\-. /]+$")
_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call


def tracking_uri(cfg: LoggerConfig, run_dir: Path) -> str:
    if cfg.mlflow_tracking_uri:
        return cfg.mlflow_tracking_uri
    return f"sqlite:///{(run_dir / DEFAULT_STORE).resolve()}"


def check_installed(cfg: LoggerConfig) -> None:
    """Validation (launcher and every rank): the package is there, or one line says which extra
    to install."""
    if cfg.mlflow and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"logger.mlflow=true needs the mlflow package: {INSTALL}")


def check_reachable(cfg: LoggerConfig, timeout_s: float = 5.0) -> None:
    """Before any rank starts: an http(s) tracking server answers at all (any HTTP status will
    do, a proxy's 401 included); a refused or timed-out connection is a mistyped URI or a
    server that is down, better said now than after the model has loaded."""
    uri = cfg.mlflow_tracking_uri
    if not cfg.mlflow or not uri or not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"logger.mlflow_tracking_uri={redact_text(uri)}: no MLflow server answers there "
            f"({reason}); start one (mlflow server --host ... --port ...), fix the URI, or leave "
            "it null for a local store in the run directory"
        ) from None


class MlflowSink:
    """One MLflow run per bigscale run (rank 0 only). A resumed run reopens the run whose id
    the run directory keeps and appends the steps it trains; MLflow keeps every point it was
    sent, so steps a killed attempt logged after the checkpoint stay in its history beside the
    resumed ones (metrics.jsonl and TensorBoard drop them)."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any]):
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise ConfigError(f"logger.mlflow=true needs the mlflow package: {INSTALL}") from None
        self.uri = tracking_uri(cfg, run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        self._failed = False
        experiment_id = self._experiment(cfg, run_dir)
        id_file = run_dir / RUN_ID_FILE
        self.run_id = self._reopen(id_file)
        params = _flatten(redact(config))
        if self.run_id is None:
            tags = {
                "bigscale.run_dir": redact_text(run_dir.name),
                "bigscale.tags": ",".join(redact(list(cfg.tags), "tags", "logger.tags")),
            }
            group = redact(cfg.group, "group", "logger.group")
            if group:
                tags["bigscale.group"] = group
            name = redact(cfg.name, "name", "logger.name") or redact_text(run_dir.name)
            run = self.client.create_run(experiment_id, run_name=name, tags=tags)
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id + "\n")
        else:
            # Params cannot change once logged; a resume with other settings (max_steps, say)
            # keeps the first value and adds only keys the run lacks.
            logged = self.client.get_run(self.run_id).data.params
            params = {k: v for k, v in params.items() if k not in logged}
        self._log_params(params)
        log.info("mlflow: run %s at %s", self.run_id, redact_text(self.uri))

    def _experiment(self, cfg: LoggerConfig, run_dir: Path) -> str:
        name = redact(
            cfg.mlflow_experiment or cfg.project, "experiment", "logger.mlflow_experiment"
        )
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # The default store's artifacts stay in the run directory, not in the working directory.
        where = None if cfg.mlflow_tracking_uri else (run_dir / "mlartifacts").resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=where)

    def _reopen(self, id_file: Path) -> str | None:
        if not id_file.is_file():
            return None
        run_id = id_file.read_text().strip()
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            log.warning(
                "mlflow: run %s (from %s) is not in %s; starting a new MLflow run",
                run_id,
                id_file,
                redact_text(self.uri),
            )
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH])

    def log(self, row: dict[str, Any]) -> None:
        if self._failed:
            return
        from mlflow.entities import Metric

        step, now = int(row.get("step", 0)), int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, step)
            for key, value in row.items()
            if key != "step"
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and _METRIC_NAME.match(key)
        ]
        if not metrics:
            return
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as exc:  # a server gone mid-run must not end the training
            self._failed = True
            log.warning(
                "mlflow: logging failed at step %d (%s); not logging to MLflow for the rest of "
                "this run (metrics.jsonl has every row)",
                step,
                redact_text(str(exc))[:300],
            )

    def close(self) -> None:
        if not self._failed:
            try:
                self.client.set_terminated(self.run_id, status="FINISHED")
            except Exception as exc:
                log.warning("mlflow: could not close run %s (%s)", self.run_id, exc)


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys and text values, as MLflow's params are; values past MLflow's length limit
    are cut."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    if isinstance(node, dict) and node:
        out: dict[str, str] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    text = node if isinstance(node, str) else json.dumps(node, default=str)
    return {prefix: text[:MAX_PARAM_VAL_LENGTH]}
