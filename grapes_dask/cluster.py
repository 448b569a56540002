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

from ._errors import GrapesInputError

__all__ = ["cluster_client", "check_scheduler", "cores", "dashboard_link"]


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
    if n == 1:
        # one worker in this process, a thread per core: the kernels release the GIL, the data
        # is held once, and Ctrl-C reaches only this process
        cluster = LocalCluster(n_workers=1, threads_per_worker=threads, processes=False, memory_limit=memory_limit,
                               silence_logs=logging.CRITICAL, **http)
    else:
        # worker processes ignore SIGINT (inherited through exec): a Ctrl-C in the terminal
        # reaches the whole process group, and this process alone shuts the cluster down
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            cluster = LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, memory_limit=memory_limit,
                                   silence_logs=logging.CRITICAL, **http)
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
