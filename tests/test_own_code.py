"""Your own model and data, named in the config as Lightning-Hydra-Template users name them:
``model._target_=pkg.Module`` (any ``nn.Module``; its BatchNorm layers measured like the
families') and ``dataset._target_=pkg.fn`` (a function returning tensors), from a package
that lives outside mnistlab. What cannot work is one error line before any training."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from mnistlab import eval as eval_cmd
from mnistlab import plan

from support import app, assert_one_line_error, read_jsonl, read_summary

OWN = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """Not a Sequential: a body and a head, BatchNorm inside the body."""

    def __init__(self, width=16, inputs=36, classes=3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(inputs, width), nn.BatchNorm1d(width), nn.ReLU()
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(x))


def blobs(n=300, seed=0):
    """Three classes of 6x6 images, as numpy-free tensors: [N, H, W] images, int labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 6, 6, generator=g) + 2 * y[:, None, None].float()
    return x[: n - 60], y[: n - 60], x[n - 60 :], y[n - 60 :]


def not_four():
    return torch.zeros(3)
'''

OWN_DATA = ("dataset._target_=ownpkg.blobs", "+dataset.args.n=400", "dataset.name=blobs")
OWN_MODEL = ("model._target_=ownpkg.Tiny", "+model.args.width=24")
FAST = ("trainer.epochs=2", "logger=none", "trainer.progress=none", "trainer.num_threads=1")


@pytest.fixture(scope="module")
def own_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package outside mnistlab, importable in this process (the app runs in-process)."""
    where = tmp_path_factory.mktemp("own")
    (where / "ownpkg.py").write_text(textwrap.dedent(OWN))
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(where))
    yield where
    mp.undo()


@pytest.fixture(scope="module")
def own_run(own_pkg: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("run") / "r"
    p = app(run_dir, *OWN_DATA, *OWN_MODEL, *FAST)
    return {"dir": run_dir, "proc": p}


def test_own_model_on_own_data_trains_and_is_measured(own_run: dict[str, Any]) -> None:
    p, run_dir = own_run["proc"], own_run["dir"]
    assert p.returncode == 0, p.stderr[-3000:]
    s = read_summary(run_dir)
    assert s["status"] == "completed" and s["accounting_matches_plan"]
    assert s["plan"]["num_samples"] == 306  # 340 training images less 10% for validation
    assert s["final"]["test/acc"] > 0.6  # three well separated blobs: it learned
    assert list(s["bn"]) == ["body.2"]  # found by module path, not by family
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert any("bn/body.2/mean_gap_mean" in r for r in rows)


def test_plan_and_eval_read_the_same_own_code(own_run: dict[str, Any], capsys: Any) -> None:
    planned, _ = plan.plan_from_overrides([*OWN_DATA, *OWN_MODEL, "trainer.epochs=2"])
    assert planned.total_steps == read_summary(own_run["dir"])["counted"]["total_steps"]
    assert eval_cmd.main([str(own_run["dir"]), "--out", str(own_run["dir"] / "e.json")]) == 0
    report = json.loads((own_run["dir"] / "e.json").read_text())
    final = read_summary(own_run["dir"])["final"]
    assert report["metrics"]["test/acc"] == pytest.approx(final["test/acc"], abs=1e-6)
    assert "body.2" in capsys.readouterr().out or report["metrics"]


def test_the_built_model_is_the_users_class(own_pkg: Path) -> None:
    from mnistlab.config import ModelConfig
    from mnistlab.engine import models

    cfg = ModelConfig(_target_="ownpkg.Tiny", args={"width": 8})
    net = models.build(cfg, (1, 6, 6), 3, 0.0)
    assert type(net).__name__ == "Tiny" and net.head.in_features == 8
    assert list(models.bn_layers(net)) == ["body.2"]
    assert int(net.body[2].num_batches_tracked) == 0  # the shape check moved no statistic
    assert torch.equal(net.body[2].running_mean, torch.zeros(8))


CASES = {
    "not importable": (
        ("model._target_=ownpkg.Nope",),
        ["model._target_='ownpkg.Nope'", "no Nope"],
    ),
    "no module": (("model._target_=nopkg_x.Net",), ["model._target_='nopkg_x.Net'", "nopkg_x"]),
    "wrong input size": (
        OWN_MODEL,
        ["model._target_='ownpkg.Tiny'", "[B, 1, 8, 8]", "forward failed"],
    ),
    "wrong class count": (
        ("model._target_=ownpkg.Tiny", "+model.args.inputs=64"),
        ["model._target_='ownpkg.Tiny'", "to [B, 10]", "it gave (2, 3)"],
    ),
    "dropout": ((*OWN_MODEL, *OWN_DATA, "regularizer=dropout"), ["regularizer.dropout", "0 with"]),
    "data not four": (("dataset._target_=ownpkg.not_four",), ["dataset._target_", "returned a"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_own_code_that_cannot_work_is_one_line(own_pkg: Path, tmp_path: Path, case: str) -> None:
    overrides, needles = CASES[case]
    p = app(tmp_path / "run", *overrides, *FAST)
    assert_one_line_error(p, *needles)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
