"""Checkpoints: everything a run needs to continue bit for bit, written atomically.

A checkpoint is taken only at an optimizer-step boundary (the end of an accumulation window),
so the position within an epoch is just the number of micro-batches already done in it: the
data order of an epoch is a pure function of (seed, epoch, rank) (``loop.epoch_order``), and
the loop skips the windows already done. ``checkpoints/last.pt`` holds the model (BN buffers
included), the optimizer, the learning-rate scheduler (if the run has one), the RNG states
(torch, CUDA, numpy, python), the step counter, the running train loss/accuracy since the
last logged row, the resolved config and how many bytes of ``metrics.jsonl`` were written, so
a resumed run logs exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from mnistlab.core import signals
from mnistlab.core.errors import ConfigError, Diverged, Interrupted, UserError
from mnistlab.core.files import atomic_write_bytes, flatten
from mnistlab.engine.loop import Callback, Running
from mnistlab.engine.models import unwrap
from mnistlab.engine.steps import StepCounter

LAST = Path("checkpoints") / "last.pt"
BEST = Path("checkpoints") / "best.pt"  # the same contents, at the objective's best evaluation
VERSION = 1

# Settings of this process rather than of the training (``callbacks`` observe the loop): a
# resumed run always takes them from its own command line.
REPEAT_S = 2.0  # a second SIGTERM/SIGINT within this many seconds is the same stop
LOCAL = ("trainer.resume", "trainer.progress", "callbacks")
# What a resumed run may change when its command line gives it: where the data is, how it is
# logged, more epochs (to extend a finished or running training), another checkpoint
# cadence, and a learning rate (the way out after a divergence). The rest is the checkpoint's.
MAY_CHANGE = (
    *LOCAL,
    "dataset.root",
    "dataset.download",
    "logger",
    "trainer.num_threads",  # the thread count changes float summation order: kept unless given
    "trainer.epochs",
    "trainer.checkpoint_every_n_steps",
    "optimizer.lr",
    "report",
    "objective",  # only reads the final summary
)


def rng_state() -> dict[str, Any]:
    """Every random stream training draws from (dropout, init). numpy's and Python's
    Mersenne Twister states (624 words each) are int64 tensors: one object each to pickle and
    hash, not six hundred, and the file still loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(gauss)],
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next],
    }  # fmt: skip


def set_rng_state(state: Mapping[str, Any]) -> None:
    """The streams of :func:`rng_state` (or of a checkpoint that kept them as lists)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(int(v) for v in internal), gauss_next))


@dataclass
class Streams:
    """A lane's random streams: its own generator (dropout) on the training device, and the
    process's other streams as they stood when the lane began (nothing in training draws
    from them). What the lane's checkpoint saves, as a lone run's would."""

    generator: torch.Generator
    saved: dict[str, Any]

    @classmethod
    def now(cls, device: torch.device) -> Streams:
        """This process's streams as they are now: call it right after the job's
        :func:`~mnistlab.app.job.begin`, which leaves them where the lone run's loop would start."""
        saved = rng_state()
        generator = torch.Generator(device)
        generator.set_state(
            torch.cuda.get_rng_state(device) if device.type == "cuda" else saved["torch"]
        )
        return cls(generator, saved)

    def state(self) -> dict[str, Any]:
        out = dict(self.saved)
        if self.generator.device.type == "cuda":
            out["cuda"] = [self.generator.get_state()]
        else:
            out["torch"] = self.generator.get_state()
        return out


