"""A run's measurements as pictures and a page: ``<run>/report/`` (``learning.png``,
``steps.png``, ``regularization.png``, ``bn.png`` when the model has BatchNorm, and ``report.md``
linking them); for a sweep, every job's report and ``<sweep>/report/`` with the sweep's table,
``bn_momentum.png`` when the jobs differ in ``model.bn_momentum`` and ``steps.png`` when they
differ in batch size, world size or accumulation; and the Markdown table of runs with the
commit, host and threads it was made on. The ``report`` command and ``report=true`` (the end of
a training run, before the W&B run closes) both write through here. It reads only files.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnistlab.core.errors import UserError
from mnistlab.core.files import atomic_write_bytes, flatten
from mnistlab.results import pictures as draw
from mnistlab.results import series
from mnistlab.results.aggregate import number
from mnistlab.results.curves import plot
from mnistlab.results.folders import (
    CompareError,
    differing_overrides,
    label_runs,
    objective_of,
    parse_overrides,
    read_metrics,
)

REPORT = "report"  # the folder, inside a run or sweep folder, that a report is written to


class ReportError(UserError):
    """A user mistake (no runs there, an unreadable file, an unknown column): one line."""


@dataclass(frozen=True)
class Run:
    """What one run folder holds, read once."""

    path: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path, summary: dict[str, Any] | None = None) -> Run:
        if summary is None:
            summary = _read_json(path / "summary.json")
        return cls(Path(path), summary, read_metrics(path))

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config: the summary's, else Hydra's copy (a summary still in memory)."""
        if "config" in self.summary:
            return self.summary["config"]
        saved = self.path / ".hydra" / "config.yaml"
        if not saved.is_file():
            return {}
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(saved), resolve=False)  # type: ignore[return-value]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: cannot be read as JSON ({e})") from None


# --- one run ------------------------------------------------------------------------------------


def _learning(run: Run) -> Any:
    loss = series.columns(run.rows, series.LOSS_KEYS)
    acc = series.columns(run.rows, series.ACCURACY_KEYS)
    if not any(len(s) for s in (*loss.values(), *acc.values())):
        return None
    return draw.draw_learning(loss, acc)


def _steps(run: Run) -> Any:
    if "plan" not in run.summary:
        return None
    plan = series.plan_of(run.summary)
    lines = series.plan_lines(plan, run.summary.get("counted"))
    return draw.draw_epoch(series.epoch_layout(plan), plan.batch_size, lines)


def _weights(run: Run) -> series.Histogram | None:
    ckpt = run.path / "checkpoints" / "last.pt"
    if not ckpt.is_file() or run.config.get("dataset", {}).get("_target_"):
        return None  # your own data: its image shape is not known without reading it
    try:
        return series.weight_histogram(series.regularized_weights(ckpt))
    except Exception as e:  # a truncated file or a model that no longer matches its config
        reason = f"{type(e).__name__}: {e}"
        raise ReportError(f"{ckpt}: cannot rebuild the model from it ({reason})") from None


def _regularization(run: Run) -> Any:
    weights = series.columns(run.rows, series.WEIGHT_KEYS)
    if not any(len(s) for s in weights.values()):
        return None
    r = run.config.get("regularizer", {})
    knobs = ", ".join(f"{k}={r[k]}" for k in ("l1", "l2", "dropout") if r.get(k))
    title = f"Regularization: {r.get('name', '?')}" + (f" ({knobs})" if knobs else "")
    acc = series.columns(run.rows, series.ACCURACY_KEYS)
    keys = ("train_eval/acc", "val/acc", "test/acc", "train_test_gap")
    final = {k: series.last_value(run.rows, run.summary, k) for k in keys}
    note = ""
    if None not in (final["train_eval/acc"], final["test/acc"], final["train_test_gap"]):
        val = "" if final["val/acc"] is None else f"validation {final['val/acc']:.4f}, "
        note = (
            f"at the end: train {final['train_eval/acc']:.4f} (whole set, eval mode), "
            f"{val}test {final['test/acc']:.4f}, gap {final['train_test_gap']:.4f}"
        )
    return draw.draw_regularization(_weights(run), weights, acc, title, note)


def _bn(run: Run) -> Any:
    bn = series.bn_series(run.rows)
    if not bn:
        return None
    m = run.config.get("model", {}).get("bn_momentum", "?")
    subtitle = f" (model.bn_momentum={'null' if m is None else m})"
    share = series.column(run.rows, "bn/probe_noise_share")
    recal = series.recalibration(run.rows, run.summary)
    return draw.draw_bn(bn, recal, subtitle, share if share.x else None)


