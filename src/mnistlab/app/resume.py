"""The config a resumed run trains with: its checkpoint's own, with what the command line may
change. So ``hydra.run.dir=<run folder> trainer.resume=true`` alone resumes the run as it was
configured, and a key that may not change is refused in one line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mnistlab.core.errors import ConfigError
from mnistlab.core.files import flatten
from mnistlab.engine.checkpoint import LOCAL, MAY_CHANGE, may_change, read_for_resume


def resume_config(path: Path, cfg: Any, given: Sequence[str]) -> Any:
    """The config a resumed run trains with: the checkpoint's own, except the keys in
    :data:`LOCAL` and the keys the command line ``given`` (Hydra's task overrides) names,
    which must agree with it unless they may change. So ``hydra.run.dir=<run folder>
    trainer.resume=true`` alone resumes the run as it was configured."""
    saved = flatten(read_for_resume(path)["config"])
    now = flatten(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    named = [o.split("=", 1)[0].lstrip("+~") for o in given]

    def explicit(key: str) -> bool:
        return any(key == n or key.startswith(n + ".") for n in named)

    refused = [
        f"{k} ({saved[k]!r} -> {now.get(k, '<absent>')!r})"
        for k in saved
        if explicit(k) and not may_change(k) and saved[k] != now.get(k, "<absent>")
    ]
    if refused:
        raise ConfigError(
            "trainer.resume",
            True,
            f"{path} was written with a different config: {'; '.join(refused)} "
            f"(only {', '.join(MAY_CHANGE)} may change; leave the rest out to keep the run's own)",
        )
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in saved.items():
        if not explicit(key) and not any(key == k or key.startswith(k + ".") for k in LOCAL):
            OmegaConf.update(out, key, value, merge=False, force_add=True)
    return out
