"""Remove secrets before a configuration or a log line leaves the process.

Applied to ``config.yaml`` in the run directory, everything sent to W&B (config, name, group,
tags, the command line it records), ``train.log``, the printed plan and command, and the rendered
sbatch script. A secret is recognised three ways, because a key's name says little (a token
pasted into ``logger.tags`` is still a token):

- by origin: a config value that came from ``${oc.env:VAR}``, unless ``VAR`` is one of
  ``NON_SECRET_ENV`` (paths bigscale's own presets build from ``BIGSCALE_HOME``). Composition
  reports these with ``remember_env_values``; the key is redacted in the config and the value
  wherever it appears in text.
- by the environment: the value of any variable whose name looks secret (``*_KEY``,
  ``*_TOKEN``, ``*_SECRET``, ``*PASSWORD*``...; ``WANDB_API_KEY`` and ``HF_TOKEN`` included),
  read when redacting, so a token exported for W&B and also pasted into an override is caught.
- by shape: known token prefixes (``sk-``, ``hf_``, ``ghp_``, ``xoxb-``, ``AKIA``, ``wandb-``...)
  and 40-hex W&B keys, and by key name (``api_key``, ``token``, ``password``...).

A secret that has none of these marks (a bare random string typed into an override) cannot be
told from data; pass it through ``${oc.env:VAR}`` instead."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from typing import Any

REDACTED = "***REDACTED***"

NON_SECRET_ENV = frozenset({"BIGSCALE_HOME", "HOME", "USER", "TMPDIR"})
"""Variables whose ``${oc.env:...}`` values stay readable: the presets put data and model paths
under ``${oc.env:BIGSCALE_HOME,.cache/bigscale}``, and a path hidden from config.yaml would make
the run directory useless for finding what was trained on."""

_MIN_ENV_SECRET = 8
"""Shortest value of a secret-named variable that is redacted: shorter ones (``1``, ``true``)
would blank out unrelated numbers and words in every log line, and are no real credential."""
_MIN_CONFIG_SECRET = 4
"""Shortest ``${oc.env:...}`` value replaced inside text; the config key itself is redacted
whatever its length."""

# Exact key names: a looser pattern would hit legitimate keys such as `pad_token`.
_SECRET_KEY = re.compile(
    r"^(token|hf_token|access_token|auth_token|api_?key|.*_api_?key|secret|.*_secret|"
    r"password|passwd|credentials?)$",
    re.IGNORECASE,
)
_SECRET_ENV_NAME = re.compile(
    r"(_KEY|_TOKEN|_SECRET|_PASS|_PASSWD|_CREDENTIALS?)$|PASSWORD|^(WANDB_API_KEY|HF_TOKEN)$",
    re.IGNORECASE,
)
# A prefix alone is not distinctive where words share it ("hf_transfer", "wandb-summary",
# "sk-SK"): such a body must also look random (a digit or an upper-case letter) and have 8+
# characters. The short prefixes only count at the start of a word.
_RANDOM_BODY = r"(?=[A-Za-z0-9_-]*[0-9A-Z])[A-Za-z0-9_-]{8,}"
_SECRET_VALUE = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    rf"hf_{_RANDOM_BODY}"  # Hugging Face
    rf"|sk-{_RANDOM_BODY}"  # OpenAI-style (sk-proj-..., sk-live-...)
    r"|gh[pousr]_[A-Za-z0-9]{8,}|github_pat_[A-Za-z0-9_]{8,}"  # GitHub
    rf"|wandb-{_RANDOM_BODY}|wandb_v\d+_[A-Za-z0-9_]{{8,}}"  # W&B
    r"|xox[abpors]-[A-Za-z0-9-]{8,}"  # Slack
    r"|(?:AKIA|ASIA)[0-9A-Z]{12,}"  # AWS access key ids
    r"|local-[0-9a-f]{40,}"  # W&B server keys
    r")"
    r"|(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])"  # W&B API keys (40 hex)
)
_OC_ENV = re.compile(r"\$\{oc\.env:\s*['\"]?([A-Za-z_][A-Za-z0-9_]*)")

# A 40-hex commit id is a legitimate value of these keys, though it looks like a W&B key.
_HEX_IDS_ALLOWED = {"revision"}

_env_keys: set[str] = set()
_env_values: set[str] = set()


def secret_env_names(text: str) -> list[str]:
    """The variables ``${oc.env:VAR...}`` interpolations in ``text`` read, allowed ones left out."""
    return [name for name in _OC_ENV.findall(text) if name not in NON_SECRET_ENV]


def remember_env_values(keys: Iterable[str], values: Iterable[str]) -> None:
    """Record config keys (dotted, list items by index: ``logger.tags.0``) whose value came from
    a secret ``${oc.env:...}``, and the values themselves. Kept for the life of the process:
    every rank and the launcher compose the config themselves, so each records its own."""
    _env_keys.update(keys)
    _env_values.update(v for v in values if len(v) >= _MIN_CONFIG_SECRET)


def secret_values() -> set[str]:
    """Every known secret value: from ``${oc.env:...}`` and from secret-named variables."""
    from_env = {
        value
        for name, value in os.environ.items()
        if _SECRET_ENV_NAME.search(name) and len(value) >= _MIN_ENV_SECRET
    }
    return from_env | _env_values


@functools.lru_cache(maxsize=8)
def _values_pattern(values: frozenset[str]) -> re.Pattern[str]:
    # Longest first, so a secret containing another is replaced whole.
    return re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)))


def redact_text(text: str) -> str:
    """``text`` with every known secret value and token-shaped word replaced by REDACTED."""
    values = secret_values()
    if values:
        text = _values_pattern(frozenset(values)).sub(REDACTED, text)
    return _SECRET_VALUE.sub(REDACTED, text)


def redact(value: Any, key: str | None = None, path: str = "") -> Any:
    """A copy of a nested dict/list structure (a plain config) with secrets replaced: keys with
    secret names, keys whose value came from a secret environment variable, and secret values
    anywhere. The one function behind config.yaml and the config W&B receives."""
    if path in _env_keys and value not in (None, ""):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k), f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, None, f"{path}.{i}") for i, v in enumerate(value))
    if key is not None and _SECRET_KEY.match(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str) and key not in _HEX_IDS_ALLOWED:
        return redact_text(value)
    return value