@dataclass(frozen=True)
class Picture:
    """One picture of a report: its file, its heading on the page, how it is drawn (None:
    the run has nothing to draw) and how to read it."""

    file: str
    heading: str
    build: Callable[[Any], Any]
    caption: str

    def section(self) -> str:
        return f"## {self.heading}\n\n![{self.heading}]({self.file})\n\n{self.caption}\n"


RUN_PICTURES = (
    Picture(
        "learning.png",
        "Learning",
        _learning,
        "Loss (log scale) and accuracy over optimizer steps: validation (what a sweep selects "
        "on; none without a split), the test set, the running training mean in train mode "
        "(train/*) and a test-sized training slice in eval mode (train_slice/*).",
    ),
    Picture(
        "steps.png",
        "Step accounting",
        _steps,
        "One epoch of every rank: micro-batches (width = samples) grouped into accumulation "
        "windows, one optimizer step each; hatched: padding repeats, drop_last's cut. Beside it "
        "the plan's numbers and the textbook N*epochs/(world*batch*accum).",
    ),
    Picture(
        "regularization.png",
        "Regularization",
        _regularization,
        "The regularized weights at the end (log counts; exact zeros in red), their sparsity and "
        "norms over training, and train vs test accuracy with the gap.",
    ),
    Picture(
        "bn.png",
        "BatchNorm running statistics",
        _bn,
        "Per BN layer: the running mean's and variance's gap to the exact statistics, measured "
        "(solid) against the theory (dashed), and their ratio: about 1 is the EMA's noise or its "
        "initial bias, well above 1 is drift. Below: the weight (1 - m)^t still on the initial "
        "value, and PreciseBN's before/after when it ran.",
    ),
)


def write_report(run_dir: Path, summary: dict[str, Any] | None = None) -> list[Path]:
    """Write ``<run_dir>/report/``: the run's pictures and ``report.md``; return the files.

    Reads ``metrics.jsonl``, ``summary.json`` (unless ``summary`` is given: a run writing its
    report before its summary is on disk) and ``checkpoints/last.pt`` for the weights."""
    run = Run.load(Path(run_dir), summary)
    out = run.path / REPORT
    written, sections = [], []
    for picture in RUN_PICTURES:
        fig = picture.build(run)
        if fig is not None:
            written.append(draw.save_png(fig, out / picture.file))
            sections.append(picture.section())
    page = "\n".join([_run_header(run), *sections])
    written.append(_write_text(out / "report.md", page))
    return written


def _run_header(run: Run) -> str:
    s = run.summary
    final, counted = s.get("final", {}), s.get("counted", {})
    facts = [f"status **{s.get('status', 'unknown')}**"]
    if "test/acc" in final:
        facts.append(f"test acc {final['test/acc']:.4f}")
    if "total_steps" in counted:
        facts.append(f"{counted['total_steps']} optimizer steps")
    overrides = " ".join(s.get("overrides", [])) or _hydra_overrides(run.path)
    if overrides:
        facts.append(f"overrides `{overrides}`")
    lines = [f"# mnistlab report: {run.path.name}", "", " · ".join(facts), ""]
    if s.get("error"):
        lines += [f"> {s['error']}", ""]
    return "\n".join(lines)


def _hydra_overrides(path: Path) -> str:
    saved = path / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return ""
    from omegaconf import OmegaConf

    return " ".join(map(str, OmegaConf.load(saved)))


def _write_text(path: Path, text: str) -> Path:
    atomic_write_bytes(path, text.encode())
    return path


# --- a sweep ------------------------------------------------------------------------------------


def _differing(runs: Sequence[Run]) -> list[str]:
    """The override keys that tell the runs apart (none for a single run)."""
    rows = [{"overrides": r.summary.get("overrides", [])} for r in runs]
    return differing_overrides(rows) if len(runs) > 1 else []


def _labels(runs: Sequence[Run]) -> list[str]:
    """Each run named by the overrides that tell the runs apart (else its folder)."""
    keys, names = _differing(runs), label_runs([r.path for r in runs])
    out = []
    for run, name in zip(runs, names, strict=True):
        chosen = parse_overrides(run.summary.get("overrides", []))
        out.append(" ".join(f"{k}={chosen.get(k, '-')}" for k in keys) or name)
    return out


def _momentum_panels(runs: Sequence[Run]) -> Any:
    """``bn_momentum.png`` when the runs differ in ``model.bn_momentum`` and measured BN."""
    momenta = [series.bn_momentum(r.summary) for r in runs]
    if len(set(momenta)) < 2:
        return None
    panels = []
    for m, run, label in zip(momenta, runs, _labels(runs), strict=True):
        bn = series.bn_series(run.rows)
        other = [kv for kv in label.split() if not kv.startswith("model.bn_momentum=")]
        if bn:
            panels.append(
                ("\n".join([f"m = {'null (cumulative)' if m is None else m}", *other]), bn)
            )
    return draw.draw_bn_momenta(panels) if len(panels) > 1 else None


