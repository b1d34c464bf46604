"""Where metrics go: one ``log(row)`` fan-out to the console, ``metrics.jsonl`` and friends.

The loop knows nothing of files or services; it hands rows to :class:`Sinks`. Only rank 0
builds real sinks; other ranks get an empty fan-out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("mnistlab")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(
        path, (json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n").encode()
    )


def _jsonable(obj: Any) -> Any:
    """JSON has no NaN or infinity: write them as null so every reader can parse the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


class Sink(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...


class JsonlSink:
    """``metrics.jsonl``: one JSON object per row, flushed so a crash loses at most one."""

    def __init__(self, path: Path, append: bool = False) -> None:
        self.path = Path(path)
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(_jsonable(row)) + "\n")
        self.file.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        self.file.close()


class ConsoleSink:
    """A progress bar on a terminal, plain periodic lines in logs and CI."""

    def __init__(self, total_steps: int, mode: str = "auto", initial: int = 0) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.every = max(1, total_steps // 10)  # plain lines: about ten per run, plus evals
        self.next_line = initial + self.every
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True)

    def log(self, row: dict[str, Any]) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.update(row["optimizer_step"] - self.bar.n)
            shown = {k: v for k, v in row.items() if k in ("train/loss", "test/acc", "epoch")}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        step = row.get("optimizer_step", 0)
        if self.bar is None and "test/acc" not in row and step < self.next_line:
            return
        if self.bar is None and "test/acc" not in row:
            self.next_line = step + self.every
        if self.bar is None or "test/acc" in row:
            # per-layer BN keys (bn/<layer>/...) go to files only: a line keeps the aggregates
            kept = {k: v for k, v in row.items() if not k.startswith("bn/") or k.count("/") < 2}
            text = " ".join(f"{k}={_fmt(v)}" for k, v in kept.items())
            if self.bar is not None:
                self.bar.write(text)
                logging.getLogger("mnistlab.metrics").debug(text)
            else:
                log.info(text)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(v: Any) -> str:
    return f"{v:.5g}" if isinstance(v, float) else str(v)


class Sinks:
    """Fan-out: every row to every sink. Empty on ranks other than 0."""

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self.sinks: list[Sink] = list(sinks or [])

    def log(self, row: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log(row)

    def finish(self, summary: dict[str, Any]) -> None:
        for s in self.sinks:
            s.finish(summary)
