"""Where metrics go: one ``log(row)`` fan-out to the console, ``metrics.jsonl`` and friends.

The loop knows nothing of files or services; it hands rows to :class:`Sinks`. Only rank 0
builds real sinks; other ranks get an empty fan-out.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from .files import flatten, jsonable
from .steps import Cadence, StepPlan

log = logging.getLogger("mnistlab")

# A row's kind: "step" rows (training, weight metrics, BN points) are thinned by each sink's
# cadence; "eval" rows (an evaluation) and "bn" rows (the final BN measurement) always go.
KINDS = ("step", "eval", "bn")


class Sink(Protocol):
    def log(self, row: dict[str, Any], kind: str) -> None: ...

    def finish(self, summary: dict[str, Any]) -> dict[str, float]:
        """Close; return the sink's own costs in seconds, for the summary's timings."""
        ...


class JsonlSink:
    """``metrics.jsonl``: one JSON object per row, flushed so a crash loses at most one."""

    def __init__(self, path: Path, append: bool = False) -> None:
        self.path = Path(path)
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def log(self, row: dict[str, Any], kind: str) -> None:
        self.file.write(json.dumps(jsonable(row)) + "\n")
        self.file.flush()

    def finish(self, summary: dict[str, Any]) -> dict[str, float]:
        self.file.close()
        return {}


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

    def log(self, row: dict[str, Any], kind: str) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.update(row["optimizer_step"] - self.bar.n)
            keys = ("train/loss", "val/acc", "test/acc", "epoch")
            shown = {k: v for k, v in row.items() if k in keys}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        step, evaluation = row.get("optimizer_step", 0), kind == "eval"
        if self.bar is None and not evaluation and step < self.next_line:
            return
        if self.bar is None and not evaluation:
            self.next_line = step + self.every
        if self.bar is None or evaluation:
            # per-layer BN keys (bn/<layer>/...) go to files only: a line keeps the aggregates
            kept = {k: v for k, v in row.items() if not k.startswith("bn/") or k.count("/") < 2}
            text = " ".join(f"{k}={_fmt(v)}" for k, v in kept.items())
            if self.bar is not None:
                self.bar.write(text)
                logging.getLogger("mnistlab.metrics").debug(text)
            else:
                log.info(text)

    def finish(self, summary: dict[str, Any]) -> dict[str, float]:
        if self.bar is not None:
            self.bar.close()
        return {}


def _fmt(v: Any) -> str:
    return f"{v:.5g}" if isinstance(v, float) else str(v)


class Sinks:
    """Fan-out: every row to every sink. Empty on ranks other than 0."""

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self.sinks: list[Sink] = list(sinks or [])

    def log(self, row: dict[str, Any], kind: str = "step") -> None:
        for s in self.sinks:
            s.log(row, kind)

    def finish(self, summary: dict[str, Any]) -> dict[str, float]:
        """Close every sink; return their costs (seconds) for the summary's timings."""
        costs: dict[str, float] = {}
        for s in self.sinks:
            costs.update(s.finish(summary))
        return costs

    def ids(self) -> dict[str, str]:
        """Identifiers a checkpoint keeps so a resumed run continues the same records."""
        runs = [s.id for s in self.sinks if isinstance(s, WandbSink)]
        return {"wandb_run_id": runs[0]} if runs else {}


# --- Weights & Biases -------------------------------------------------------------------------
# wandb is imported only inside these functions: a run with ``logger=none`` never pays for it,
# and the default run pays only once its data has loaded and its config is known to be good
# (bad input must leave no W&B run behind).

# ``WANDB_MODE`` values wandb accepts, as the mode they mean
WANDB_ENV_MODES = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}


def wandb_credentials() -> bool:
    """Whether W&B would find credentials without prompting or touching the network.

    Asks wandb's own lookup (``WANDB_API_KEY`` / identity-token file, then ``.netrc``, then the
    ``api_key`` setting), with ``prompt=False`` and no verification: nothing is sent anywhere.
    """
    import wandb

    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:  # older wandb: the same three places, read by hand
        return bool(os.environ.get("WANDB_API_KEY") or wandb.api.api_key)
    settings = wandb_setup.singleton().settings
    try:
        auth = wbauth.authenticate_session(
            host=settings.base_url, source="mnistlab", prompt=False, update_session=False
        )
    except wandb.errors.AuthenticationError as e:
        log.warning("W&B credentials are malformed (%s); logging offline", e)
        return False
    return auth is not None


def wandb_mode(mode: str) -> str:
    """``auto``: ``WANDB_MODE`` if set, else online with credentials, else offline."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in WANDB_ENV_MODES:
        return WANDB_ENV_MODES[env]
    return "online" if wandb_credentials() else "offline"


def run_identity(out_dir: Path) -> tuple[str, str, list[str]]:
    """W&B group, name and the overrides of this Hydra job.

    Group: the sweep's folder (a single run is its own group), as its path below ``multirun/``
    or ``runs/`` (``2026-01-31/12-00-00``) so two days' sweeps never share a group. Name:
    Hydra's override string (``hydra.job.override_dirname``), else the folder's name.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    out_dir = Path(out_dir).resolve()
    if not HydraConfig.initialized():  # e.g. a DDP worker started outside Hydra
        return _folder_label(out_dir), out_dir.name, []
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    group = _folder_label(Path(hc.sweep.dir).resolve() if multirun else out_dir)
    overrides = list(hc.overrides.task)
    return group, hc.job.override_dirname or out_dir.name, overrides


