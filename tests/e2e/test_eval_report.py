"""After training, on one real 2-job sweep (full fine-tuning and LoRA, W&B offline):
``bigscale eval`` with local lm-eval tasks (offline) gives the numbers lm-eval's own CLI gives on
the exported model, and lands in the run; ``bigscale report`` draws the runs, checked in a real
headless Chromium and on matplotlib's figure."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli import bigscale, env_for, explain, metrics
from tests.e2e.test_multirun_and_entrypoints import SHORT
from tests.wandb_log import records

pytestmark = pytest.mark.e2e

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, bigscale_home: Path) -> list[Path]:
    """Two 4-step jobs on one rank each, evaluated every 2 steps, logging to offline W&B and
    TensorBoard; each writes its report.html at its end."""
    work = tmp_path_factory.mktemp("sweep")
    args = [o for o in SHORT if o != "logger=disabled"]
    args += ["logger.mode=offline", "logger.tensorboard=true", "trainer.eval_every=2"]
    args += ["launcher.nproc_per_node=1"]
    proc = bigscale(
        ["train", "-m", "finetune=full,lora", *args, f"run_dir={work / 'sweep'}"],
        cwd=work,
        home=bigscale_home,
    )
    assert proc.returncode == 0, explain(proc)
    jobs = sorted(p for p in (work / "sweep").iterdir() if (p / "config.yaml").is_file())
    assert [j.name.split("_", 1)[1] for j in jobs] == ["finetune=full", "finetune=lora"]
    return jobs


def write_tasks(folder: Path) -> list[str]:
    """A multiple-choice task and a generation task, each a YAML over a local jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    mc = [
        {"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b)], "answer": 0}
        for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (7, 2), (0, 3)]
    ]
    gen = [{"question": f"Say {w}:", "answer": w} for w in ("cat", "dog", "sun", "red")]
    for name, rows in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: {path}\n"
        "test_split: test\n"
        'doc_to_text: "{{{{question}}}}"\n'
    )
    (folder / "bs_mc.yaml").write_text(
        "task: bs_mc\n" + common.format(path=folder / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "bs_gen.yaml").write_text(
        "task: bs_gen\n"
        + common.format(path=folder / "gen.jsonl")
        + "output_type: generate_until\n"
        'doc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
        "filter_list:\n  - name: none\n    filter:\n      - function: take_first\n"
    )
    return ["bs_mc", "bs_gen"]


def lm_eval_cli(model_args: str, tasks: list[str], include: Path, out: Path, home: Path) -> dict:
    """lm-eval's own command line on a model directory: the reference numbers."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args]
    cmd += ["--tasks", ",".join(tasks), "--include_path", str(include), "--batch_size", "8"]
    cmd += ["--device", "cpu", "--output_path", str(out)]
    proc = subprocess.run(
        cmd, env={**env_for(home), **OFFLINE}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result,) = out.rglob("results_*.json")
    return json.loads(result.read_text())["results"]


def scores_of(results: dict) -> dict[str, float]:
    return {
        f"{task}/{key}": value
        for task, values in results.items()
        for key, value in values.items()
        if "," in key and "stderr" not in key and isinstance(value, (int, float))
    }


@pytest.mark.parametrize("job", [0, 1], ids=["full", "lora"])
def test_eval_matches_lm_eval_cli(
    sweep: list[Path], job: int, tmp_path: Path, bigscale_home: Path
) -> None:
    run_dir = sweep[job]
    tasks = write_tasks(tmp_path / "tasks")
    args = [
        "eval",
        str(run_dir),
        "--tasks",
        ",".join(tasks),
        "--include-path",
        str(tmp_path / "tasks"),
    ]
    proc = bigscale([*args, "--device", "cpu"], cwd=tmp_path, home=bigscale_home, extra_env=OFFLINE)
    assert proc.returncode == 0, explain(proc)
    (saved,) = (run_dir / "eval").glob("step_00000004_*.json")
    ours = json.loads(saved.read_text())
    assert ours["step"] == 4

    export = tmp_path / "export"
    proc = bigscale(
        ["export", str(run_dir), "--out", str(export)], cwd=tmp_path, home=bigscale_home
    )
    assert proc.returncode == 0, explain(proc)
    if job == 1:  # LoRA: the adapter alone was exported, lm-eval applies it with peft
        base = json.loads((export / "adapter_config.json").read_text())["base_model_name_or_path"]
        model_args = f"pretrained={base},peft={export},tokenizer={export}"
    else:
        model_args = f"pretrained={export}"
    theirs = lm_eval_cli(model_args, tasks, tmp_path / "tasks", tmp_path / "cli", bigscale_home)
    expected = scores_of(theirs)
    assert set(expected) >= {"bs_mc/acc,none", "bs_mc/acc_norm,none", "bs_gen/exact_match,none"}
    assert scores_of(ours["results"]) == expected

    # The scores in the run's own metrics at the checkpoint's step, and in its W&B run.
    (row,) = [r for r in metrics(run_dir) if "harness/bs_mc/acc" in r]
    assert row["step"] == 4
    assert row["harness/bs_mc/acc"] == expected["bs_mc/acc,none"]
    assert row["harness/bs_gen/exact_match"] == expected["bs_gen/exact_match,none"]
    logged = [
        {
            item.key or ".".join(item.nested_key): json.loads(item.value_json)
            for item in r.history.item
        }
        for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        for r in records(path)
        if r.WhichOneof("record_type") == "history"
    ]
    hits = [h for h in logged if "harness/bs_mc/acc" in h]
    assert hits and hits[-1]["harness/bs_mc/acc"] == expected["bs_mc/acc,none"], logged[-3:]
    assert tensorboard(run_dir, "harness/bs_mc/acc") == [(4, expected["bs_mc/acc,none"])]


def tensorboard(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """A scalar as TensorBoard's own reader reads the run's event files."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    board = EventMultiplexer().AddRunsFromDirectory(str(run_dir / "tensorboard"))
    board.Reload()
    return [
        (e.step, pytest.approx(e.value))
        for run in board.Runs()
        if tag in board.Runs()[run]["scalars"]
        for e in board.Scalars(run, tag)
    ]


def test_tensorboard_holds_the_run(sweep: list[Path]) -> None:
    for run_dir in sweep:
        rows = [r for r in metrics(run_dir) if "loss" in r]
        assert tensorboard(run_dir, "loss") == [(r["step"], r["loss"]) for r in rows]
        evals = [r for r in metrics(run_dir) if "eval_loss" in r]
        assert tensorboard(run_dir, "eval_loss") == [(r["step"], r["eval_loss"]) for r in evals]


def test_eval_names_an_unknown_task(sweep: list[Path], tmp_path: Path, bigscale_home: Path) -> None:
    tasks = write_tasks(tmp_path / "tasks")
    proc = bigscale(
        [
            "eval",
            str(sweep[0]),
            "--tasks",
            f"{tasks[0]},no_such_task",
            "--include-path",
            str(tmp_path / "tasks"),
        ],
        cwd=tmp_path,
        home=bigscale_home,
        extra_env=OFFLINE,
    )
    assert proc.returncode == 2, explain(proc)
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --tasks: no task named no_such_task")
    )
    assert "Traceback" not in proc.stderr


