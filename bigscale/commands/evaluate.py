"""``bigscale eval TARGET --tasks ...``: EleutherAI's lm-evaluation-harness on a run directory,
a checkpoint or an export, with standard tasks by name (from the hub) or local task YAMLs
(``--include-path``, offline).

The harness loads the model itself (``--model hf``) from the directory the target resolves to,
a LoRA adapter through its ``peft`` argument, so the numbers are what ``lm_eval`` gives on the
export. Results go to ``RUN_DIR/eval/`` (JSON), a row in ``metrics.jsonl`` at the checkpoint's
step (keys ``harness/<task>/<metric>``), and the run's W&B run and TensorBoard files when it
logs there."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bigscale.errors import BigscaleError, ConfigError
from bigscale.train.harness_eval import PREFIX


class EvalError(BigscaleError):
    """The harness cannot run as asked: not installed, an unknown task."""


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bigscale eval")
    parser.add_argument("target", help="run directory, checkpoint directory or export")
    parser.add_argument("--tasks", required=True, help="comma-separated task or group names")
    parser.add_argument(
        "--include-path",
        action="append",
        default=[],
        help="a folder of task YAMLs (repeatable): local tasks that need no network",
    )
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None, help="examples per task (or share)")
    parser.add_argument("--batch-size", default="8", help="a number, or auto")
    parser.add_argument("--device", default=None, help="cuda, cuda:0, cpu (default: cuda if any)")
    parser.add_argument("--dtype", default="auto", help="auto (as saved), float32, bfloat16...")
    parser.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="prompt through the model's chat template (for chat-tuned runs)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default RUN_DIR/eval)"
    )
    ns = parser.parse_args(args)
    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one task name")
    from bigscale.target import check_dtype, resolve

    check_dtype(ns.dtype)
    manager = task_manager(ns.include_path, tasks)
    with resolve(Path(ns.target)) as target:
        model_args = {"pretrained": str(target.model_dir), "dtype": ns.dtype}
        if target.adapter_base is not None:
            model_args.update(
                pretrained=target.adapter_base,
                peft=str(target.model_dir),
                tokenizer=str(target.model_dir),  # the run's tokenizer, template included
            )
        results = _evaluate(ns, tasks, manager, model_args)
    scores = flat_scores(results["results"])
    out_dir = ns.out or (target.run_dir / "eval" if target.run_dir else Path(ns.target) / "eval")
    path = write_results(out_dir, results, target.step, str(ns.target))
    print(summary_table(scores))
    print(f"results: {path}", file=sys.stderr)
    if target.run_dir is not None and ns.out is None:
        log_to_run(target.run_dir, target.step, scores)
    return 0


def task_manager(include_path: list[str], tasks: list[str]) -> Any:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError(
            "bigscale eval needs EleutherAI's lm-evaluation-harness: pip install 'bigscale[eval]'"
        ) from None
    for folder in include_path:
        if not Path(folder).is_dir():
            raise ConfigError(f"--include-path {folder}: no such folder of task YAMLs")
    manager = TaskManager(include_path=include_path or None)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not manager.match_tasks([t])]
    if unknown:
        where = f" in {', '.join(include_path)} or" if include_path else ""
        raise EvalError(
            f"--tasks: no task named {', '.join(unknown)}{where} among lm-eval's tasks; "
            "list them with `lm-eval ls tasks`, or point --include-path at your task YAMLs"
        )
    return manager


def _evaluate(ns: argparse.Namespace, tasks: list[str], manager: Any, model_args: dict) -> dict:
    from lm_eval import simple_evaluate

    try:
        results = simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=tasks,
            num_fewshot=ns.num_fewshot,
            batch_size=ns.batch_size if ns.batch_size == "auto" else int(ns.batch_size),
            device=ns.device,
            limit=ns.limit if ns.limit is None or ns.limit < 1 else int(ns.limit),
            task_manager=manager,
            log_samples=False,
            apply_chat_template=ns.apply_chat_template,
        )
    except ConnectionError as exc:  # a task's dataset lives on the hub, which is out of reach
        raise EvalError(
            f"a task's data cannot be downloaded ({exc}); run where the hub is reachable, or "
            "use local task YAMLs (--include-path) whose data files are on disk"
        ) from None
    if results is None:  # only on non-zero ranks of a distributed harness run
        raise EvalError("lm-eval returned no results")
    return results


def flat_scores(results: dict[str, dict]) -> dict[str, float]:
    """``{"harness/<task>/<metric>[/<filter>]": value}`` for every numeric score (standard
    errors left out); lm-eval names scores ``metric,filter`` with ``none`` for no filter."""
    scores: dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            name = f"{PREFIX}/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")
            scores[name] = float(value)
    return scores


def write_results(out_dir: Path, results: dict, step: int | None, target: str) -> Path:
    from lm_eval.utils import handle_non_serializable

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    name = f"step_{step:08d}_{stamp}.json" if step is not None else f"{stamp}.json"
    kept = {
        k: results[k]
        for k in (
            "results",
            "groups",
            "configs",
            "versions",
            "n-shot",
            "higher_is_better",
            "n-samples",
        )
        if k in results
    }
    record = {"target": target, "step": step, **kept}
    path = out_dir / name
    path.write_text(json.dumps(record, indent=2, default=handle_non_serializable))
    return path


def summary_table(scores: dict[str, float]) -> str:
    width = max(len(k) for k in scores) if scores else 0
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in scores.items())


def log_to_run(run_dir: Path, step: int | None, scores: dict[str, float]) -> None:
    """The scores in the run's metrics.jsonl and, when the run logged to W&B, its W&B run."""
    from bigscale.config.compose import to_plain_dict
    from bigscale.config.schema import LoggerMode
    from bigscale.metrics.sinks import TENSORBOARD_DIR, JsonlSink, TensorBoardSink, WandbSink
    from bigscale.target import run_config

    row = {"step": step if step is not None else 0, **scores}
    path = run_dir / "metrics.jsonl"
    # Appended, nothing dropped: a resume at a later step keeps this row (its step is past).
    sink = JsonlSink(path, resumed_at=sys.maxsize)
    sink.log(row)
    sink.close()
    cfg = run_config(run_dir)
    if cfg is not None and cfg.logger.tensorboard:
        board = TensorBoardSink(run_dir / TENSORBOARD_DIR)
        board.log(row)
        board.close()
    if cfg is not None and cfg.logger.mlflow:
        from bigscale.metrics.mlflow_sink import MlflowSink

        tracker = MlflowSink(cfg.logger, run_dir, to_plain_dict(cfg))
        tracker.log(row)
        tracker.close()
    if cfg is None or cfg.logger.mode == LoggerMode.disabled:
        return
    wandb = WandbSink(cfg.logger, run_dir, to_plain_dict(cfg))
    # W&B drops a row whose step is behind the run's: the step goes in as a value instead.
    wandb.run.log({**scores, "harness/step": row["step"]})
    wandb.run.summary.update(scores)
    wandb.close()
