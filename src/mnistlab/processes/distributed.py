"""Data-parallel runs on PyTorch's own engine: who starts the processes, the process group,
rank helpers and the cross-rank merges the accounting needs.

Three ways a run starts (``train.run`` dispatches with :func:`plan_launch`):

* **single** — ``trainer.devices=1`` and no torchrun: one process, no process group.
* **spawn** — ``trainer.devices=N > 1``: the Hydra job starts N workers with
  ``torch.multiprocessing`` (start method ``spawn``), one per CPU process (gloo) or per GPU
  (NCCL, ``torch.cuda.set_device(local_rank)``). Workers get the resolved config and the job's
  output folder; rank 0's summary comes back to the job, which writes ``summary.json``.
* **torchrun** — ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment: every process is
  already a rank; it joins the group (``env://``) instead of spawning. One or many machines.

A worker that raises or dies fails the whole job within seconds: spawn's ``join`` notices
the exit, terminates the other ranks (SIGTERM, then a hard kill after 30 s) and we raise one
:class:`WorkerError` line naming the rank and the error. Under torchrun its elastic agent
does the same. Collectives also carry a timeout (``MNISTLAB_DIST_TIMEOUT_S``, default 300 s)
so a rank stuck waiting for a vanished peer cannot hang forever.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import math
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnistlab.core import signals
from mnistlab.core.errors import ConfigError, UserError, user_message
from mnistlab.core.files import atomic_write_bytes
from mnistlab.processes.threads import resolve_threads, use_threads

log = logging.getLogger("mnistlab")

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
BN_STATS_FROM_RANK0 = "rank 0's micro-batches only (DDP broadcasts rank 0's buffers)"
BN_STATS_FROM_SYNC = "all ranks' micro-batches (SyncBatchNorm)"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default


class WorkerError(RuntimeError):
    """One rank failed; the message is one line: which rank, which error."""

    def __init__(self, rank: int, error: str, kind: str = "", user_error: bool = False) -> None:
        self.rank, self.error, self.kind, self.user_error = rank, error, kind, user_error
        super().__init__(f"rank {rank} failed: {error}")


@dataclass(frozen=True)
class Launch:
    """How this run's processes are arranged; ``rank``/``local_rank`` are this process's."""

    mode: str  # single | spawn | torchrun
    world_size: int
    local_world_size: int
    num_nodes: int
    device_type: str  # cpu | cuda
    rank: int = 0
    local_rank: int = 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"


def torchrun_env(env: Mapping[str, str] | None = None) -> dict[str, int] | None:
    """``rank``, ``world_size``, ``local_rank``, ``local_world_size`` when torchrun (or any
    launcher that sets the same variables, e.g. ``srun`` wrappers) started this process."""
    env = os.environ if env is None else env
    if not all(k in env for k in TORCHRUN_VARS):
        return None
    world = int(env["WORLD_SIZE"])
    return {
        "rank": int(env["RANK"]),
        "world_size": world,
        "local_rank": int(env["LOCAL_RANK"]),
        "local_world_size": int(env.get("LOCAL_WORLD_SIZE", world)),
    }


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_launch(
    cfg: Any, env: Mapping[str, str] | None = None, cuda_count: int | None = None
) -> Launch:
    """Decide single/spawn/torchrun and check the device request before any work.

    Raises :class:`ConfigError` (one line) for what cannot run here: more CUDA devices than
    exist, several nodes without torchrun, SyncBatchNorm on CPU.
    """
    t = cfg.trainer
    cuda = _cuda_count() if cuda_count is None else cuda_count
    device_type = "cuda" if t.accelerator == "cuda" or (t.accelerator == "auto" and cuda) else "cpu"
    tr = torchrun_env(env)
    if tr is not None:
        local, world = tr["local_world_size"], tr["world_size"]
        launch = Launch(
            "torchrun",
            world,
            local,
            max(1, world // local),
            device_type,
            tr["rank"],
            tr["local_rank"],
        )
        key, value = "torchrun --nproc-per-node", local
    else:
        if t.num_nodes > 1:
            raise ConfigError(
                "trainer.num_nodes",
                t.num_nodes,
                "1 when mnistlab starts its own processes; for several machines start every "
                "node with torchrun --nnodes=N (docs/guide.md: Several devices and machines)",
            )
        mode = "spawn" if t.devices > 1 else "single"
        launch = Launch(mode, t.devices, t.devices, 1, device_type)
        key, value = "trainer.devices", t.devices
    if device_type == "cuda" and cuda == 0:
        raise ConfigError(
            "trainer.accelerator", t.accelerator, "no CUDA device is visible here; use cpu or auto"
        )
    if device_type == "cuda" and launch.local_world_size > cuda:
        instead = f"to run {value} CPU processes" if value > 1 else "to run on the CPU"
        raise ConfigError(
            key,
            value,
            f"only {cuda} CUDA device(s) are visible here; use trainer.accelerator=cpu {instead}",
        )
    if launch.world_size > 1:
        timeout_s()  # the ranks' collectives wait this long: a bad value fails here, once
    if cfg.model.get("sync_bn", False) and device_type != "cuda":
        raise ConfigError(
            "model.sync_bn",
            True,
            "SyncBatchNorm runs on CUDA only (PyTorch supports it on GPU only); "
            "set model.sync_bn=false on CPU",
        )
    return launch


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to port 0, let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


TIMEOUT_ENV = "MNISTLAB_DIST_TIMEOUT_S"


def timeout_s() -> float:
    """How long a collective waits for the other ranks (``MNISTLAB_DIST_TIMEOUT_S``, 300 s):
    checked by :func:`plan_launch` before any rank starts, so a bad value is one line."""
    raw = os.environ.get(TIMEOUT_ENV, "300")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} (environment) is not allowed: seconds > 0")
    return value


# ---------------------------------------------------------------- process group, rank helpers


def init_group(launch: Launch, init_method: str = "env://") -> None:
    """Join the process group: gloo on CPU; NCCL on CUDA, one GPU per local rank."""
    import torch
    import torch.distributed as dist

    if launch.device_type == "cuda":
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(
        backend=launch.backend,
        init_method=init_method,
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=datetime.timedelta(seconds=timeout_s()),
    )


def teardown(clean: bool = True) -> None:
    """Leave the group. After a clean run, wait (bounded) for every rank first, so no rank
    tears down its sockets while a peer still reads; after a failure, just go."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        if clean:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s()))
            else:
                dist.barrier()
    finally:
        dist.destroy_process_group()


