"""Keep import-time work that bigscale never uses out of a process.

Two DeepSpeed modules do expensive work when they are imported, for features bigscale does not
use:

- ``import deepspeed`` imports its autotuner, which tries ``import mlflow`` (and through it
  pandas, FastAPI, OpenTelemetry...) only so that an autotuning run could log to MLflow; bigscale
  never autotunes, and that one optional import was 1.7 s of a resumed rank's start on the dev
  box. The autotuner module alone is made to see MLflow as absent (its ``try: import mlflow``
  then sets ``has_mlflow = False``); any other importer, bigscale's own MLflow metrics sink
  included, gets the real package.
- Every ZeRO stage imports DeepSpeed's Muon optimizer module at its first gradient reduction,
  only for an ``isinstance`` check, and that module wraps its kernels in ``torch.compile`` at
  import, which loads TorchInductor (seconds per rank). While that module is imported, its
  ``@compiler.compile()`` decorator is made lazy: a kernel is handed to ``torch.compile`` on its
  first call, so a run that uses Muon still gets the compiled kernels and one that does not never
  loads the compiler.

``when_imported`` runs a function once a module has been imported (at once if it already is), so
a library can be configured without importing it: the launcher only quiets transformers and
datasets if it ends up using them, and it seldom does (2 s of each launch on a 2-core box).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any


@contextmanager
def _without(*names: str) -> Iterator[None]:
    # A None entry makes `import name` raise ImportError at once, without searching.
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _compile_on_first_call() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        compiled: Callable[..., Any] | None = None

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                import torch

                compiled = torch.compile(fn)
            return compiled(*args, **kwargs)

        return call

    return decorate


@contextmanager
def _lazy_deepspeed_compile() -> Iterator[None]:
    from deepspeed.runtime import compiler

    eager = compiler.compile
    compiler.compile = _compile_on_first_call
    try:
        yield
    finally:
        compiler.compile = eager


# module -> what its own import runs under
_WHILE_IMPORTING: dict[str, Callable[[], Any]] = {
    "deepspeed.autotuning.autotuner": lambda: _without("mlflow"),
    "deepspeed.runtime.zero.muon.original_muon": _lazy_deepspeed_compile,
}


# module -> what runs once it is imported
_AFTER_IMPORT: dict[str, list[Callable[[ModuleType], None]]] = {}


def when_imported(name: str, configure: Callable[[ModuleType], None]) -> None:
    """``configure(module)`` once ``name`` is imported; at once if it already is."""
    skip_unused_optional_imports()
    if name in sys.modules:
        configure(sys.modules[name])
    else:
        _AFTER_IMPORT.setdefault(name, []).append(configure)


class _Guarded(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, name: str):
        self.loader, self.name = loader, name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        guard = _WHILE_IMPORTING.get(self.name, contextlib.nullcontext)
        with guard():
            self.loader.exec_module(module)
        for configure in _AFTER_IMPORT.pop(self.name, []):
            # What the import binds: transformers replaces its module by a lazy one.
            configure(sys.modules[self.name])


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _WHILE_IMPORTING and fullname not in _AFTER_IMPORT:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Guarded(spec.loader, fullname)
                return spec
        return None


def skip_unused_optional_imports() -> None:
    """Install the finder (once); before anything imports DeepSpeed."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
