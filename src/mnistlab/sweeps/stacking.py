"""``hydra/launcher=stacked``: the jobs of a sweep that can share one computation train as one.

A sweep of seeds × learning rates × regularizer strengths is many copies of one small
model: alone, each copy leaves the machine idle between tiny kernels. This launcher groups
the jobs whose configs are equal but for :data:`FREE` keys and whose models have the same
layers (:func:`group_key`), at most ``max_group`` per group, and trains each group as one
a :class:`~mnistlab.sweeps.stack.Stack` (:mod:`mnistlab.sweeps.lockstep`). A job that fits no
group runs as Hydra's basic launcher runs it.

Every job stays a job: Hydra starts it as its own launchers do (folder, ``.hydra/``,
logging, callbacks: :class:`_HydraJob`), and it goes through the same
:func:`mnistlab.app.lifecycle.lifecycle` as a job run alone, which pauses when the job is set up.
Once the group has trained, each job writes its own summary, rows, checkpoint and W&B run,
and returns its own objective to the sweeper. The summary's ``launcher`` field says how it
trained.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    _flush_loggers,
    _save_config,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger("mnistlab")

# What may differ between the jobs of one group: each copy in the stack has its own.
FREE = (
    "trainer.seed",
    "optimizer.lr",
    "optimizer.momentum",
    "regularizer.l1",
    "regularizer.l2",
    "regularizer.dropout",
    "model.bn_momentum",
    "trainer.grad_clip_norm",  # each copy clips its own gradient (Stack.clip)
    "trainer.grad_clip_value",
    "trainer.early_stopping.patience",  # each copy stops alone (lockstep: released)
    "trainer.early_stopping.min_delta",
)


def launch(
    context: HydraContext,
    task_function: TaskFunction,
    config: DictConfig,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    max_group: int,
) -> list[JobReturn]:
    """The sweep's jobs, grouped and run: a group stacked, a job on its own as Hydra's basic
    launcher runs it. Returns are in the jobs' order."""
    setup_globals()
    saved_hydra = HydraConfig.instance().cfg  # grouping sets each job's config in turn
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    configs, tasks = [], []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        sweep_config = context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        configs.append(sweep_config)
        tasks.append(_task_config(sweep_config))
    groups = _groups(configs, tasks, max_group)
    HydraConfig.instance().cfg = saved_hydra
    log.info("Launching %d jobs: %d stacked group(s), %d on their own", len(configs),
             sum(len(g) > 1 for g in groups), sum(len(g) == 1 for g in groups))  # fmt: skip
    returns: dict[int, JobReturn] = {}
    for members in groups:
        for i in members:
            log.info("\t#%d : %s", initial_job_idx + i,
                     " ".join(filter_overrides(configs[i].hydra.overrides.task)))  # fmt: skip
        if len(members) == 1:
            returns[members[0]] = run_job(
                hydra_context=context,
                task_function=task_function,
                config=configs[members[0]],
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        else:
            jobs = [_HydraJob(context, task_function, configs[i], tasks[i]) for i in members]
            returns.update(zip(members, _run_group(jobs), strict=True))
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return [returns[i] for i in range(len(configs))]


def group_key(config: DictConfig, task_cfg: DictConfig) -> str | None:
    """What must be equal for jobs to train as one: the whole job config but :data:`FREE`,
    and the model's layers (built on the meta device: no memory, no random draws). None:
    the job cannot stack (several processes, compiled, a working directory of its own, a
    config that does not resolve or build; those run on their own and report their own
    errors)."""
    import torch

    from mnistlab.engine import data, models
    from mnistlab.sweeps import stack

    job = config.hydra.job
    if job.chdir or job.env_set:
        return None
    try:
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in the job's values
        task = OmegaConf.to_container(task_cfg, resolve=True)
        assert isinstance(task, dict)
        t = task["trainer"]
        if t["devices"] != 1 or t["num_nodes"] != 1 or t["compile"]:
            return None
        shape, classes = data.SHAPES[task["dataset"]["name"]]
        with torch.device("meta"):
            model = models.build(OmegaConf.create(task["model"]), shape, classes,
                                 task["regularizer"]["dropout"])  # fmt: skip
    except Exception:  # the job's own run reports it, as one line
        return None
    layers = stack.signature(model)
    if layers is None:
        return None
    for key in FREE:
        *path, leaf = key.split(".")
        node = task
        for part in path:
            node = node.get(part, {})
        node.pop(leaf, None)
    return json.dumps([task, layers], sort_keys=True, default=str)


def _groups(
    configs: Sequence[DictConfig], tasks: Sequence[DictConfig], max_group: int
) -> list[list[int]]:
    """The jobs' indices by group, in the order of each group's first job; a group holds at
    most ``max_group`` jobs, a job that cannot stack is a group of its own."""
    by_key: dict[str, list[int]] = defaultdict(list)
    groups: list[list[int]] = []
    for i, (config, task_cfg) in enumerate(zip(configs, tasks, strict=True)):
        key = group_key(config, task_cfg)
        if key is None:
            groups.append([i])
            continue
        if not by_key[key] or len(by_key[key]) == max_group:
            by_key[key] = []
            groups.append(by_key[key])
        by_key[key].append(i)
    return groups


def _task_config(config: DictConfig) -> DictConfig:
    """A sweep job's output folder set in its config, as Hydra's ``run_job`` does; returns
    the task's config (a copy without the ``hydra`` node)."""
    out = os.path.join(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir))
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(out)
    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg


class _HydraJob:
    """One job of a group, started and ended as Hydra's ``run_job`` does it (output folder,
    ``.hydra/``, logging, ``on_job_start``/``on_job_end``), in steps, so that a group's jobs
    can all be started before any of them trains. They share the process's working directory
    (stacking needs ``hydra.job.chdir=false``)."""

    def __init__(
        self,
        context: HydraContext,
        task_function: TaskFunction,
        config: DictConfig,
        task_cfg: DictConfig,
    ) -> None:
        self.context, self.task_function = context, task_function
        self.config, self.task_cfg = config, task_cfg
        self.ret = JobReturn()

    def start(self) -> Any:
        """The job's folder, Hydra files and ``on_job_start``; returns its Hydra config."""
        config, task_cfg = self.config, self.task_cfg
        Path(config.hydra.runtime.output_dir).mkdir(parents=True, exist_ok=True)
        hc = self.enter()
        self.ret.cfg, self.ret.hydra_cfg = task_cfg, copy.deepcopy(HydraConfig.instance().cfg)
        overrides = OmegaConf.to_container(config.hydra.overrides.task)
        self.ret.overrides = overrides  # type: ignore[assignment]
        self.ret.working_dir = os.getcwd()
        if config.hydra.output_subdir is not None:
            files = Path(config.hydra.runtime.output_dir) / str(config.hydra.output_subdir)
            _save_config(task_cfg, "config.yaml", files)
            _save_config(self.ret.hydra_cfg, "hydra.yaml", files)  # type: ignore[arg-type]
            _save_config(config.hydra.overrides.task, "overrides.yaml", files)
        self.context.callbacks.on_job_start(config=config, task_function=self.task_function)
        return hc

    def enter(self) -> Any:
        """Make this the current job (its Hydra config and log file); its Hydra config."""
        HydraConfig.instance().set_config(self.config)
        configure_log(self.config.hydra.job_logging, self.config.hydra.verbose)
        return HydraConfig.get()

    def end(self, value: Any, status: JobStatus) -> JobReturn:
        self.ret.return_value, self.ret.status = value, status
        self.ret.task_name = JobRuntime.instance().get("name")
        _flush_loggers()
        self.context.callbacks.on_job_end(config=self.config, job_return=self.ret)
        return self.ret


def _run_group(jobs: list[_HydraJob]) -> list[JobReturn]:
    """Start every job up to its pause (set up, or already ended), train the ones that are
    ready together, then let each write its summary, and only then end them."""
    from mnistlab.app.lifecycle import Ready, lifecycle

    saved_hydra = HydraConfig.instance().cfg
    flows, ready = [], {}
    try:
        for i, job in enumerate(jobs):
            hc = job.start()
            flow = lifecycle(job.task_cfg, hc, time.perf_counter(), stacked=True)
            flows.append(flow)
            paused = next(flow)
            if isinstance(paused, Ready):
                ready[i] = paused
        outcomes = _train(ready)
        for i, flow in enumerate(flows):
            if i in ready:
                jobs[i].enter()
                flow.send(outcomes[i])
        returns = []
        for job, flow in zip(jobs, flows, strict=True):
            job.enter()
            returns.append(_finish(job, flow))
        return returns
    finally:
        HydraConfig.instance().cfg = saved_hydra


def _finish(job: _HydraJob, flow: Any) -> JobReturn:
    """The job's last step (its exit value for the sweeper) and Hydra's end of the job."""
    try:
        next(flow)
    except StopIteration as done:
        return job.end(done.value, JobStatus.COMPLETED)
    except Exception as e:
        return job.end(e, JobStatus.FAILED)
    raise AssertionError("a job's lifecycle pauses at most twice")


def _stop_signal(outcomes: dict[int, Any]) -> int | None:
    """The signal that interrupted a job already trained, if one did."""
    from mnistlab.core.errors import Interrupted

    stopped = [e.signum for e in outcomes.values() if isinstance(e, Interrupted)]
    return stopped[0] if stopped else None


def _train(ready: dict[int, Any]) -> dict[int, Any]:
    """Train the set-up jobs: those of one model shape, plan and starting step as one stack,
    any other alone. Each job's :class:`~mnistlab.engine.loop.Fit` or what ended it, by index."""
    from mnistlab.app import job
    from mnistlab.core.errors import Interrupted
    from mnistlab.engine import checkpoint
    from mnistlab.sweeps import lockstep
    from mnistlab.sweeps.stack import signature

    by_shape: dict[Any, list[int]] = defaultdict(list)
    for i, r in ready.items():
        j = r.job
        by_shape[(signature(j.model), json.dumps(asdict(j.counter)), j.plan)].append(i)
    outcomes: dict[int, Any] = {}
    for members in by_shape.values():
        jobs, streams = [ready[i].job for i in members], [ready[i].streams for i in members]
        if len(members) > 1 and _stop_signal(outcomes) is None:
            try:
                outcomes.update(zip(members, lockstep.fit(jobs, streams), strict=True))
                for i in members:
                    ready[i].group = len(members)
                continue
            except ValueError as e:  # the optimizers cannot stack after all
                log.info("jobs %s train one by one: %s", members, e)
        for i in members:
            signum = _stop_signal(outcomes)
            if signum is not None:  # the sweep is stopping: the rest keep their checkpoint
                outcomes[i] = Interrupted(signum, ready[i].job.counter.optimizer_steps)
                continue
            checkpoint.set_rng_state(ready[i].streams.saved)  # where its own loop starts
            outcomes[i] = job.fit(ready[i].job)
    return outcomes
