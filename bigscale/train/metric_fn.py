"""A user's own generation metric: ``eval.metric_fn: "package.module:function"``.

The function gets the generated answers and the references (two lists of strings, in the
held-out file's order) and returns a float or a dict of floats. Loading it is checked in the
launcher, so a typo fails before any rank starts; the ranks load it again themselves.

Imports nothing heavy: config validation uses it."""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from numbers import Real
from typing import Any

from bigscale.errors import ConfigError

MetricFn = Callable[[list[str], list[str]], Any]

# Keys a metric_fn result may not take: the rows already use them for something else.
RESERVED = frozenset(
    {"step", "loss", "lr", "eval_loss", "eval_ppl", "exact_match", "exact_match_budget_hits"}
)


def load_metric_fn(spec: str | None) -> MetricFn | None:
    if not spec:
        return None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"eval.metric_fn={spec!r} must look like 'package.module:function' (a module path, "
            "a colon, a function name)"
        )
    # The `bigscale` console script's sys.path lacks the working directory that `python -m`
    # (the ranks) has; add it so a metrics.py beside the data imports the same way everywhere.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises at import
        raise ConfigError(
            f"eval.metric_fn={spec!r}: cannot import module {module_name!r} "
            f"({type(e).__name__}: {e}); it must be installed or in the working directory"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(
            f"eval.metric_fn={spec!r}: module {module_name!r} has no function {attr!r}"
        )
    return fn


def call_metric_fn(
    fn: MetricFn, spec: str, predictions: list[str], references: list[str]
) -> dict[str, float]:
    """The function's result as named floats; a wrong return type is the user's error, named."""
    try:
        result = fn(predictions, references)
    except Exception as e:
        raise ConfigError(f"eval.metric_fn={spec!r} raised {type(e).__name__}: {e}") from e
    if isinstance(result, Real) and not isinstance(result, bool):
        result = {getattr(fn, "__name__", "metric"): result}
    if not isinstance(result, dict) or not result:
        raise ConfigError(
            f"eval.metric_fn={spec!r} returned {type(result).__name__}; it must return a float "
            "or a non-empty dict of floats"
        )
    out: dict[str, float] = {}
    for key, value in result.items():
        if not isinstance(key, str) or key in RESERVED or key.startswith("final/"):
            raise ConfigError(
                f"eval.metric_fn={spec!r} returned the key {key!r}; use a string other than "
                f"{sorted(RESERVED)}"
            )
        if not isinstance(value, Real) or isinstance(value, bool):
            raise ConfigError(
                f"eval.metric_fn={spec!r} returned {key!r}: {value!r}; values must be numbers"
            )
        out[key] = float(value)
        if not math.isfinite(out[key]):
            raise ConfigError(f"eval.metric_fn={spec!r} returned {key!r}: {value!r}, not finite")
    return out
