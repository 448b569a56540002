"""Dask clusters: an embedded LocalCluster by default, or an existing scheduler.

The same analysis code runs on both: :func:`cluster_client` yields a ``distributed.Client``
that is passed to :func:`grapes_dask.analyze` as ``client=``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Iterator

from ._errors import Alt, GrapesInputError, GrapesWorkerError

__all__ = ["cluster_client", "check_scheduler", "cores", "dashboard_link", "worker_died_error"]


def cores() -> int:
    """Cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _is_scheduler_file(scheduler: str) -> bool:
    return "://" not in scheduler and (scheduler.endswith(".json") or os.path.isfile(scheduler))


def check_scheduler(scheduler: str) -> None:
    """Fail at once on a scheduler file that does not exist or cannot be read.

    Parameters
    ----------
    scheduler : str
        An address (``tcp://host:8786``, ``host:8786``) or the path of a scheduler file
        (JSON written by ``dask scheduler --scheduler-file``, ``dask-mpi`` or a job script).

    Raises
    ------
    GrapesInputError
        A path that is not a file, or a file without a scheduler address; dask itself would wait
        for such a file to appear.
    """
    import json

    if "://" in scheduler or (":" in scheduler and not scheduler.endswith(".json") and not os.path.exists(scheduler)):
        return  # an address: reached (or not) with a timeout
    if not os.path.isfile(scheduler):
        raise GrapesInputError(
            f"scheduler file {scheduler!r} does not exist: give the file the scheduler wrote "
            "(dask scheduler --scheduler-file PATH) or its address, tcp://host:8786"
        )
    try:
        with open(scheduler) as f:
            address = json.load(f).get("address")
    except (OSError, ValueError, AttributeError) as exc:
        raise GrapesInputError(f"scheduler file {scheduler!r} cannot be read as JSON ({exc})") from None
    if not address:
        raise GrapesInputError(f"scheduler file {scheduler!r} holds no 'address': is it a dask scheduler file?")