def _folder_label(folder: Path) -> str:
    parts = folder.parts
    for anchor in ("multirun", "runs"):
        if anchor in parts[:-1]:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i + 1 :])
    return folder.name


class WandbSink:
    """One W&B run per Hydra job, living in ``<job folder>/wandb/``.

    ``optimizer_step`` is the x-axis of every chart, ``samples_seen`` a second one; the final
    metrics go into the run summary; the run is always finished, with exit code 1 (state
    *failed*) unless the job completed, so the runs of a sweep never merge.

    Each ``run.log`` costs about a millisecond of CPU, as much as a whole step of the default
    model: rows are buffered and handed to W&B every ``flush_every_s`` seconds and at the end,
    so short runs pay nothing per step and long runs still update their charts live.
    """

    def __init__(
        self,
        cfg: Any,
        out_dir: Path,
        config: dict[str, Any],
        cadence: Cadence,
        run_id: str | None = None,
        flush_every_s: float = 10.0,
    ) -> None:
        """``cfg``: the ``logger.wandb`` node; ``config``: what the run's W&B config holds."""
        self.mode = wandb_mode(cfg.mode)
        self.cadence = cadence  # its W&B grid: ~1 ms of CPU a row keeps W&B under 5%
        self.id = run_id or secrets.token_hex(6)
        group, name, overrides = run_identity(out_dir)
        self.init_kwargs: dict[str, Any] = dict(
            project=cfg.project,
            entity=cfg.entity,
            dir=str(out_dir),
            mode=self.mode,
            group=group,
            name=name,
            job_type="train",
            tags=list(cfg.tags),
            config={**config, "overrides": overrides},
            reinit="finish_previous",  # a sweep runs its jobs in one process, one run each
            id=self.id,
            resume="allow" if run_id else None,  # a resumed job continues its own run
        )
        self.seconds = {"wandb_init_s": 0.0, "wandb_log_s": 0.0}
        self.buffer: list[dict[str, Any]] = []
        self.flush_every_s = flush_every_s
        self.error: BaseException | None = None
        t0 = time.perf_counter()
        import wandb

        self.run = wandb.init(**self.init_kwargs)
        self.run.define_metric("optimizer_step")
        self.run.define_metric("samples_seen")
        self.run.define_metric("*", step_metric="optimizer_step")
        self.last_flush = time.perf_counter()
        self.seconds["wandb_init_s"] = self.last_flush - t0

    def log(self, row: dict[str, Any], kind: str) -> None:
        """Step rows on the cadence's W&B grid, plus every evaluation and BN row."""
        if kind != "step" or self.cadence.wandb_row(row.get("optimizer_step", 0)):
            self.buffer.append(dict(row))
            if time.perf_counter() - self.last_flush > self.flush_every_s:
                self.flush()

    def flush(self) -> None:
        t0 = time.perf_counter()
        rows, self.buffer = self.buffer, []
        for row in rows:
            if self.error is None:
                try:
                    self.run.log(row)
                except Exception as e:  # keep training; report once at the end
                    self.error = e
        self.last_flush = time.perf_counter()
        self.seconds["wandb_log_s"] += self.last_flush - t0

    def finish(self, summary: dict[str, Any]) -> dict[str, float]:
        self.flush()
        if self.error is not None:
            log.warning("W&B stopped receiving rows: %s", self.error)
        t0 = time.perf_counter()
        status = summary.get("status", "failed")
        final = flatten(summary.get("final", {}), "/")
        extra = {k: summary[k] for k in ("counted", "timings", "error") if k in summary}
        self.run.summary.update({**final, **flatten(extra, "/"), "status": status})
        folder = Path(self.run.dir).parent  # <job>/wandb/offline-run-.../files -> the run
        self.run.finish(exit_code=0 if status == "completed" else 1)
        self.seconds["wandb_finish_s"] = time.perf_counter() - t0
        if self.mode == "offline":
            log.info("W&B run saved offline; upload it with: wandb sync %s", folder)
        return dict(self.seconds)  # W&B's own cost, measured


def build(
    cfg: Any,
    out_dir: Path,
    plan: StepPlan,
    cadence: Cadence,
    *,
    progress: str = "auto",
    config: dict[str, Any] | None = None,
    rank: int = 0,
    done_steps: int = 0,
    wandb_run_id: str | None = None,
) -> Sinks:
    """The sinks of one job: console and ``metrics.jsonl``, plus W&B when the ``logger``
    node ``cfg`` asks for it (``config``, the resolved run config, becomes its W&B config).

    Only rank 0 logs; other ranks get an empty fan-out. A resumed run (``done_steps > 0``)
    appends to ``metrics.jsonl`` and continues the W&B run ``wandb_run_id``.
    """
    if rank != 0:
        return Sinks()
    out: list[Sink] = [
        ConsoleSink(plan.total_steps, progress, initial=done_steps),
        JsonlSink(Path(out_dir) / "metrics.jsonl", append=done_steps > 0),
    ]
    if cfg.name == "wandb" and cfg.wandb.mode != "disabled":
        run_config = {**(config or {}), "plan": plan.as_dict()}
        out.append(WandbSink(cfg.wandb, Path(out_dir), run_config, cadence, wandb_run_id))
    return Sinks(out)
