"""Packages whose public names load from their submodules on first use (so `import dcq.eval` stays light)."""

from __future__ import annotations

import importlib
import sys


def lazy_attributes(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for `package`: ``exports`` maps a name to the module that defines it."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