@contextlib.contextmanager
def cluster_client(scheduler: str | None = None, *, workers: int | None = None,
                   memory_limit: str | int | None = "auto", dashboard: bool = True) -> Iterator["distributed.Client"]:
    """A ``distributed.Client`` on an existing scheduler or on a new local cluster.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``) or a scheduler file (``*.json``).
        Default: start a ``LocalCluster`` in this process and close it on exit.
    workers : int, optional
        Workers of the local cluster (default 1). One worker runs inside this process with a
        thread per core: the engine's kernels are Numba functions that release the GIL, so the
        threads run them in parallel, the data is held once, and a Ctrl-C reaches only this
        process. ``workers > 1`` starts that many worker processes sharing the cores as
        threads (they ignore SIGINT; this process shuts them down).
    memory_limit : str or int, optional
        Memory limit per local worker (dask's ``memory_limit``: bytes, ``"8GiB"``, or ``"auto"``
        for the machine's memory shared between the workers).
    dashboard : bool
        Serve the dashboard of the local cluster on a free port.

    Yields
    ------
    distributed.Client
        ``client.dashboard_link`` is the dashboard's address.
    """
    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        check_scheduler(scheduler)
        try:
            if _is_scheduler_file(scheduler):
                client = Client(scheduler_file=scheduler, timeout="20s")
            else:
                client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise GrapesInputError(
                f"cannot reach the dask scheduler {scheduler!r} ({exc}): check the address and that the "
                "scheduler is running, or leave out {scheduler} to use a local cluster", scheduler=None,
            ) from exc
        with client:
            yield client
        return
    n = 1 if workers is None else int(workers)
    if n < 1:
        raise GrapesInputError("{workers}: give at least one worker", workers=n)
    threads = max(1, cores() // n)
    # without the dashboard the scheduler still serves its health routes over HTTP: on a free
    # loopback port, as the dashboard (its default, 8787 on every interface, warns when taken)
    http = dict(dashboard_address="127.0.0.1:0", scheduler_kwargs=None if dashboard else {"dashboard": False})
    # No pausing: a worker above distributed.worker.memory.pause (80% of its limit) stops taking
    # tasks until its memory falls, which never happens when the memory is the process' own
    # (Python, the Numba kernels, the client's tables for the in-process worker): the run hung
    # (measured: --memory-limit 300MiB, 1 or 2 workers). Our tasks keep nothing a pause could
    # spill; a worker process that passes 95% is restarted by its nanny and its tasks rerun
    # (and a task that kills it every time is named, cluster.worker_died_error).
    no_pause = dask.config.set({"distributed.worker.memory.pause": False})
    if n == 1:
        # one worker in this process, a thread per core: the kernels release the GIL, the data
        # is held once, and Ctrl-C reaches only this process. It has no nanny: nothing restarts
        # it, and a run that exhausts the machine's memory is killed by the system
        with no_pause:
            cluster = LocalCluster(n_workers=1, threads_per_worker=threads, processes=False,
                                   memory_limit=memory_limit, silence_logs=logging.CRITICAL, **http)
    else:
        # worker processes ignore SIGINT (inherited through exec): a Ctrl-C in the terminal
        # reaches the whole process group, and this process alone shuts the cluster down; each
        # has a nanny, which restarts it when it dies (and passes it the configuration above)
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            with no_pause:
                cluster = LocalCluster(n_workers=n, threads_per_worker=threads, processes=True,
                                       memory_limit=memory_limit, silence_logs=logging.CRITICAL, **http)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
    with cluster, Client(cluster) as client:
        try:
            yield client
        except KeyboardInterrupt:
            _quiet_shutdown()
            raise


def _quiet_shutdown() -> None:
    """After Ctrl-C, the client's pending gathers end with errors nobody reads; do not print them."""
    for name in ("asyncio", "distributed", "tornado"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def dashboard_link(client) -> str | None:
    """Address of the dashboard of `client`'s cluster, or None when it serves none.

    For the embedded cluster the dashboard listens on the loopback interface only, so the link
    names 127.0.0.1 (reach it from another machine through an SSH tunnel).
    """
    cluster = getattr(client, "cluster", None)
    server = getattr(getattr(cluster, "scheduler", None), "http_server", None)
    if server is not None and getattr(server, "port", None):
        return f"http://127.0.0.1:{server.port}/status"
    try:
        return client.dashboard_link
    except Exception:  # pragma: no cover - a scheduler without the dashboard service
        return None


# task functions of the engine -> what a user calls them
_TASK_NAMES = {
    "_pass1_task": "pass 1 block",
    "_pass2_task": "pass 2 region",
    "_fill_holes_task": "pass 2 region (hole filling)",
    "_near_block": "neighbour-search block",
}


def _span(slices: tuple) -> str:
    axes = "zyx"[-len(slices):] if len(slices) <= 3 else [f"axis {i}" for i in range(len(slices))]
    return ", ".join(f"{a} {s.start}:{s.stop}" for a, s in zip(axes, slices))


def _describe_task(key, objs) -> str:
    """``pass 2 region z 0:64, y 0:64, x 32:64 (labels read z 0:64, ...)`` for the task `key` of
    the graph of `objs`, from its function and the slices among its arguments."""
    from dask.utils import key_split

    def graphs(o):
        if isinstance(o, (list, tuple)):
            for x in o:
                yield from graphs(x)
        elif hasattr(o, "__dask_graph__"):
            yield o.__dask_graph__()

    task = None
    for g in graphs(objs):
        try:
            task = g[key]
            break
        except (KeyError, TypeError):
            continue
    func = getattr(getattr(task, "func", None), "__name__", None) or key_split(key)
    what = _TASK_NAMES.get(func) or _TASK_NAMES.get(key_split(key).lstrip("_"))
    if what is None:
        what = f"task {func}"
    args = getattr(task, "args", ()) or ()
    slices = [a for a in args if isinstance(a, tuple) and a and all(isinstance(x, slice) for x in a)]
    if not slices:
        return what
    if func == "_pass2_task" and len(slices) >= 2 and slices[0] != slices[1]:
        # (labels outer region with its halo, grey core)
        return f"{what} {_span(slices[1])} (labels read with its halo: {_span(slices[0])})"
    return f"{what} {_span(slices[0])}"


def _workers_memory(client) -> str:
    """``" (workers: 1.0 GiB for 2 threads)"`` from the scheduler, or "" when unknown."""
    from dask.utils import format_bytes

    kinds = set()
    with contextlib.suppress(Exception):
        for w in client.scheduler_info()["workers"].values():
            kinds.add((int(w.get("memory_limit") or 0), int(w.get("nthreads") or 0)))
    if not kinds:  # the dead worker's nanny is restarting it: the local cluster's own settings
        from dask.utils import parse_bytes

        with contextlib.suppress(Exception):
            for spec in client.cluster.worker_spec.values():
                opts = spec.get("options", {})
                mem = opts.get("memory_limit")
                kinds.add((int(parse_bytes(mem) if isinstance(mem, str) else mem or 0), int(opts.get("nthreads") or 0)))
    kinds = sorted((m, t) for m, t in kinds if m and t)
    if not kinds:
        return ""
    return " (workers: " + ", ".join(f"{format_bytes(m)} for {t} thread{'s' if t > 1 else ''}" for m, t in kinds) + ")"


def worker_died_error(exc: BaseException, objs=(), client=None) -> GrapesWorkerError:
    """The error for a task that killed its worker every time it ran (distributed's ``KilledWorker``).

    Distributed reruns the tasks of a dead worker on another or restarted worker (the nanny of
    a worker process restarts it when it passes its memory limit, by default at 95%), and gives
    up after ``distributed.scheduler.allowed-failures`` deaths (default 3) by raising
    ``KilledWorker`` in the client. This names the task (pass 1 block or pass 2 region and its
    voxel ranges, read from the task in the graph of `objs`), says that the worker most probably
    ran out of memory and which settings give a task less to hold or more memory, worded for
    the API and for the command line. Every computation of :mod:`grapes_dask.table` on a
    distributed client raises it in place of ``KilledWorker``.

    Parameters
    ----------
    exc : distributed.KilledWorker
        As raised by ``client.gather``; ``exc.task`` is the key, ``exc.allowed_failures`` the
        setting.
    objs : dask collections or lists of them
        What was computed, to find the task's function and arguments.
    client : distributed.Client, optional
        To say the workers' memory limit and threads.

    Returns
    -------
    GrapesWorkerError
    """
    key = getattr(exc, "task", None)
    if key is None and getattr(exc, "args", None):
        key = exc.args[0]
    allowed = getattr(exc, "allowed_failures", None)
    try:
        what = _describe_task(key, objs)
    except Exception:  # pragma: no cover - never hide the worker's death behind our own error
        what = "a task"
    times = ("once" if allowed == 0 else f"{allowed + 1} times") if isinstance(allowed, int) else "every time it ran"
    workers = _workers_memory(client) if client is not None else ""
    fix = Alt(
        "use a smaller region_size (default 400: smaller pass 1 blocks and pass 2 regions) or a lower "
        "memory_limit (the memory per worker the planner fits the regions to), or give each worker more memory "
        "or fewer threads (LocalCluster(memory_limit=..., threads_per_worker=...), dask worker --memory-limit, "
        "--nthreads)",
        "use a smaller --region-size (default 400: smaller pass 1 blocks and pass 2 regions), or give each worker "
        "more memory: a larger --memory-limit if the machine has it (a worker process holds about 350 MiB "
        "before any data), a --memory-limit below the free memory if other programs use much of it (the "
        "planner then cuts smaller regions), or with --scheduler workers started with more memory or fewer "
        "threads (dask worker --memory-limit, --nthreads)",
    )
    return GrapesWorkerError(
        f"{what} killed its dask worker {times} (task {key!r}){workers}, most probably by running out of "
        "memory: a worker's nanny restarts it when it passes 95% of its memory limit, the system kills a "
        "process that exhausts the machine's memory, and distributed gives up on a task after "
        "distributed.scheduler.allowed-failures deaths. To give each task less to hold, {fix}",
        task=str(key), fix=fix)
