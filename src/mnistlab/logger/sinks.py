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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from mnistlab.config.schema import uses
from mnistlab.core.errors import UserError
from mnistlab.core.files import flatten, jsonable
from mnistlab.logger import wandb_run
from mnistlab.logger.tensorboard_sink import TensorBoardSink

log = logging.getLogger("mnistlab")

# A row's kind: "step" rows (training, weight metrics, BN points) are thinned by each sink's
# cadence; "eval" rows (an evaluation) and "bn" rows (the final BN measurement) always go.
KINDS = ("step", "eval", "bn")
POSITION = ("optimizer_step", "micro_batch", "epoch", "samples_seen")  # every row's coordinates


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
    """A progress bar on a terminal, plain periodic lines in logs and CI. The bar shows the
    last value of each of :data:`BAR_KEYS`, validation first (what a sweep selects on)."""

    BAR_KEYS = ("val/loss", "val/acc", "test/acc", "train/loss", "epoch")

    def __init__(self, total_steps: int, mode: str = "auto", initial: int = 0) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.every = max(1, total_steps // 10)  # plain lines: about ten per run, plus evals
        self.next_line = initial + self.every
        self.bar = None
        self.shown: dict[str, Any] = {}  # the bar's values: each key's last, from any row
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True)

    def log(self, row: dict[str, Any], kind: str) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.update(row["optimizer_step"] - self.bar.n)
            self.shown.update((k, row[k]) for k in self.BAR_KEYS if k in row)
            shown = {k: f"{self.shown[k]:.4g}" for k in self.BAR_KEYS if k in self.shown}
            self.bar.set_postfix(shown, refresh=False)
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
        for s in self.sinks:
            if isinstance(s, WandbSink):
                who = s.identity
                return {"wandb_run_id": s.id, "wandb_group": who.group, "wandb_name": who.name}
        return {}


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
    try:
        settings = wandb_setup.singleton().settings
    except Exception as e:  # W&B's settings read the WANDB_* variables, and refuse bad ones
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:3]
        why = ": ".join(ln.split(" [type=")[0] for ln in lines) or type(e).__name__
        raise UserError(f"W&B refuses its settings from the environment (WANDB_*): {why}") from None
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


class WandbSink:
    """One W&B run per Hydra job, living in ``<job folder>/wandb/``.

    ``optimizer_step`` is the x-axis of every chart, ``samples_seen`` a second one; best and
    final accuracy and loss are the run summary's (``define_metric``), with the final metrics;
    per-layer BN keys have their own section. At the end the run gets its tables, chart,
    pictures and files (:mod:`mnistlab.logger.wandb_run`) and is always finished, with exit code 1
    (state *failed*) unless the job completed, so the runs of a sweep never merge.

    Each ``run.log`` costs about a millisecond of CPU, as much as a whole step of the default
    model: rows are buffered and handed to W&B every ``flush_every_s`` seconds and at the end,
    so short runs pay nothing per step and long runs still update their charts live.
    """

    def __init__(
        self,
        cfg: Any,
        out_dir: Path,
        config: dict[str, Any],
        wandb_row: Callable[[int], bool],
        resume: Mapping[str, Any] | None = None,
        checkpoint: Path | None = None,
        flush_every_s: float = 10.0,
    ) -> None:
        """``cfg``: the ``logger.wandb`` node; ``config``: what the run's W&B config holds;
        ``resume``: the ids a checkpoint kept (:meth:`Sinks.ids`): the same run, name, group;
        ``checkpoint``: the run's last checkpoint, logged as an artifact if ``log_checkpoint``."""
        self.mode = wandb_mode(cfg.mode)
        self.wandb_row = wandb_row  # its grid of steps: ~1 ms of CPU a row keeps W&B under 5%
        self.out_dir, self.quiet = Path(out_dir), cfg.quiet
        self.checkpoint = checkpoint if cfg.log_checkpoint else None
        resume = resume or {}
        self.id = resume.get("wandb_run_id") or secrets.token_hex(6)
        # the config's own name and group first, then the ones a resumed run had, then defaults
        name = cfg.name or resume.get("wandb_name")
        self.identity = wandb_run.identity(out_dir, name, cfg.group or resume.get("wandb_group"))
        self.seconds = {"wandb_init_s": 0.0, "wandb_log_s": 0.0}
        self.buffer: list[dict[str, Any]] = []
        self.flush_every_s = flush_every_s
        self.error: BaseException | None = None
        self.gaps = wandb_run.GapHistory()  # every BN point, for the finish-time chart
        self.position: dict[str, Any] = {}  # the last row's coordinates
        self.sent: dict[str, Any] = {}  # the last value sent of each summarised metric
        t0 = time.perf_counter()
        self.run = self._init(cfg, config, bool(resume.get("wandb_run_id")))
        self.last_flush = time.perf_counter()
        self.seconds["wandb_init_s"] = self.last_flush - t0

    def _init(self, cfg: Any, config: dict[str, Any], resumed: bool) -> Any:
        """``wandb.init`` and the metric definitions. Quiet: W&B prints nothing (its banner
        would cut the progress bar) and captures no console (the job's log goes at the end)."""
        import wandb

        settings = wandb.Settings(silent=True, console="off") if self.quiet else None
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            dir=str(self.out_dir),
            mode=self.mode,
            group=self.identity.group,
            name=self.identity.name,
            job_type=cfg.job_type,
            tags=list(cfg.tags),
            notes=cfg.notes,
            config={**config, "overrides": list(self.identity.overrides)},
            reinit="create_new",  # a sweep runs its jobs in one process (stacked: at once)
            id=self.id,
            resume="allow" if resumed else None,  # a resumed job continues its own run
            settings=settings,
        )
        run.define_metric("optimizer_step")
        run.define_metric("samples_seen")
        run.define_metric("*", step_metric="optimizer_step")
        for key, kept in wandb_run.SUMMARIES.items():  # best and final, first in the summary
            run.define_metric(key, step_metric="optimizer_step", summary=kept)
        return run

    def log(self, row: dict[str, Any], kind: str) -> None:
        """Step rows on the cadence's W&B grid, plus every evaluation and BN row."""
        self.position = {k: row[k] for k in POSITION if k in row}
        self.gaps.add(row)
        if kind != "step" or self.wandb_row(row.get("optimizer_step", 0)):
            self.sent.update((k, row[k]) for k in wandb_run.SUMMARIES if k in row)
            self.buffer.append(wandb_run.for_wandb(row))
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
        final = flatten(summary.get("final", {}), "/")
        # the summaries' "last" is the job's final value (after PreciseBN, say): a last point
        late = {k: final[k] for k in wandb_run.SUMMARIES if k in final}
        late = {k: v for k, v in late.items() if v != self.sent.get(k)}
        if late and self.position:
            self.buffer.append({**self.position, **late})
        self.flush()
        if self.error is not None:
            log.warning("W&B stopped receiving rows: %s", self.error)
        t0 = time.perf_counter()
        self._extras(summary)
        status = summary.get("status", "failed")
        final = {k: v for k, v in final.items() if k not in wandb_run.SUMMARIES}
        extra = {k: summary[k] for k in ("counted", "timings", "error") if k in summary}
        self.run.summary.update({**final, **flatten(extra, "/"), "status": status})
        self.run.finish(exit_code=0 if status == "completed" else 1)
        self.seconds["wandb_finish_s"] = time.perf_counter() - t0
        if self.mode == "offline":  # a sweep says it once for all its jobs (sweeps.sweep)
            level = logging.DEBUG if self.identity.sweep is not None else logging.INFO
            log.log(level, "W&B offline; upload: wandb sync %s", self.sync_glob())
        return dict(self.seconds)  # W&B's own cost, measured

    def sync_glob(self) -> str:
        """Every offline folder of this run (a resumed run writes one more each time it
        resumes, all with its id): ``wandb sync`` uploads them to one run, oldest first."""
        return str(self.out_dir / "wandb" / f"offline-run-*-{self.id}")

    def _extras(self, summary: dict[str, Any]) -> None:
        """Tables, chart, pictures, files and the checkpoint, once; a W&B problem here is
        reported and the run still finishes."""
        try:
            media = wandb_run.finish_media(summary, self.gaps, self.out_dir)
            if media:
                self.run.log(media)
            wandb_run.save_files(self.run, self.out_dir, with_log=self.quiet)
            if self.checkpoint is not None:
                wandb_run.log_checkpoint(self.run, self.checkpoint, summary)
        except Exception as e:
            log.warning("W&B did not take the run's tables, files or checkpoint: %s", e)


