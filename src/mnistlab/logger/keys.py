"""How a row's keys read in a logger's UI (W&B, TensorBoard), where ``/`` makes sections.

``metrics.jsonl`` keeps the loop's keys; per-layer BN keys (``bn/<layer>/<metric>``, the
layer being its qualified name in the model) become ``<module path>/<metric>``: one section per
layer. A family's model is an ``nn.Sequential`` whose children are numbers (``2``): those read
``net.2``, as a Lightning module's ``self.net`` would name them; a name that is already a path
(your own module's ``features.1``) stays as it is.
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
    """A BN layer's qualified name as a module path: ``2`` -> ``net.2``; ``features.1`` stays."""
    return f"{ROOT}.{layer}" if layer.split(".", 1)[0].isdigit() else layer


def shown_key(key: str) -> str:
    """The key as a logger's UI shows it: per-layer keys in their layer's own section."""
    parts = layer_key(key)
    return key if parts is None else f"{module_path(parts[0])}/{parts[1]}"


def shown_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Every key of ``row`` as :func:`shown_key` names it."""
    return {shown_key(k): v for k, v in row.items()}
