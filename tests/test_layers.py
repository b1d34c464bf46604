"""The import layers are a contract (``[tool.importlinter]`` in pyproject.toml, run by
``make test`` before pytest): these tests show that it holds for the package as it is, that it
fails on a planted violation of each kind it names, and that no module reaches a command
through a string import, which import-linter cannot see."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT

LINT = Path(sys.executable).with_name("lint-imports")
COMMANDS = ("train", "eval", "plan", "compare", "report")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over the package in ``tree/src`` with ``tree/pyproject.toml``."""
    env = {"PYTHONPATH": str(tree / "src"), "PATH": str(LINT.parent)}
    return subprocess.run(
        [str(LINT), "--no-cache", "--config", str(tree / "pyproject.toml")],
        capture_output=True, text=True, cwd=tree, env=env, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package and its contract, copied where a test may break them."""
    tree = tmp_path_factory.mktemp("tree")
    shutil.copytree(ROOT / "src" / "mnistlab", tree / "src" / "mnistlab",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(ROOT / "pyproject.toml", tree)
    return tree


def test_the_package_keeps_every_contract(copy: Path) -> None:
    p = lint(copy)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "0 broken" in p.stdout


# (the module a planted import goes into, the import, the contract that must break)
PLANTED = {
    "engine imports Hydra": ("engine/loop.py", "import hydra", "no Hydra, OmegaConf or W&B"),
    "BN imports W&B": ("bn/stats.py", "import wandb", "no Hydra, OmegaConf or W&B"),
    "ground imports up": ("core/files.py", "import mnistlab.config", "The ground"),
    "logging imports the engine": ("logger/sinks.py", "import mnistlab.engine.steps", "Logging"),
    "engine imports a command": ("engine/data.py", "import mnistlab.train", "Layers"),
    "config imports the engine": ("config/validate.py", "import mnistlab.engine.models", "Layers"),
    "a circle in a package": ("engine/steps.py", "import mnistlab.engine.loop", "circles"),
}


@pytest.mark.parametrize("case", list(PLANTED))
def test_a_planted_violation_breaks_its_contract(copy: Path, case: str) -> None:
    where, line, contract = PLANTED[case]
    module = copy / "src" / "mnistlab" / where
    original = module.read_text()
    module.write_text(original + f"\n{line}  # planted\n")
    try:
        p = lint(copy)
    finally:
        module.write_text(original)
    assert p.returncode != 0, p.stdout[-3000:]
    broken = " ".join(p.stdout.split("Broken contracts")[-1].split())  # unwrap its lines
    assert contract in broken, p.stdout[-3000:]


def test_no_module_names_a_command_in_a_string() -> None:
    """``"mnistlab.train:fn"`` handed to an importer is an arrow up that the graph misses."""
    found = []
    for path in (ROOT / "src" / "mnistlab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for name in COMMANDS:
                    if node.value.startswith((f"mnistlab.{name}:", f"mnistlab.{name}.")):
                        found.append(f"{path.relative_to(ROOT)}: {node.value!r}")
    assert not found, found
