"""Remove secrets before a configuration or a log line leaves the process.

Applied to ``config.yaml`` in the run directory, the config sent to W&B, and the commands the
launcher prints. Keys are matched by name; values are matched by the shapes of common tokens, so
a key pasted into an unrelated field is caught too."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***REDACTED***"

# Exact key names: a looser pattern would hit legitimate keys such as `pad_token`.
_SECRET_KEY = re.compile(
    r"^(token|hf_token|access_token|auth_token|api_?key|.*_api_?key|secret|.*_secret|"
    r"password|passwd|credentials?)$",
    re.IGNORECASE,
)
_SECRET_VALUE = re.compile(
    r"(hf_[A-Za-z0-9]{30,}"  # Hugging Face tokens
    r"|sk-[A-Za-z0-9_-]{20,}"  # OpenAI-style keys
    r"|(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])"  # W&B API keys (40 hex)
    r"|(?:local|wandb)-[0-9a-f]{40,}"  # W&B server keys
    r"|gh[pousr]_[A-Za-z0-9]{30,})"  # GitHub tokens
)


# A 40-hex commit id is a legitimate value of these keys, though it looks like a W&B key.
_HEX_IDS_ALLOWED = {"revision"}


def redact_text(text: str) -> str:
    return _SECRET_VALUE.sub(REDACTED, text)


def redact(value: Any, key: str | None = None) -> Any:
    """A copy of a nested dict/list structure with secret-looking entries replaced."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if key is not None and _SECRET_KEY.match(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str) and key not in _HEX_IDS_ALLOWED:
        return redact_text(value)
    return value
