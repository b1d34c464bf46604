"""How a row's keys read in a logger's UI (W&B, TensorBoard), where ``/`` makes sections.

``metrics.jsonl`` keeps the loop's keys; per-layer BN keys (``bn/<layer>/<metric>``, the
layer being its qualified name in the model, ``2`` for the third module of an
``nn.Sequential``) become ``net.<layer>/<metric>``: one section per layer, named by its module
path under the model, ``net``, as a Lightning module's ``self.net`` would name it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ROOT = "net"  # the model, as the first part of a layer's module path


def layer_key(key: str) -> tuple[str, str] | None:
    """``bn/<layer>/<metric>`` -> ``(layer, metric)``; None for any other key."""
    if not key.startswith("bn/") or key.count("/") < 2:
        return None
    layer, _, metric = key[3:].rpartition("/")
    return layer, metric


def module_path(layer: str) -> str:
    """A BN layer's qualified name as its module path: ``2`` -> ``net.2``."""
    return f"{ROOT}.{layer}"


def shown_key(key: str) -> str:
    """The key as a logger's UI shows it: per-layer keys in their layer's own section."""
    parts = layer_key(key)
    return key if parts is None else f"{module_path(parts[0])}/{parts[1]}"


def shown_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Every key of ``row`` as :func:`shown_key` names it."""
    return {shown_key(k): v for k, v in row.items()}
