"""Hydra and OmegaConf compose errors as the one line a user reads: the key, the value and
what is allowed, in the words of the schema."""

from __future__ import annotations

from typing import Any

from mnistlab.config.schema import Config
from mnistlab.core.errors import user_message


def one_line(exc: BaseException) -> str:
    """Hydra and OmegaConf errors span several lines; a user needs the first few, joined."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if exc.__cause__ is not None:
        lines += [ln.strip() for ln in str(exc.__cause__).splitlines() if ln.strip()][:1]
    skip = ("full_key", "object_type", "reference_type", "Set the env")  # Hydra's hints stay
    keep = [ln.rstrip(".") for ln in lines if not ln.startswith(skip)]
    return ": ".join(dict.fromkeys(keep[:3]))


def schema_keys(path: str) -> list[str] | None:
    """The keys the schema allows under ``path`` ("" = the top), or None if not a section."""
    import dataclasses

    node: Any = Config
    for part in filter(None, path.split(".")):
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields or not dataclasses.is_dataclass(fields[part].default_factory):  # type: ignore[arg-type]
            return None
        node = fields[part].default_factory  # type: ignore[assignment]
    return [f.name for f in dataclasses.fields(node)]


def hydra_error_line(exc: BaseException) -> str:
    """A Hydra compose error as one line naming the key, the value and what is allowed."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options:
        group, _, choice = exc.missing_cfg_file.rpartition("/")
        return f"{group}={choice!r} is not allowed: one of {', '.join(exc.options)}"
    if isinstance(exc, OverrideParseException):
        return f"{exc.override!r} is not a valid override: {one_line(exc)}"
    first = str(exc).splitlines()[0] if str(exc) else ""
    if "raised while resolving interpolation: " in first:  # e.g. a resolver's ConfigError
        return first.split("raised while resolving interpolation: ", 1)[1]
    key_errors = (ConfigKeyError, ConfigAttributeError)  # Hydra's carry OmegaConf's as cause
    cause = exc if isinstance(exc, key_errors) else exc.__cause__
    if isinstance(cause, key_errors) and cause.full_key:
        parent, _, _ = str(cause.full_key).rpartition(".")
        allowed = schema_keys(parent)
        if allowed:
            where = parent or "the config"
            return f"{cause.full_key} is not a key of {where}: one of {', '.join(allowed)}"
    return one_line(exc)


def compose_message(exc: BaseException) -> str | None:
    """:func:`~mnistlab.core.errors.user_message`, plus Hydra's and OmegaConf's own errors while
    the config is composed; None for anything else (a bug keeps its traceback)."""
    message = user_message(exc)
    if message is not None:
        return message
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return hydra_error_line(exc)
    return None
