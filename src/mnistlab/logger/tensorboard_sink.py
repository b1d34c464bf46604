"""TensorBoard as a second logger: every row the sinks get as scalars against
``optimizer_step``, the config as text and hparams, the report's pictures as images.

Event files go to ``<run>/tensorboard/`` (``logger.tensorboard.dir``), so
``tensorboard --logdir outputs/`` shows every run, a sweep's jobs side by side. Keys read as in
W&B (:mod:`mnistlab.logger.keys`): per-layer BN keys in one section per layer (``net.2/...``).
torch's ``SummaryWriter`` writes the files; a row is one event holding all its scalars, so a
row costs one protobuf, not one per key. Imported only by a run that asks for TensorBoard.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

from mnistlab.core.files import flatten
from mnistlab.logger.keys import shown_row

# the final metrics the HParams dashboard compares runs by, written at the end as final/<key>
HPARAM_METRICS = ("val/acc", "val/loss", "test/acc", "test/loss")
# a PNG's IHDR colour type -> TensorBoard's colorspace (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA)
COLORSPACES = {0: 1, 4: 2, 2: 3, 6: 4}


class TensorBoardSink:
    """One TensorBoard run per job. A resumed job writes to the same folder and hides the
    events past its checkpoint (``purge_step``): the loop logs those steps again."""

    def __init__(self, cfg: Any, out_dir: Path, config: dict[str, Any], done_steps: int = 0):
        """``cfg``: the ``logger.tensorboard`` node; ``config``: the resolved run config;
        ``done_steps``: the optimizer steps a resumed run had done (0: a fresh run)."""
        t0 = time.perf_counter()  # the import too: the first run pays for it
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / cfg.dir  # an absolute dir stays itself
        purge = done_steps + 1 if done_steps else None
        self.writer = SummaryWriter(str(self.dir), purge_step=purge, flush_secs=10)
        self.step = done_steps
        if not done_steps:  # the config once, at the run's start
            self._config(config)
        self.seconds = time.perf_counter() - t0

    def _config(self, config: dict[str, Any]) -> None:
        """The config as YAML text, and as hparams (the HParams dashboard's columns)."""
        from omegaconf import OmegaConf
        from torch.utils.tensorboard.summary import hparams

        text = OmegaConf.to_yaml(OmegaConf.create(config))
        self.writer.add_text("config", "".join(f"    {ln}\n" for ln in text.splitlines()), 0)
        values = {k: _hparam(v) for k, v in flatten(config).items()}
        metrics = {f"final/{k}": 0.0 for k in HPARAM_METRICS}  # names only; values come last
        writer = self.writer._get_file_writer()
        for summary in hparams(values, metrics):
            writer.add_summary(summary)

    def log(self, row: dict[str, Any], kind: str) -> None:
        """Every number of the row (an evaluation's and BN's too) at its optimizer step."""
        t0 = time.perf_counter()
        self.step = row.get("optimizer_step", self.step)
        self._scalars(shown_row(row), self.step)
        self.seconds += time.perf_counter() - t0

    def _scalars(self, values: dict[str, Any], step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        kept = [Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()
                if k != "optimizer_step" and _number(v)]  # fmt: skip
        if kept:
            self.writer._get_file_writer().add_summary(Summary(value=kept), step)

    def finish(self, summary: dict[str, Any]) -> dict[str, float]:
        """The final metrics (``final/<key>``, after PreciseBN say) and the report's
        pictures at the last step; then close. Returns the sink's seconds."""
        t0 = time.perf_counter()
        final = flatten(summary.get("final") or {}, "/")
        self._scalars({f"final/{k}": v for k, v in final.items()}, self.step)
        for png in sorted((self.out_dir / "report").glob("*.png")):
            self._image(f"report/{png.stem}", png.read_bytes())
        self.writer.close()
        return {"tensorboard_s": self.seconds + time.perf_counter() - t0}

    def _image(self, tag: str, png: bytes) -> None:
        """A PNG as TensorBoard's image, its bytes as they are (no decoding, no re-encoding)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        width, height, _, colour = struct.unpack(">IIBB", png[16:26])
        image = Summary.Image(height=height, width=width, colorspace=COLORSPACES.get(colour, 4),
                              encoded_image_string=png)  # fmt: skip
        self.writer._get_file_writer().add_summary(
            Summary(value=[Summary.Value(tag=tag, image=image)]), self.step
        )


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _hparam(v: Any) -> bool | int | float | str:
    """A config value as the HParams plugin takes it: numbers, bools and strings as they are,
    anything else (None, lists) as text."""
    return v if isinstance(v, (bool, int, float, str)) else str(v)