def current_backend() -> str | None:
    """``gloo``/``nccl`` inside a process group, None in a single process."""
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank_zero() -> bool:
    return rank() == 0


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` without a process group)."""
    import torch.distributed as dist

    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    import torch.distributed as dist

    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ------------------------------------------------------------------------------ the model


def wrap(model: Any, launch_device: Any, world: int, sync_bn: bool = False) -> Any:
    """DistributedDataParallel when ``world > 1`` (the model is returned as is otherwise).

    DDP broadcasts rank 0's parameters once here and rank 0's buffers (BatchNorm running
    statistics) before every forward, so the saved running statistics are an EMA over rank
    0's micro-batches only, unless ``sync_bn`` converts BatchNorm to SyncBatchNorm (CUDA).
    That broadcast makes every forward of the wrapped model a collective: code that runs the
    model on some ranks only (probes, checkpoints) must use :func:`mnistlab.engine.models.unwrap`.
    """
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    if world <= 1:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [launch_device.index] if launch_device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def fingerprint(model: Any) -> dict[str, str]:
    """SHA-256 of the parameters and of the buffers: equal on all ranks iff in sync."""
    import hashlib

    import torch

    def digest(tensors: Any) -> str:
        h = hashlib.sha256()
        for name, t in tensors:
            h.update(name.encode())
            h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    from mnistlab.engine.models import unwrap

    m = unwrap(model)
    return {"params": digest(m.named_parameters()), "buffers": digest(m.named_buffers())}


def rank_report(model: Any, counted: dict[str, int], sync_bn: bool) -> dict[str, Any]:
    """What every rank counted and whether its weights equal rank 0's (a collective)."""
    import torch
    import torch.distributed as dist

    own = {"counted": counted, "threads": torch.get_num_threads(), **fingerprint(model)}
    ranks = all_gather_objects(own)
    shape = torchrun_env()  # under torchrun: its numbers; self-spawned: one node
    local = shape["local_world_size"] if shape else world_size()
    return {
        "world_size": world_size(),
        "num_nodes": max(1, world_size() // local),
        "devices_per_node": local,
        "launcher": "torchrun" if shape else "spawn",
        "backend": dist.get_backend(),
        "counted_per_rank": [r["counted"] for r in ranks],
        "threads_per_rank": [r["threads"] for r in ranks],
        "params_identical_across_ranks": len({r["params"] for r in ranks}) == 1,
        "buffers_identical_across_ranks": len({r["buffers"] for r in ranks}) == 1,
        "bn_running_stats_from": BN_STATS_FROM_SYNC if sync_bn else BN_STATS_FROM_RANK0,
    }


# ------------------------------------------------------------------------ self-spawn


def _configure_worker_logging(rank_: int, log_files: list[str]) -> None:
    """Spawned workers start with bare logging: rank 0 logs like the Hydra job (console and
    ``train.log``); other ranks print warnings only, tagged with their rank."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter(LOG_FORMAT if rank_ == 0 else f"[rank {rank_}]{LOG_FORMAT}")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    if rank_ == 0:
        for f in log_files:
            fh = logging.FileHandler(f, mode="a")
            fh.setFormatter(fmt)
            root.addHandler(fh)
    root.setLevel(logging.INFO if rank_ == 0 else logging.WARNING)


def _worker(
    local_rank: int,
    target: Callable[..., Any],
    args: tuple[Any, ...],
    launch: Launch,
    init_method: str,
    threads: int,
    results: str,
    log_files: list[str],
) -> None:
    """One spawned rank: threads first, then the group, then ``target(launch, *args)``."""
    import torch

    torch.set_num_threads(threads)
    _configure_worker_logging(local_rank, log_files)
    me = Launch(
        launch.mode,
        launch.world_size,
        launch.local_world_size,
        launch.num_nodes,
        launch.device_type,
        rank=local_rank,
        local_rank=local_rank,
    )
    clean = False
    try:
        init_group(me, init_method)
        result = target(me, *args)
        clean = True
        atomic_write_bytes(Path(results) / f"result-{local_rank}.pkl", pickle.dumps(result))
    except BaseException as e:
        message = user_message(e)  # the user's or the environment's: one line
        user = message is not None
        info = {"rank": local_rank, "time": time.time(), "kind": type(e).__name__}
        info.update(error=message if user else f"{type(e).__name__}: {e}", user_error=user)
        atomic_write_bytes(Path(results) / f"error-{local_rank}.json", json.dumps(info).encode())
        if not user:
            traceback.print_exc()
        raise
    finally:
        teardown(clean)


def spawn(
    target: Callable[..., Any], launch: Launch, *args: Any, num_threads: Any = "auto"
) -> list[Any]:
    """Run ``target(launch_of_rank, *args)`` (a module-level function: it is pickled by name)
    on ``launch.world_size`` local processes joined in one group on 127.0.0.1; return every
    rank's result in rank order, or raise one :class:`WorkerError` naming the first rank that
    failed."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    threads = resolve_threads(num_threads, local_processes=launch.local_world_size)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    log_files = [
        h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)
    ]
    results = tempfile.mkdtemp(prefix="mnistlab-ranks-")
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)
    )  # children inherit
    try:
        ctx = mp.start_processes(
            _worker,
            args=(target, args, launch, init_method, threads, results, log_files),
            nprocs=launch.world_size,
            join=False,
            start_method="spawn",
        )
        quiet = logging.getLogger("torch.multiprocessing.spawn")
        level, quiet.level = quiet.level, logging.ERROR  # "Terminating process ..." is ours to say
        try:
            with _passing_on_signals(ctx.pids()):
                while not ctx.join(timeout=1.0):
                    pass
        except ProcessException as e:  # join has already terminated the other ranks
            raise _first_error(Path(results), e, [p.exitcode for p in ctx.processes]) from None
        finally:
            quiet.setLevel(level)
        out = []
        for r in range(launch.world_size):
            out.append(pickle.loads((Path(results) / f"result-{r}.pkl").read_bytes()))
        return out
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(results, ignore_errors=True)


@contextlib.contextmanager
def _passing_on_signals(pids: list[int]) -> Iterator[None]:
    """SIGTERM/SIGINT to this process go on to the ranks, which stop together at their next
    step boundary (:func:`any_rank`): checkpoint, summary ``interrupted``, as one run."""

    def handler(signum: int, frame: Any) -> None:
        signals.send(pids, signum)

    with signals.handling(handler):
        yield


def any_rank(value: int) -> int:
    """The largest ``value`` over all ranks (a collective; the value itself without a group):
    how every rank learns that one of them got a stop signal, at the same step."""
    import torch
    import torch.distributed as dist

    if world_size() == 1:
        return value
    on_gpu = dist.get_backend() == "nccl"
    box = torch.tensor([value], device="cuda" if on_gpu else "cpu")
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


def _first_error(results: Path, e: Exception, exit_codes: list[int | None]) -> WorkerError:
    """The root cause: a rank that died by a signal without a word (killed; its peers then
    fail for want of it, and join ends the rest with SIGTERM), else the earliest error a rank
    reported, else what ``join`` saw (exit code or signal)."""
    reported = {int(f.stem.split("-")[1]) for f in results.glob("error-*.json")}
    for rank_, code in enumerate(exit_codes):
        if code is not None and code < 0 and -code != signal.SIGTERM and rank_ not in reported:
            return WorkerError(rank_, f"the process died ({signal.Signals(-code).name})")
    found = []
    for f in results.glob("error-*.json"):
        try:
            found.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    if found:
        first = min(found, key=lambda i: i["time"])
        return WorkerError(first["rank"], first["error"], first["kind"], first["user_error"])
    rank_ = getattr(e, "error_index", -1)
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return WorkerError(rank_, lines[-1] if lines else type(e).__name__)


# --------------------------------------------------------------------------- torchrun


def join(target: Callable[..., Any], launch: Launch, *args: Any, num_threads: Any = "auto") -> Any:
    """Under torchrun: this process is one rank; set threads, join, run, leave."""

    use_threads(num_threads, local_processes=launch.local_world_size)
    init_group(launch)
    clean = False
    try:
        result = target(launch, *args)
        clean = True
        return result
    except Exception as e:
        if user_message(e) is not None:
            raise  # a user's mistake (or the environment's): its own one line
        _record_for_agent(e)
        traceback.print_exc()
        raise WorkerError(launch.rank, f"{type(e).__name__}: {e}", type(e).__name__) from None
    finally:
        teardown(clean)


def _record_for_agent(e: BaseException) -> None:
    """Write the error where torchrun's agent reads it (``TORCHELASTIC_ERROR_FILE``), so its
    "Root Cause" report shows this rank's message instead of just an exit code."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(e)
    except Exception:  # the report is a courtesy; never hide the real error behind it
        log.debug("could not record the error for torchrun's agent", exc_info=True)


def one_folder_under_torchrun(main: Callable[..., Any]) -> Callable[..., Any]:
    """Make every torchrun rank share rank 0's Hydra output folder.

    Under torchrun each rank runs ``@hydra.main`` on its own, and Hydra would give each one
    its own timestamped run folder (``${now:...}`` resolves per process), with its own
    ``.hydra/`` and log. Chosen fix: before Hydra parses the command line, ranks other than 0
    get a throw-away temporary run/sweep folder with no ``.hydra/`` subfolder and console-only
    logging (appended overrides win over the user's), which is removed at exit; after joining
    the process group they receive rank 0's real folder by broadcast (:func:`broadcast_object`)
    and write nothing there (only rank 0 writes). So exactly one folder exists per run.
    """

    @functools.wraps(main)
    def wrapper(*a: Any, **kw: Any) -> Any:
        tr = torchrun_env()
        if tr is not None and tr["rank"] > 0:
            scratch = tempfile.mkdtemp(prefix=f"mnistlab-rank{tr['rank']}-")
            sys.argv += [
                f"hydra.run.dir={scratch}",
                f"hydra.sweep.dir={scratch}",
                "hydra.output_subdir=null",
                "hydra/job_logging=stdout",
            ]
            try:
                return main(*a, **kw)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return main(*a, **kw)

    return wrapper