def screenshot(page: Path, out: Path, profile: Path) -> np.ndarray:
    """The page as a real headless Chromium renders it (RGB, 0-255)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed (apt-get install chromium)"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--no-first-run",
           f"--user-data-dir={profile}", f"--screenshot={out}", "--window-size=1400,2400",
           "--hide-scrollbars", page.as_uri()]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.is_file(), proc.stderr[-3000:]
    from PIL import Image

    return np.asarray(Image.open(out).convert("RGB")).astype(int)


def color_pixels(image: np.ndarray, rgba: tuple) -> int:
    """Pixels within a small distance of a line color (antialiasing blends the edges)."""
    target = np.array([round(c * 255) for c in rgba[:3]])
    return int((np.abs(image - target).sum(axis=2) < 40).sum())


def test_each_run_wrote_its_report(sweep: list[Path], tmp_path: Path) -> None:
    from bigscale.report.plots import run_colors

    run_dir = sweep[0]
    page = run_dir / "report.html"
    assert page.is_file() and (run_dir / "report.png").is_file()
    text = page.read_text()
    assert "data:image/png;base64," in text and "http" not in text.replace(page.as_uri(), "")
    image = screenshot(page, tmp_path / "one.png", tmp_path / "profile")
    # One run: its curves in the first color, many pixels of it (lines over several panels).
    (color,) = run_colors(1)
    assert color_pixels(image, color) > 2000


def test_report_on_a_sweep(sweep: list[Path], tmp_path: Path, bigscale_home: Path) -> None:
    from bigscale.report.plots import FIXED_PANELS, GENERATION_TITLE, build_figure, run_colors
    from bigscale.report.runs import read_runs

    out = tmp_path / "report"
    proc = bigscale(
        ["report", str(sweep[0].parent), "--out", str(out)], cwd=tmp_path, home=bigscale_home
    )
    assert proc.returncode == 0, explain(proc)
    text = (out / "report.html").read_text()
    # The settings that differ: the fine-tuning method, not the run directory.
    assert "<td>finetune.method</td><td>full</td><td>lora</td>" in text, text[-3000:]
    assert "<td>run_dir</td>" not in text

    image = screenshot(out / "report.html", tmp_path / "sweep.png", tmp_path / "profile")
    for color in run_colors(2):  # both runs drawn, each in its own color
        assert color_pixels(image, color) > 1000, color

    # The figure: a panel for each quantity the runs logged, every line with points. The
    # harness scores `bigscale eval` added (when its test ran first) get a panel of their own.
    runs = read_runs(sweep)
    fig = build_figure(runs)
    titles = [ax.get_title() for ax in fig.axes]
    evaluated = any(k.startswith("harness/") for run in runs for row in run.rows for k in row)
    expected = [p.title for p in FIXED_PANELS] + ([GENERATION_TITLE] if evaluated else [])
    assert titles == expected, titles
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len(lines) >= (1 if ax.get_title() == GENERATION_TITLE else 2), ax.get_title()
        assert all(len(line.get_xdata()) >= 1 for line in lines)
    loss = fig.axes[0]
    labels = {line.get_label() for line in loss.get_lines()}
    assert labels == {f"{job.name}: {key}" for job in sweep for key in ("loss", "eval_loss")}
    assert all(list(line.get_xdata()) == [2, 4] for line in loss.get_lines())
