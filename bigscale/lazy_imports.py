"""Keep optional imports of third-party packages that bigscale never uses out of a process.

``import deepspeed`` imports its autotuner, which tries ``import mlflow`` (and through it
pandas, FastAPI, OpenTelemetry...) only so that an autotuning run could log to MLflow; bigscale
never autotunes, and that one optional import was 1.7 s of a resumed rank's start on the dev
box. The autotuner module alone is made to see MLflow as absent (its ``try: import mlflow``
then sets ``has_mlflow = False``); any other importer, bigscale's own MLflow metrics sink
included, gets the real package."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

# module -> the optional packages its own import should not load
_SKIP_OPTIONAL = {"deepspeed.autotuning.autotuner": ("mlflow",)}


class _WithoutOptional(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, hidden: tuple[str, ...]):
        self.loader, self.hidden = loader, hidden

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # A None entry makes `import name` raise ImportError at once, without searching.
        hidden = [name for name in self.hidden if name not in sys.modules]
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]
        try:
            self.loader.exec_module(module)
        finally:
            for name in hidden:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        hidden = _SKIP_OPTIONAL.get(fullname)
        if hidden is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _WithoutOptional(spec.loader, hidden)
                return spec
        return None


def skip_unused_optional_imports() -> None:
    """Install the finder (once); before anything imports DeepSpeed."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