SHAPE_KEYS = ("trainer.batch_size", "trainer.grad_accum", "trainer.devices", "trainer.num_nodes")


def _sweep_steps(runs: Sequence[Run]) -> Any:
    """``steps.png`` when the runs differ in batch size, world size or accumulation."""
    planned = [r for r in runs if "plan" in r.summary]
    if len({series.plan_shape(r.summary) for r in planned}) < 2:
        return None
    jobs = []
    for run, label in zip(planned, _labels(planned), strict=True):
        other = [kv for kv in label.split() if kv.partition("=")[0] not in SHAPE_KEYS]
        shape = series.plan_shape(run.summary).replace(" x ", "\nx ")
        jobs.append(series.job_steps("\n".join([*other, shape]), run.summary))
    return draw.draw_sweep_steps(jobs)


def _sweep_weights(runs: Sequence[Run]) -> Any:
    """``regularization.png`` when the runs differ in a ``regularizer`` override."""
    if not any(k.startswith("regularizer") for k in _differing(runs)):
        return None
    labels = _labels(runs)
    return draw.draw_histograms([(x, _weights(r)) for r, x in zip(runs, labels, strict=True)])


def _sweep_accuracy(runs: Sequence[Run], out: Path) -> Path | None:
    """``accuracy.png``: validation accuracy (what the sweep selects on; left out when no run
    has a split) above test accuracy, every run drawn as ``compare --plot`` draws it, the
    legend in the order of the objective."""
    has_val = any(series.column(r.rows, "val/acc").y for r in runs)
    metrics = ["val/acc", "test/acc"] if has_val else ["test/acc"]
    try:
        return plot([r.path for r in runs], metrics, out=out)
    except CompareError:  # no run reached an evaluation
        return None


def by_objective(runs: Sequence[Run]) -> list[Run]:
    """``runs`` best first by their objective (``objective.metric`` in its direction; runs
    without a value last), as ``compare`` sorts them (:func:`objective_of`)."""
    rows = [
        {
            "objective.metric": r.config.get("objective", {}).get("metric"),
            "objective.direction": r.config.get("objective", {}).get("direction"),
            "val/acc": _value(r.summary, "val/acc"),
        }
        for r in runs
    ]
    metric, ascending, _ = objective_of(rows)
    scored = [r for r in runs if number(_value(r.summary, metric)) is not None]
    scored.sort(key=lambda r: number(_value(r.summary, metric)), reverse=not ascending)  # type: ignore[arg-type,return-value]
    done = {id(r) for r in scored}
    return scored + [r for r in runs if id(r) not in done]


SWEEP_PICTURES = (
    Picture(
        "regularization.png",
        "Regularized weights by job",
        _sweep_weights,
        "Each job's regularized weights at the end on shared axes (log counts): L1 leaves exact "
        "zeros (red), L2 narrows the distribution, dropout widens it.",
    ),
    Picture(
        "bn_momentum.png",
        "BatchNorm gap by momentum",
        _momentum_panels,
        "One column per model.bn_momentum on shared axes: the measured gap (solid) against the "
        "theory (dashed). A large m follows the weights but is noisy; a small m keeps its initial "
        "bias (0 mean, 1 variance) for about 1/m updates.",
    ),
    Picture(
        "steps.png",
        "Step accounting across the sweep",
        _sweep_steps,
        "Per job: iterations (micro-batches per rank), optimizer steps and the textbook count. "
        "Steps follow the effective batch; iterations and BN updates grow as the micro-batch "
        "shrinks; the ceiling of each epoch's last window puts steps above the textbook value.",
    ),
)