def log_pictures(cfg: Any, folder: Path, pictures: list[Path], group: str) -> None:
    """Pictures (a sweep's report) as one W&B run of their own, ``job_type=report``, in
    ``group``, living in ``<folder>/wandb/``; as quiet as the jobs' runs (``cfg``: the
    ``logger.wandb`` node)."""
    if not pictures:
        return
    import wandb

    settings = wandb.Settings(silent=True, console="off") if cfg.quiet else None
    run = wandb.init(
        project=cfg.project, entity=cfg.entity, dir=str(folder), mode=wandb_mode(cfg.mode),
        group=group, name=f"report {wandb_run.folder_label(Path(folder))}", job_type="report",
        tags=list(cfg.tags), notes=cfg.notes, reinit="create_new", settings=settings,
    )  # fmt: skip
    run.log({f"report/{p.stem}": wandb.Image(str(p)) for p in pictures})
    run.finish()


def build(
    cfg: Any,
    out_dir: Path,
    plan: Mapping[str, Any],
    wandb_row: Callable[[int], bool],
    *,
    progress: str = "auto",
    config: dict[str, Any] | None = None,
    rank: int = 0,
    done_steps: int = 0,
    resume_ids: Mapping[str, Any] | None = None,
    checkpoint: Path | None = None,
) -> Sinks:
    """The sinks of one job: console and ``metrics.jsonl``, plus W&B when the ``logger``
    node ``cfg`` asks for it (``config``, the resolved run config, becomes its W&B config;
    ``plan`` is the step plan as a dict; ``wandb_row`` says which steps' rows W&B takes).

    Only rank 0 logs; other ranks get an empty fan-out. A resumed run (``done_steps > 0``)
    appends to ``metrics.jsonl`` and continues the W&B run of ``resume_ids`` (what
    :meth:`Sinks.ids` returned when the checkpoint was saved).
    """
    if rank != 0:
        return Sinks()
    out: list[Sink] = [
        ConsoleSink(plan["total_steps"], progress, initial=done_steps),
        JsonlSink(Path(out_dir) / "metrics.jsonl", append=done_steps > 0),
    ]
    if uses(cfg, "tensorboard"):
        out.append(TensorBoardSink(cfg.tensorboard, Path(out_dir), config or {}, done_steps))
    if uses(cfg, "wandb") and cfg.wandb.mode != "disabled":
        run_config = {**(config or {}), "plan": dict(plan)}
        wandb = WandbSink(cfg.wandb, Path(out_dir), run_config, wandb_row, resume_ids, checkpoint)
        out.append(wandb)
    return Sinks(out)
