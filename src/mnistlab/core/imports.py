"""Your own code named in a config: a dotted path (``pkg.module.Name``) to an importable
object, as Hydra's ``_target_`` names one. Resolved here with :mod:`importlib` alone, so the
engine can build a user's model or read a user's data without importing Hydra."""

from __future__ import annotations

import importlib
from typing import Any

from mnistlab.core.errors import ConfigError


def locate(path: str, key: str) -> Any:
    """The object ``path`` names; one ConfigError line on ``key`` if it cannot be imported."""
    module, _, name = str(path).rpartition(".")
    allowed = "a dotted path to an importable object (pkg.module.Name)"
    if not module or not name:
        raise ConfigError(key, path, allowed)
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ConfigError(key, path, f"{allowed}; {e}") from None
    except AttributeError:
        raise ConfigError(key, path, f"{allowed}; {module} has no {name}") from None