def write_sweep_report(folder: Path, run_dirs: Sequence[Path], each: bool = False) -> list[Path]:
    """``<folder>/report/``: the sweep's table, pictures and page; with ``each`` every run's
    own report first (else the page links those that exist, e.g. from ``report=true``)."""
    written: list[Path] = []
    for path in run_dirs if each else ():
        written += write_report(path)
    runs = by_objective([Run.load(p) for p in run_dirs])
    out = Path(folder) / REPORT
    sections = [f"# mnistlab sweep report: {Path(folder).name}\n", markdown_table(runs), ""]
    acc = _sweep_accuracy(runs, out / "accuracy.png")
    if acc is not None:
        written.append(acc)
        sections.append(
            "## Validation and test accuracy\n\n![Validation and test accuracy](accuracy.png)\n\n"
            "Validation (what the sweep selects on) above test (reported, never selected on); "
            "runs in the order of the objective.\n"
        )
    for picture in SWEEP_PICTURES:
        fig = picture.build(runs)
        if fig is not None:
            written.append(draw.save_png(fig, out / picture.file))
            sections.append(picture.section())
    sections.append("## Runs\n")
    for run, label in zip(runs, _labels(runs), strict=True):
        page = run.path / REPORT / "report.md"
        name = f"[{label}]({os.path.relpath(page, out)})" if page.is_file() else label
        sections.append(f"- {name}: {run.summary.get('status', 'unknown')} ({run.path})")
    written.append(_write_text(out / "report.md", "\n".join(sections) + "\n"))
    return written


# --- the Markdown table -------------------------------------------------------------------------

# (key, heading, format): the default columns, those of the README's regularizer table
TABLE: tuple[tuple[str, str, str], ...] = (
    ("val/acc", "val acc", "{:.4f}"),
    ("val/loss", "val loss", "{:.4f}"),
    ("test/acc", "test acc", "{:.4f}"),
    ("train_eval/acc", "train acc", "{:.4f}"),
    ("train_test_gap", "train–test gap", "{:.4f}"),
    ("weights/l2_norm", "weight L2 norm", "{:.2f}"),
    ("weights/sparsity_exact", "exact zeros", "{:.1%}"),
    ("weights/sparsity_1e-3", "\\|w\\| < 1e-3", "{:.1%}"),
    ("bn/gap_mean", "BN gap", "{:.3f}"),
)


def _value(summary: dict[str, Any], key: str) -> Any:
    """A final metric by name, or any ``summary.json`` value by its dotted path."""
    final = summary.get("final", {})
    return final[key] if key in final else flatten(summary).get(key)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return fmt.format(value)
    return str(value)


def markdown_table(runs: Sequence[Run], keys: Sequence[str] | None = None) -> str:
    """One row per run, best first by the runs' objective (:func:`by_objective`): the
    overrides that tell the runs apart, then ``keys`` (default :data:`TABLE`, validation before
    test; a column no run has is left out): final metrics, or summary values by dotted path
    (``config.regularizer.l1``)."""
    runs = by_objective(runs)

    def some_run_has(key: str) -> bool:
        return any(_value(r.summary, key) is not None for r in runs)

    known = {k: (h, f) for k, h, f in TABLE}
    chosen = [(k, *known.get(k, (k, "{:.4g}"))) for k in keys or known if some_run_has(k)]
    missing = [k for k in keys or () if not some_run_has(k)]
    if missing:
        finals = sorted({k for r in runs for k in r.summary.get("final", {})})
        raise ReportError(
            f"--columns {missing[0]!r}: no run has it; a final metric ({', '.join(finals)}) "
            "or a summary.json key by its dotted path (config.regularizer.l1)"
        )
    by = _differing(runs)
    head = [*(by or ["run"]), *(h for _, h, _ in chosen)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, name in zip(runs, label_runs([r.path for r in runs]), strict=True):
        given = parse_overrides(run.summary.get("overrides", []))
        first = [given.get(k, "-") for k in by] or [name]
        cells = [_cell(_value(run.summary, k), f) for k, _, f in chosen]
        lines.append("| " + " | ".join([*first, *cells]) + " |")
    return "\n".join(lines)


def _git(*args: str) -> str | None:
    """A git answer about the code's own checkout; None outside one (an installed wheel)."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def provenance(runs: Sequence[Run], command: str) -> str:
    """Where a table was made: commit, host, threads per run, and the command that made it."""
    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += " with uncommitted changes"
    threads = sorted({r.summary["num_threads"] for r in runs if "num_threads" in r.summary})
    return (
        f"Made by `{command}` on commit {commit or 'unknown (not a git checkout)'}, "
        f"host {cpu_model()} ({os.cpu_count()} CPUs), "
        f"{'/'.join(map(str, threads)) or 'unknown'} torch thread(s) per run."
    )


def replace_block(path: Path, name: str, text: str) -> None:
    """Put ``text`` between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` in ``path``."""
    start, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    try:
        old = path.read_text()
    except OSError as e:
        raise ReportError(f"--into {path}: cannot be read ({e.strerror})") from None
    if old.count(start) != 1 or old.count(end) != 1 or old.index(start) > old.index(end):
        raise ReportError(f"--into {path}: needs one {start} line followed by one {end} line")
    before, rest = old.split(start)
    after = rest.split(end)[1]
    atomic_write_bytes(path, f"{before}{start}\n{text}\n{end}{after}".encode())
