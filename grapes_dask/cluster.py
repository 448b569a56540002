"""Dask clusters: an embedded LocalCluster by default, or an existing scheduler.

The same analysis code runs on both: :func:`cluster_client` yields a ``distributed.Client``
that is passed to :func:`grapes_dask.analyze` as ``client=``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from ._errors import GrapesInputError

__all__ = ["cluster_client", "cores"]


def cores() -> int:
    """Cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


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
        Worker processes of the local cluster (default 1). The cores are shared out as threads
        between them: the engine's kernels are Numba functions that release the GIL, so one
        process with a thread per core runs them in parallel and holds the data once, with
        one interpreter's memory instead of one per core.
    memory_limit : str or int, optional
        Memory limit per local worker (dask's ``memory_limit``).
    dashboard : bool
        Serve the dashboard of the local cluster on a free port.

    Yields
    ------
    distributed.Client
        ``client.dashboard_link`` is the dashboard's address.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            if scheduler.endswith(".json"):
                client = Client(scheduler_file=scheduler, timeout="20s")
            else:
                client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise GrapesInputError(
                f"cannot reach the dask scheduler {scheduler!r} ({exc}): check the address and that the "
                "scheduler is running, or leave out --scheduler to use a local cluster"
            ) from exc
        with client:
            yield client
        return
    n = 1 if workers is None else int(workers)
    if n < 1:
        raise GrapesInputError(f"--workers {n}: give at least one worker")
    threads = max(1, cores() // n)
    with LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, memory_limit=memory_limit,
                      dashboard_address=":0" if dashboard else None, silence_logs=40) as cluster:
        with Client(cluster) as client:
            yield client