def save(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    counter: StepCounter,
    running: Mapping[str, Any],
    config: Mapping[str, Any],
    metrics_bytes: int,
    extra: Mapping[str, Any] | None = None,
    scheduler: LRScheduler | None = None,
    rng: Mapping[str, Any] | None = None,
) -> None:
    """Write ``path`` atomically: serialize in memory, then temp file, fsync, rename.
    ``rng``: the run's random streams (default: this process's, :func:`rng_state`)."""
    state = {
        "version": VERSION,
        "model": own_storage(unwrap(model).state_dict()),
        "optimizer": own_storage(optimizer.state_dict()),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "counter": asdict(counter),
        "running": {
            "loss": float(running["loss"]),
            "correct": float(running["correct"]),
            "count": int(running["count"]),
        },
        "rng": dict(rng) if rng is not None else rng_state(),
        "config": json.dumps(config),  # one string: cheap to pickle and hash (read parses it)
        "metrics_bytes": int(metrics_bytes),
        "extra": dict(extra or {}),
    }
    state["digest"] = digest(state)  # checked on load: a damaged file is never trained from
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def own_storage(obj: Any) -> Any:
    """``obj`` with every tensor that is a view into a larger storage (a stacked run's copy:
    :mod:`mnistlab.sweeps.stack`) copied out: ``torch.save`` writes a view's whole storage."""
    if isinstance(obj, torch.Tensor):
        shared = obj.untyped_storage().nbytes() > obj.numel() * obj.element_size()
        return obj.clone() if shared else obj
    if isinstance(obj, dict):
        return {k: own_storage(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [own_storage(v) for v in obj]
    return obj


def digest(state: Mapping[str, Any]) -> str:
    """SHA-256 over every tensor's bytes and every other value of ``state`` (but its own
    ``digest``), in order: one flipped byte anywhere changes it."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(f"<{x.dtype} {tuple(x.shape)}>".encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, Mapping):
            for k, v in x.items():
                if k != "digest":
                    h.update(f"[{k!r}]".encode())
                    feed(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"({len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())

    feed(state)
    return h.hexdigest()


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, damaged or not for this model: one line."""


def read(path: Path) -> dict[str, Any]:
    """A checkpoint (tensors on the CPU) whose contents match the digest it was written with,
    or a CheckpointError saying why not."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a checkpoint from elsewhere, or a damaged file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({msg})") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a mnistlab checkpoint v{VERSION}")
    if state.get("digest") != digest(state):
        raise CheckpointError(
            f"{path} is damaged (its contents differ from the digest written with it) and "
            "was not loaded; restore a copy, or start the run afresh in another folder"
        )
    if isinstance(state["config"], str):  # older checkpoints kept the config as a dict
        state["config"] = json.loads(state["config"])
    return state


def read_for_resume(path: Path) -> dict[str, Any]:
    """:func:`read` for ``trainer.resume=true``: its errors as that key's ConfigError."""
    if not path.is_file():
        raise ConfigError(
            "trainer.resume",
            True,
            f"no checkpoint at {path}; point hydra.run.dir at the folder of the run to resume",
        )
    try:
        return read(path)
    except CheckpointError as e:
        raise ConfigError("trainer.resume", True, str(e)) from None


def config_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key (saved -> now)`` for every key that differs and may not change on resume."""
    a, b = flatten(saved), flatten(now)
    keys = sorted(set(a) | set(b))
    return [
        f"{k} ({a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r})"
        for k in keys
        if not may_change(k) and a.get(k, "<absent>") != b.get(k, "<absent>")
    ]


def may_change(key: str) -> bool:
    """Whether ``key`` (dotted) is one of :data:`MAY_CHANGE` or inside one of its sections."""
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)


def load_for_resume(path: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint to resume from, or one ConfigError line saying why there is none."""
    state = read_for_resume(path)
    diffs = config_differences(state["config"], config)
    if diffs:
        raise ConfigError(
            "trainer.resume",
            True,
            f"{path} was written with a different config: {'; '.join(diffs)} "
            f"(only {', '.join(MAY_CHANGE)} may change)",
        )
    return state


def load_weights(state: Mapping[str, Any], model: nn.Module, path: Path | None = None) -> None:
    """The checkpoint's weights and BN buffers into ``model``, or a CheckpointError when they
    don't fit it (a config whose model differs from the one that was saved)."""
    try:
        unwrap(model).load_state_dict(state["model"])
    except RuntimeError as e:
        reason = str(e).strip().splitlines()
        raise CheckpointError(
            f"{path or 'the checkpoint'} does not fit the model of this config "
            f"({reason[-1].strip()})"
        ) from None


def restore(
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None = None,
) -> tuple[StepCounter, dict[str, Any]]:
    """Load model, optimizer and scheduler (after the optimizer: its rates are the
    scheduler's); return the counter and running sums. RNG is set last, by
    :func:`set_rng_state`, just before the loop starts (building the model draws from it)."""
    load_weights(state, model)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:  # the config check guarantees the checkpoint has one too
        scheduler.load_state_dict(state["scheduler"])
    return StepCounter(**state["counter"]), dict(state["running"])


def truncate(path: Path, size: int) -> None:
    """Drop the rows logged after the checkpoint: the resumed run logs them again."""
    if path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())


class Checkpointer(Callback):
    """The loop's boundary callback: saves ``last.pt`` at every epoch end, every
    ``every_n_steps`` optimizer steps, and when SIGTERM/SIGINT arrived (then stops the run).

    It writes ``<out_dir>/checkpoints/last.pt`` on rank 0 only. Every rank stops at the same
    step boundary: ``agree`` maps this rank's signal number (0: none) to the largest over all
    ranks (:func:`mnistlab.processes.distributed.any_rank`). ``listeners`` hear of every save
    (:meth:`Callback.on_save`).
    """

    def __init__(
        self,
        out_dir: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: Mapping[str, Any],
        every_n_steps: int | None,
        rank: int = 0,
        listeners: Sequence[Callback] = (),
        agree: Callable[[int], int] = int,
        scheduler: LRScheduler | None = None,
    ) -> None:
        self.path, self.model, self.optimizer = Path(out_dir) / LAST, model, optimizer
        self.scheduler = scheduler
        self.config, self.every, self.listeners = config, every_n_steps, listeners
        self.write = rank == 0
        # Several ranks stop at the same step: each asks whether any rank got a signal.
        self.agree = agree
        self.metrics_path = Path(out_dir) / "metrics.jsonl"  # its size marks the rows kept
        self.stop_signal: int | None = None
        self.stop_time = 0.0
        self.last_saved_step: int | None = None
        self.extra: dict[str, Any] = {}  # e.g. the W&B run id, for the run to resume under
        # Where the run's random streams are: this process's, or a stacked copy's own.
        self.rng: Callable[[], Mapping[str, Any]] = rng_state

    def on_step_end(self, counter: StepCounter, running: Running) -> None:
        step, signum = counter.optimizer_steps, self.agree(self.stop_signal or 0)
        if signum or (self.every is not None and step % self.every == 0):
            self.save(counter, running.as_dict())
        if signum:
            raise Interrupted(signum, step)

    def on_epoch_end(self, counter: StepCounter, running: Running) -> None:
        signum = self.agree(self.stop_signal or 0)
        self.save(counter, running.as_dict())
        if signum:
            raise Interrupted(signum, counter.optimizer_steps)

    def save(self, counter: StepCounter, running: Mapping[str, Any]) -> None:
        """``last.pt`` now; the listeners hear of it."""
        self.save_as(self.path, counter, running)
        self.last_saved_step = counter.optimizer_steps
        for listener in self.listeners:
            listener.on_save(counter.optimizer_steps)

    def save_as(self, path: Path, counter: StepCounter, running: Mapping[str, Any]) -> None:
        """The run as it stands, written to ``path`` on rank 0 (``last.pt``, or ``best.pt``
        with the same contents); a diverged model is never kept (the loss check may be sparse
        on a GPU): Diverged instead."""
        checks = [torch.isfinite(p).all() for p in self.model.parameters()]
        checks.append(torch.isfinite(torch.as_tensor(running["loss"])).all().to(checks[0].device))
        if not bool(torch.stack(checks).all()):  # one host sync, not one per tensor
            raise Diverged(counter.optimizer_steps, float("nan"))
        if self.write:
            size = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
            save(path, self.model, self.optimizer, counter, running, self.config, size,
                 self.extra, self.scheduler, self.rng())  # fmt: skip

    def stop_on_signals(self) -> contextlib.AbstractContextManager[None]:
        return stop_on_signals([self])


@contextmanager
def stop_on_signals(checkpointers: Sequence[Checkpointer]) -> Iterator[None]:
    """SIGTERM/SIGINT set every checkpointer's flag (one per run: a stacked group trains
    several); the next step boundary saves and stops. A second one stops at once
    (KeyboardInterrupt)."""

    def handler(signum: int, frame: Any) -> None:
        # The same stop can arrive twice at once (Ctrl-C reaches the process group and a
        # sweep passes it on): only a second signal a while later means "stop now".
        for c in checkpointers:
            if c.stop_signal is not None and time.monotonic() - c.stop_time > REPEAT_S:
                raise KeyboardInterrupt
            if c.stop_signal is None:
                c.stop_signal, c.stop_time = signum, time.monotonic()

    with signals.handling(handler):
        yield
