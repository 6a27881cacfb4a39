"""``bigscale chat`` in a real terminal (tmux) and ``bigscale generate`` on files, on a tiny
model that memorised two answers through a template whose end-of-turn marker it spells in
characters: replies must end at that text marker and never show the template."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli import bigscale, env_for, explain
from tests.text_markers import MARKER, ROWS, memorised_model, text_marker_tokenizer, write_test_set

pytestmark = pytest.mark.e2e

TEMPLATE_PIECES = ("<start_of_turn>", "<end_of_turn>", "<s>", "</s>", "<pad>", "<|im_")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The memorised model saved as a plain Hugging Face directory (what an export is)."""
    tmp = tmp_path_factory.mktemp("memorised")
    tokenizer = text_marker_tokenizer(tmp / "tokenizer")
    model = memorised_model(tokenizer, write_test_set(tmp))
    out = tmp / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_generate_answers_prompts_and_conversations(
    model_dir: Path, tmp_path: Path, bigscale_home: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": q, "id": i}) + "\n" for i, (q, _) in enumerate(ROWS))
    )
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q, _ in ROWS)
    )
    for source in (prompts, chats):
        out = tmp_path / f"{source.stem}.out.jsonl"
        # Batch of 2 with left padding: the rows have different lengths.
        proc = bigscale(
            [
                "generate",
                str(model_dir),
                "--prompts",
                str(source),
                "--out",
                str(out),
                "--temperature",
                "0",
                "--max-new-tokens",
                "40",
                "--batch-size",
                "2",
            ],
            cwd=tmp_path,
            home=bigscale_home,
        )
        assert proc.returncode == 0, explain(proc)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["answer"] for r in rows] == [a for _, a in ROWS], rows
        assert all(r["ended"] for r in rows), rows
        if source is prompts:
            assert [r["id"] for r in rows] == [0, 1]  # input fields are kept


def test_generate_refuses_a_bad_prompts_file(
    model_dir: Path, tmp_path: Path, bigscale_home: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"question": "no prompt key"}\n')
    proc = bigscale(
        ["generate", str(model_dir), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")],
        cwd=tmp_path,
        home=bigscale_home,
    )
    assert proc.returncode == 2, explain(proc)
    assert proc.stderr.strip().startswith(f"error: {bad}:2:"), proc.stderr
    assert "Traceback" not in proc.stderr


class Tmux:
    """A real terminal: tmux on its own socket, keys sent and the screen read back."""

    def __init__(self, socket: Path):
        self.base = ["tmux", "-S", str(socket)]

    def __call__(self, *args: str) -> str:
        return subprocess.run(
            [*self.base, *args], capture_output=True, text=True, check=True
        ).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-J", "-S", "-200", "-t", "chat")

    def wait_for(self, predicate, what: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            assert time.monotonic() < deadline, f"no {what} on the screen:\n{screen}"
            time.sleep(0.2)


def test_chat_in_a_terminal(model_dir: Path, tmp_path: Path, bigscale_home: Path) -> None:
    assert shutil.which("tmux"), "tmux is not installed (apt-get install tmux)"
    tmux = Tmux(tmp_path / "tmux.sock")
    env = env_for(bigscale_home)
    done = tmp_path / "exit_code"
    command = (
        f"{sys.executable} -m bigscale.cli chat {model_dir} --temperature 0 --max-new-tokens 40;"
        f" echo $? > {done}"
    )
    env_args = [
        a
        for k in ("PYTHONPATH", "BIGSCALE_HOME", "HOME", "PATH")
        if k in env
        for a in ("-e", f"{k}={env[k]}")
    ]
    tmux(
        "new-session",
        "-d",
        "-s",
        "chat",
        "-x",
        "200",
        "-y",
        "50",
        *env_args,
        "-c",
        str(Path.cwd()),
        command,
    )
    try:
        tmux.wait_for(lambda s: s.rstrip().endswith("you>"), "prompt")
        tmux("send-keys", "-t", "chat", ROWS[0][0], "Enter")
        first = tmux.wait_for(lambda s: s.count("you>") == 2, "first reply")
        assert f"bot> {ROWS[0][1]}\n" in first, first
        # The second turn continues the conversation (the first is in the prompt): whatever the
        # model says, the reply is shown without the template and the terminal asks again.
        tmux("send-keys", "-t", "chat", ROWS[1][0], "Enter")
        second = tmux.wait_for(lambda s: s.count("you>") == 3, "second reply")
        tmux("send-keys", "-t", "chat", "/reset", "Enter")
        tmux.wait_for(lambda s: "(new conversation)" in s and s.count("you>") == 4, "reset")
        # After /reset the question is asked afresh: the memorised answer, as in a new chat.
        tmux("send-keys", "-t", "chat", ROWS[1][0], "Enter")
        third = tmux.wait_for(lambda s: s.count("you>") == 5, "reply after reset")
        assert f"(new conversation)\nyou> {ROWS[1][0]}\nbot> {ROWS[1][1]}\n" in third, third
        for piece in TEMPLATE_PIECES:
            assert piece not in third, (piece, third)
        assert MARKER not in second
        tmux("send-keys", "-t", "chat", "/quit", "Enter")
        deadline = time.monotonic() + 60
        while not done.is_file():
            assert time.monotonic() < deadline, tmux.screen()
            time.sleep(0.2)
        assert done.read_text().strip() == "0"
    finally:
        subprocess.run([*tmux.base, "kill-server"], capture_output=True, check=False)
