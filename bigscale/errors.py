"""User-facing errors: each carries one message that names the problem and the fix.

The CLI and the rank entry print these without a traceback and exit with ``exit_code``."""

from __future__ import annotations


class BigscaleError(Exception):
    """Base class for errors caused by the user's input rather than a bug."""

    exit_code = 2


class ConfigError(BigscaleError):
    """The composed configuration is invalid (unknown key, wrong type, impossible batch math)."""


class DataError(BigscaleError):
    """The dataset cannot be used as configured (missing file, malformed line, missing field)."""


class ModelError(BigscaleError):
    """The model or tokenizer cannot be loaded as configured."""


class CheckpointError(BigscaleError):
    """No usable checkpoint where one was required, or one that must not be resumed."""


class LaunchError(BigscaleError):
    """The launch itself cannot happen here (no ``sbatch`` on PATH, a submission refused)."""


class DivergenceError(BigscaleError):
    """Training went numerically wrong (too many non-finite steps, a loss spike under
    ``policy=stop``, non-finite weights): stop before anything bad is saved."""

    exit_code = 3
