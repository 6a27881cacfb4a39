from __future__ import annotations

from bigscale.config.redact import REDACTED, redact, redact_text


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


def test_commit_revision_is_kept() -> None:
    sha = "a" * 40
    assert redact({"revision": sha}) == {"revision": sha}
