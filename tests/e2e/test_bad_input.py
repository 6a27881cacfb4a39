"""Bad input fails the way a user can act on: exit code 2, one ``error:`` line on stderr that
names the problem, no traceback, and nothing trained. Most mistakes are caught by the launcher
before any rank starts; a dataset that tokenization empties is found inside the ranks."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli import QUICK, bigscale, explain, torchrun, train_rows

pytestmark = pytest.mark.e2e

TIMEOUT = 180  # a hang (say, one rank waiting on another that died) fails instead of blocking


def assert_user_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2, exactly one ``error:`` line, no traceback; returns the message (from ``error:``
    to the end of stderr, as some messages continue on further lines)."""
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, explain(proc)
    message = proc.stderr[proc.stderr.index("error:") :]
    for fragment in fragments:
        assert fragment in message, explain(proc)
    return message


def write_jsonl(path: Path, rows: list[dict], broken_line: int | None = None) -> Path:
    lines = [json.dumps(row) for row in rows]
    if broken_line is not None:
        lines[broken_line - 1] = lines[broken_line - 1][:-5]  # cut off mid-object
    path.write_text("\n".join(lines) + "\n")
    return path


def pairs(n: int = 10, response: str | None = None) -> list[dict]:
    return [{"prompt": f"{i}+1=", "response": response or str(i + 1)} for i in range(n)]


def sft_files(path: Path) -> list[str]:
    return [
        "model=tiny",  # an own run names its model too: the demo's is left out with it
        "data=sft_files",
        f"data.path={path}",
        "data.validation_fraction=0.2",
        "data.test_path=null",
        "logger=disabled",
    ]


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        pytest.param(
            ["trainer.max_stepz=5"],
            ["trainer.max_stepz", "did you mean max_steps"],
            id="unknown-key",
        ),
        pytest.param(
            ["trainer.micro_batch_size=abc"],
            ["trainer.micro_batch_size", "'abc'", "could not be converted to Integer"],
            id="wrong-type",
        ),
        pytest.param(
            ["trainer.global_batch_size=100"],
            ["impossible batch math", "trainer.global_batch_size=100", "x 2 data-parallel ranks"],
            id="batch-math",
        ),
        pytest.param(
            [
                "experiment=arithmetic",
                "model.name_or_path=/nonexistent/model",
                "model.create_if_missing=null",
            ],
            ["model.name_or_path=/nonexistent/model does not exist"],
            id="missing-model",
        ),
        pytest.param(
            ["data.chat_template=chatmel"],
            ["data.chat_template='chatmel'", "one of chatml, llama3, zephyr, alpaca"],
            id="unknown-chat-template",
        ),
        pytest.param(
            ["optim.lr=nan"],
            ["optim.lr=nan is not a finite number", "allowed: a positive number"],
            id="lr-nan",
        ),
        pytest.param(
            ["optim.lr=inf"],
            ["optim.lr=inf is not a finite number", "allowed: a positive number"],
            id="lr-inf",
        ),
        pytest.param(
            ["optim.beta2=1.0"],
            ["optim.beta2=1 must be in [0, 1)"],
            id="beta2-out-of-range",
        ),
        pytest.param(
            ["eval.metric_fn=no_such_metrics:score"],
            ["eval.metric_fn='no_such_metrics:score'", "cannot import module 'no_such_metrics'"],
            id="metric-fn-import",
        ),
    ],
)
def test_config_error(
    overrides: list[str], fragments: list[str], tmp_path: Path, bigscale_home: Path
) -> None:
    run_dir = tmp_path / "run"
    proc = bigscale(
        ["train", *overrides, f"run_dir={run_dir}"], tmp_path, bigscale_home, timeout=TIMEOUT
    )
    assert_user_error(proc, *fragments)
    assert not run_dir.exists(), "a pre-flight error must not create the run directory"


def test_malformed_json_line(tmp_path: Path, bigscale_home: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", pairs(), broken_line=3)
    run_dir = tmp_path / "run"
    proc = bigscale(
        ["train", *sft_files(data), f"run_dir={run_dir}"], tmp_path, bigscale_home, TIMEOUT
    )
    assert_user_error(proc, f"{data}:3:", "malformed JSON")
    assert not run_dir.exists(), "a pre-flight error must not create the run directory"


def test_missing_field_lists_columns(tmp_path: Path, bigscale_home: Path) -> None:
    rows = [{"question": r["prompt"], "answer": r["response"]} for r in pairs()]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    run_dir = tmp_path / "run"
    proc = bigscale(
        ["train", *sft_files(data), f"run_dir={run_dir}"], tmp_path, bigscale_home, TIMEOUT
    )
    assert_user_error(
        proc,
        "data.prompt_field='prompt' is not a column of",
        str(data),
        "columns found: ['question', 'answer']",
    )
    assert not run_dir.exists(), "a pre-flight error must not create the run directory"


@pytest.mark.parametrize("nproc", [1, 2])
def test_dataset_empty_after_filtering(nproc: int, tmp_path: Path, bigscale_home: Path) -> None:
    """Every response is longer than max_length and overlong examples are dropped: only
    tokenization, inside the ranks, can tell. On 2 ranks the other rank must not hang waiting for
    rank 0, and the message is printed once, not once per rank."""
    data = write_jsonl(tmp_path / "train.jsonl", pairs(response="x" * 40))
    run_dir = tmp_path / "run"
    overrides = [
        *sft_files(data),
        "data.overlong=drop",
        "data.max_length=8",
        f"launcher.nproc_per_node={nproc}",
        f"run_dir={run_dir}",
    ]
    proc = bigscale(["train", *overrides], tmp_path, bigscale_home, TIMEOUT)
    assert_user_error(
        proc, "dataset is empty after filtering", "longer than data.max_length=8", "data.overlong"
    )
    assert proc.stderr.count("empty after filtering") == 1, explain(proc)
    assert not (run_dir / "metrics.jsonl").exists()


def test_demo_preset_never_touches_a_user_data_file(tmp_path: Path, bigscale_home: Path) -> None:
    """`data.path=` under an experiment that keeps its generated-data preset (arithmetic): the
    preset must refuse the user's path, not write the task over it."""
    corpus = write_jsonl(tmp_path / "MY_CORPUS.jsonl", [{"body": f"line {i}"} for i in range(5)])
    before = corpus.read_bytes()
    run_dir = tmp_path / "run"
    overrides = ["experiment=arithmetic", f"data.path={corpus}", "data.text_field=body"]
    overrides.append(f"run_dir={run_dir}")
    proc = bigscale(["train", *overrides], tmp_path, bigscale_home, TIMEOUT)
    assert_user_error(proc, f"data.path={corpus}", "data=arithmetic", "data=text_files")
    assert corpus.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MY_CORPUS.jsonl"]


def test_mistyped_model_path_is_an_error_not_a_new_model(
    tmp_path: Path, bigscale_home: Path
) -> None:
    typo = tmp_path / "path" / "to" / "typo"
    run_dir = tmp_path / "run"
    overrides = ["experiment=arithmetic", f"model.name_or_path={typo}", f"run_dir={run_dir}"]
    proc = bigscale(["train", *overrides], tmp_path, bigscale_home, TIMEOUT)
    assert_user_error(proc, f"model.name_or_path={typo} does not exist")
    assert not (tmp_path / "path").exists() and not run_dir.exists()


def test_directory_without_config_json(tmp_path: Path, bigscale_home: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.txt").write_text("not a model")
    run_dir = tmp_path / "run"
    overrides = [f"model.name_or_path={folder}", "data=arithmetic", f"run_dir={run_dir}"]
    proc = bigscale(["train", *overrides], tmp_path, bigscale_home, TIMEOUT)
    assert_user_error(proc, f"model.name_or_path={folder} is a directory without config.json")
    assert [p.name for p in folder.iterdir()] == ["weights.txt"] and not run_dir.exists()


def test_non_utf8_bytes_named_by_line_and_offset(tmp_path: Path, bigscale_home: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", pairs())
    lines = data.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b"+1=", b"+1=\xe9")  # latin-1 for "é": not UTF-8
    data.write_bytes(b"".join(lines))
    offset = sum(len(line) for line in lines[:3]) + lines[3].index(b"\xe9")
    run_dir = tmp_path / "run"
    proc = bigscale(
        ["train", *sft_files(data), f"run_dir={run_dir}"], tmp_path, bigscale_home, TIMEOUT
    )
    assert_user_error(proc, f"{data}:4: byte offset {offset} ", "not UTF-8")
    assert not run_dir.exists(), "a pre-flight error must not create the run directory"


def test_date_strings_train_as_text(tmp_path: Path, bigscale_home: Path) -> None:
    """Responses that are all ISO dates: read as the strings written, through the ranks."""
    rows = [{"prompt": f"day {i}?", "response": f"2036-10-{i + 1:02d}"} for i in range(28)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    run_dir = tmp_path / "run"
    overrides = [
        *QUICK,
        *sft_files(data),
        "trainer.max_steps=2",
        "trainer.micro_batch_size=2",
        "trainer.grad_accum=1",
        "trainer.log_every=1",
        "optim.warmup_steps=0",
        "checkpoint.every_steps=0",
        "export.at_end=false",
        "launcher.nproc_per_node=1",
        f"run_dir={run_dir}",
    ]
    proc = bigscale(["train", *overrides], tmp_path, bigscale_home, TIMEOUT)
    assert proc.returncode == 0, explain(proc)
    assert "datetime" not in proc.stderr, explain(proc)
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2]


def test_own_torchrun_rank_refuses_the_demo_preset_on_a_user_file(
    tmp_path: Path, bigscale_home: Path
) -> None:
    """Ranks started by a user's own torchrun run the same check before joining the group:
    every rank stops, the message appears once, and the file is unchanged."""
    corpus = write_jsonl(tmp_path / "MY_CORPUS.jsonl", [{"body": f"line {i}"} for i in range(5)])
    before = corpus.read_bytes()
    args = ["experiment=arithmetic", f"data.path={corpus}", "data.text_field=body"]
    args.append(f"run_dir={tmp_path / 'run'}")
    proc = torchrun(2, args, tmp_path, bigscale_home, timeout=TIMEOUT)
    assert proc.returncode != 0, explain(proc)
    assert proc.stderr.count(f"error: data.path={corpus} is outside") == 1, explain(proc)
    assert "data=text_files" in proc.stderr
    assert corpus.read_bytes() == before


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only filesystem (a tmpfs mounted ``ro``): unlike ``chmod``, it stops root too."""
    where = tmp_path / "read-only"
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root): {proc.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_run_dir(read_only_dir: Path, tmp_path: Path, bigscale_home: Path) -> None:
    run_dir = read_only_dir / "run"
    proc = bigscale(["train", f"run_dir={run_dir}"], tmp_path, bigscale_home, timeout=TIMEOUT)
    assert_user_error(
        proc,
        f"run_dir={run_dir} is not writable: Read-only file system",
        "remount it read-write or set run_dir to a writable directory",
    )
