"""Dask clusters: an embedded LocalCluster by default, an existing scheduler, or batch jobs.

The same analysis code runs on all of them: :func:`cluster_client` yields a
``distributed.Client`` that is passed to :func:`grapes_dask.analyze` as ``client=``. On an HPC
machine, :func:`hpc_cluster` starts the workers as SLURM or PBS jobs through dask-jobqueue.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import signal
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ._errors import Alt, GrapesInputError, GrapesWorkerError

__all__ = ["cluster_client", "check_cluster_options", "check_scheduler", "cores", "dashboard_link", "hpc_cluster",
           "hpc_settings", "read_cluster_config", "worker_died_error", "HpcSettings", "CLUSTER_KINDS",
           "DEFAULT_WORKER_TIMEOUT"]

#: Seconds :func:`cluster_client` waits for the first worker of a scheduler or of batch jobs.
DEFAULT_WORKER_TIMEOUT = 600.0


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
                   memory_limit: str | int | None = "auto", dashboard: bool = True,
                   scheduler_file: str | os.PathLike | None = None, cluster: str | None = None,
                   cluster_config: str | os.PathLike | None = None, worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
                   echo: Callable[[str], None] | None = None, **settings) -> Iterator["distributed.Client"]:
    """A ``distributed.Client`` on an existing scheduler, on batch jobs, or on a new local cluster.

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
        Serve the dashboard of the local cluster (or of the batch jobs' scheduler) on a free port.
    scheduler_file : path, optional
        The JSON file a running scheduler wrote (``dask scheduler --scheduler-file``,
        ``dask-mpi --scheduler-file``); the same as giving it as `scheduler`, which must then
        be left out.
    cluster : {"slurm", "pbs", "local"}, optional
        Start the workers as batch jobs of this kind (:func:`hpc_cluster`), which are cancelled
        on exit; ``"local"`` or None: the local cluster (or `scheduler`).
    cluster_config : path, optional
        YAML file of batch-job settings (:func:`read_cluster_config`); only with `cluster`.
    worker_timeout : float
        Seconds to wait for the first worker to connect, with `cluster` or `scheduler`
        (default 600); a :class:`GrapesInputError` names the queue command to look at when
        none does.
    echo : callable, optional
        Called with one line of text on what happens to the batch jobs (submitted, waiting,
        first worker), e.g. ``print``.
    **settings
        Batch-job settings of :func:`hpc_cluster` (``jobs``, ``cores``, ``memory``,
        ``processes``, ``walltime``, ``queue``, ``account``, ``local_directory``,
        ``job_extra_directives``, ``python``, ``job_name``, other dask-jobqueue keywords);
        only with `cluster`. They override `cluster_config`.

    Yields
    ------
    distributed.Client
        ``client.dashboard_link`` is the dashboard's address. With `cluster` or `scheduler`,
        at least one worker is connected when it is yielded, so that the memory budget of
        the analysis (:func:`grapes_dask.plan.memory_budget`) follows the workers' memory.

    Raises
    ------
    GrapesInputError
        Options that do not go together (`cluster` with `scheduler` or `workers`, `scheduler`
        and `scheduler_file`, job settings without `cluster`), an unknown cluster kind, a
        missing or bad job setting: all before any job is submitted. No worker within
        `worker_timeout`.
    """
    import dask
    from distributed import Client, LocalCluster

    hs = check_cluster_options(scheduler, workers=workers, memory_limit=memory_limit, scheduler_file=scheduler_file,
                               cluster=cluster, cluster_config=cluster_config, worker_timeout=worker_timeout,
                               **settings)
    scheduler = scheduler or (os.fspath(scheduler_file) if scheduler_file else None)
    if hs is not None:
        kind = hs.kind
        with _build_hpc_cluster(hs, dashboard=dashboard) as jobs, Client(jobs) as client:
            jobs.scale(jobs=hs.jobs)
            if echo:
                echo(f"submitted {hs.describe()}; waiting up to {worker_timeout:g} s for the first worker "
                     f"({_QUEUES[kind][1]} shows the jobs)")
            _wait_for_worker(client, worker_timeout, lambda t: _no_job_worker_message(hs, t),
                             failed=lambda: _submit_failure(hs, jobs))
            if echo:
                echo(f"first worker connected: {_workers_text(client)}")
            try:
                yield client
            except KeyboardInterrupt:
                _quiet_shutdown()
                raise
        return
    if scheduler:
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
            _wait_for_worker(client, worker_timeout, lambda t: GrapesInputError(
                f"no dask worker is connected to the scheduler {scheduler!r} after {t:g} s: start workers "
                "(dask worker --scheduler-file FILE, dask-mpi, or their batch jobs: squeue -u $USER / qstat -u "
                "$USER shows whether they are still queued), or wait longer with {worker_timeout}",
                worker_timeout=None))
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


def check_cluster_options(scheduler: str | None = None, *, workers: int | None = None,
                          memory_limit: str | int | None = "auto", scheduler_file: str | os.PathLike | None = None,
                          cluster: str | None = None, cluster_config: str | os.PathLike | None = None,
                          worker_timeout: float = DEFAULT_WORKER_TIMEOUT, **settings) -> "HpcSettings | None":
    """Check the options of :func:`cluster_client` together, before anything starts.

    Parameters
    ----------
    scheduler, workers, memory_limit, scheduler_file, cluster, cluster_config, worker_timeout, **settings
        As for :func:`cluster_client`.

    Returns
    -------
    HpcSettings or None
        The resolved batch-job settings with `cluster` (:func:`hpc_settings`), else None.

    Raises
    ------
    GrapesInputError
        `scheduler` and `scheduler_file` both given; a scheduler file that does not exist or
        holds no address; `cluster` with `scheduler`, `workers` or `memory_limit`; `workers`
        or `memory_limit` with a scheduler; job settings without `cluster`; an unknown
        cluster kind; bad or missing job settings; no ``sbatch`` / ``qsub`` on the PATH; a
        `worker_timeout` <= 0.
    """
    if scheduler and scheduler_file:
        raise GrapesInputError(
            "{scheduler} and {scheduler_file} both name the scheduler: give one of the two (a scheduler file "
            "goes with the second)", scheduler=scheduler, scheduler_file=os.fspath(scheduler_file))
    if scheduler_file:
        scheduler_file = os.fspath(scheduler_file)
        if not os.path.isfile(scheduler_file):
            raise GrapesInputError(
                f"scheduler file {scheduler_file!r} does not exist: give the file the scheduler wrote (dask "
                "scheduler --scheduler-file PATH, dask-mpi --scheduler-file PATH), and start the run once it is "
                "there")
    if scheduler or scheduler_file:
        check_scheduler(scheduler or scheduler_file)
    try:
        ok = float(worker_timeout) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise GrapesInputError("{worker_timeout}: give the seconds to wait for the first worker (> 0)",
                               worker_timeout=worker_timeout)
    kind = _cluster_kind(cluster)
    given = {k: v for k, v in settings.items() if v is not None and not (isinstance(v, (list, tuple)) and not v)}
    named = "scheduler" if scheduler else "scheduler_file"
    if kind is None:
        if cluster_config is not None or given:
            first = "cluster_config" if cluster_config is not None else sorted(given)[0]
            raise GrapesInputError(
                "{setting} is a setting of batch jobs: add {cluster} (or leave it out)",
                setting=_flag(first), cluster=Alt("cluster='slurm'", "--cluster slurm"))
        if (scheduler or scheduler_file) and workers is not None:
            raise GrapesInputError(
                f"{{workers}} sizes the local cluster: leave it out with {{{named}}}", workers=workers,
                **{named: None})
        if (scheduler or scheduler_file) and memory_limit not in (None, "auto"):
            raise GrapesInputError(
                f"{{memory_limit}} sets the memory of the local cluster; the workers of {{{named}}} have theirs "
                "(dask worker --memory-limit): leave out one of the two", memory_limit=memory_limit,
                **{named: None})
        return None
    name = _QUEUES[kind][0]
    if scheduler or scheduler_file:
        raise GrapesInputError(
            f"{{cluster}} starts a scheduler for the {name} jobs, and {{{named}}} names another: leave out one of "
            "the two", cluster=Alt(f"cluster={kind!r}", f"--cluster {kind}"), **{named: None})
    if workers is not None:
        raise GrapesInputError(
            f"{{workers}} sizes the local cluster; the {name} jobs are sized with {{jobs}}, {{cores}} and "
            "{processes}: leave it out", workers=workers, jobs=_flag("jobs"), cores=_flag("cores"),
            processes=_flag("processes"))
    if memory_limit not in (None, "auto"):
        raise GrapesInputError(
            f"{{memory_limit}} sets the memory of the local cluster's workers; the memory of a {name} job is "
            "{memory}: leave out {memory_limit}", memory_limit=memory_limit, memory=_flag("memory"))
    hs = hpc_settings(kind, cluster_config, **settings)
    _check_submit_command(hs)
    return hs


def _wait_for_worker(client, timeout: float, error: Callable[[float], GrapesInputError],
                     failed: Callable[[], GrapesInputError | None] | None = None) -> None:
    """Return once a worker is connected to `client`'s scheduler.

    Raises `error(timeout)` after `timeout` seconds without one, or at once the error `failed()`
    returns (checked every second: a job that could not be submitted).
    """
    deadline = time.monotonic() + float(timeout)
    while True:
        step = min(1.0, deadline - time.monotonic())
        try:
            client.wait_for_workers(1, timeout=max(step, 0.01))
            return
        except (TimeoutError, OSError) as exc:
            problem = failed() if failed is not None else None
            if problem is not None:
                raise problem from None
            if time.monotonic() >= deadline:
                raise error(float(timeout)) from exc


def _workers_text(client) -> str:
    workers = list(client.scheduler_info()["workers"].values())
    from dask.utils import format_bytes

    w = workers[0] if workers else {}
    mem = w.get("memory_limit")
    return (f"{len(workers)} worker(s) so far, {w.get('nthreads', '?')} thread(s) and "
            f"{format_bytes(mem) if mem else 'no memory limit'} each")


def _quiet_shutdown() -> None:
    """After Ctrl-C, the client's pending gathers end with errors nobody reads; do not print them."""
    for name in ("asyncio", "distributed", "tornado"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def dashboard_link(client) -> str | None:
    """Address of the dashboard of `client`'s cluster, or None when it serves none.

    For the embedded cluster the dashboard listens on the loopback interface only, so the link
    names 127.0.0.1 (reach it from another machine through an SSH tunnel). The scheduler of
    batch jobs (:func:`hpc_cluster`) listens on the address the workers reach it at.
    """
    cluster = getattr(client, "cluster", None)
    server = getattr(getattr(cluster, "scheduler", None), "http_server", None)
    if server is not None and getattr(server, "port", None) and not hasattr(cluster, "job_script"):
        return f"http://127.0.0.1:{server.port}/status"
    try:
        return client.dashboard_link
    except Exception:  # pragma: no cover - a scheduler without the dashboard service
        return None


# --------------------------------------------------------------------------------------------
# batch jobs (dask-jobqueue)
# --------------------------------------------------------------------------------------------

#: Batch systems :func:`hpc_cluster` submits workers to.
CLUSTER_KINDS = ("slurm", "pbs")

# kind -> (name, command listing the user's jobs, submit command)
_QUEUES = {"slurm": ("SLURM", "squeue -u $USER", "sbatch"), "pbs": ("PBS", "qstat -u $USER", "qsub")}

# keyword -> command-line option, where the option is not "--" + the keyword with dashes
_CLI_FLAGS = {"cores": "--job-cores", "memory": "--job-memory", "processes": "--job-processes",
              "python": "--worker-python", "job_extra_directives": "--job-extra", "cluster_config": "--cluster-config"}

# SLURM: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; PBS: HH:MM:SS (or seconds)
_WALLTIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


def _flag(key: str, value=None) -> Alt:
    """A setting as the Python API names it (``cores=8``) and as the command line does (``--job-cores 8``)."""
    flag = _CLI_FLAGS.get(key, "--" + key.replace("_", "-"))
    if value is None:
        return Alt(key, flag)
    return Alt(f"{key}={value!r}", f"{flag} {value}")


def _cluster_kind(cluster) -> str | None:
    """``"slurm"``, ``"pbs"`` or None (a local cluster) from the `cluster` option."""
    if cluster is None:
        return None
    kind = str(cluster).strip().lower()
    if kind in ("", "local"):
        return None
    if kind not in CLUSTER_KINDS:
        raise GrapesInputError(
            f"cluster kind {cluster!r} is unknown: give slurm or pbs (batch jobs through dask-jobqueue), local "
            "(the default), or connect to a running scheduler with {scheduler}", scheduler=None)
    return kind


def _jobqueue(kind: str):
    """The dask-jobqueue cluster class of `kind`; importing dask_jobqueue loads its defaults into dask's config."""
    try:
        import dask_jobqueue
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise GrapesInputError(f"--cluster {kind} needs dask-jobqueue: pip install dask-jobqueue") from exc
    return {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[kind]


def _config_keys(kind: str) -> set:
    """Settings dask-jobqueue knows for `kind` (as in its configuration: dashes), and ``jobs``."""
    import dask

    _jobqueue(kind)
    return {str(k).replace("_", "-") for k in dask.config.get(f"jobqueue.{kind}", {})} | {"jobs"}


def read_cluster_config(path: str | os.PathLike, kind: str = "slurm") -> dict:
    """Batch-job settings from a YAML file.

    Parameters
    ----------
    path : path
        A YAML file, either dask's own layout (``jobqueue: slurm: {cores: 32, ...}``, as in
        ``~/.config/dask/jobqueue.yaml``) or the settings of one kind alone
        (``{cores: 32, memory: 128GiB, walltime: '04:00:00', ...}``). The keys are those of
        dask-jobqueue's configuration (``local-directory``, ``job-extra-directives``,
        ``log-directory``, ``interface``, ``job-script-prologue``, ...; underscores are taken
        as dashes; ``job-name`` is taken as dask-jobqueue's ``name``), plus ``jobs``, the number
        of jobs to submit.
    kind : {"slurm", "pbs"}
        The section of a file in dask's layout.

    Returns
    -------
    dict
        Setting name (with dashes) -> value, as in the file.

    Raises
    ------
    GrapesInputError
        A file that does not exist, is not YAML, has no section for `kind`, or names a
        setting dask-jobqueue does not know (a typo would otherwise be ignored).
    """
    import yaml

    kind = _cluster_kind(kind) or "slurm"
    p = Path(path)
    where = f"cluster config {str(path)!r}"
    if not p.is_file():
        raise GrapesInputError(f"{where} does not exist: give a YAML file of {kind} job settings "
                               "(docs/guide.md, 'Running on an HPC cluster', has an example)")
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise GrapesInputError(f"{where} cannot be read as YAML: {exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise GrapesInputError(f"{where} holds a {type(data).__name__}, not settings: write one 'name: value' "
                               "per line (cores: 32, memory: 128GiB, ...)")
    if "jobqueue" in data:
        other = sorted(str(k) for k in data if k != "jobqueue")
        if other:
            raise GrapesInputError(f"{where} holds other dask settings ({', '.join(other)}) beside 'jobqueue': "
                                   "keep only the job settings, and put the others in ~/.config/dask/")
        jq = data["jobqueue"] or {}
        if not isinstance(jq, dict) or kind not in jq:
            have = ", ".join(sorted(map(str, jq))) if isinstance(jq, dict) and jq else "none"
            raise GrapesInputError(f"{where} has no 'jobqueue: {kind}:' section (it has: {have}): add one, or "
                                   f"give the {kind} settings at the top level of the file")
        data = jq[kind] or {}
        if not isinstance(data, dict):
            raise GrapesInputError(f"{where}: 'jobqueue: {kind}:' holds no settings")
    known = _config_keys(kind)
    out = {}
    for k, v in data.items():
        key = str(k).replace("_", "-")
        out["name" if key == "job-name" else key] = v  # dask-jobqueue calls the job name "name"
    unknown = sorted(k for k in out if k not in known)
    if unknown:
        raise GrapesInputError(
            f"{where} names settings that dask-jobqueue's {kind} clusters do not have: {', '.join(unknown)}; "
            f"the known ones are {', '.join(sorted(known))}")
    return out


@dataclass(frozen=True)
class HpcSettings:
    """Resolved batch-job settings (:func:`hpc_settings`).

    Attributes
    ----------
    kind : str
        ``"slurm"`` or ``"pbs"``.
    jobs : int
        Jobs to submit.
    values : dict
        Every setting in effect (dask-jobqueue's configuration names, with dashes): the
        options, over the config file, over dask's configuration (``~/.config/dask/*.yaml``,
        ``DASK_JOBQUEUE__...`` environment variables), over dask-jobqueue's defaults.
    explicit : dict
        The settings given as options or in the config file, passed to dask-jobqueue as keywords.
    """

    kind: str
    jobs: int
    values: dict = field(repr=False)
    explicit: dict = field(repr=False)

    def keywords(self) -> dict:
        """Keywords of the dask-jobqueue cluster class for the explicit settings."""
        out = {}
        for key, value in self.explicit.items():
            if key == "jobs":
                continue
            out["job_name" if key == "name" else key.replace("-", "_")] = value
        return out

    def describe(self) -> str:
        """One line: ``2 SLURM job(s) of 16 cores, 64GiB (4 worker processes), walltime 02:00:00, ...``."""
        v = self.values
        text = f"{self.jobs} {_QUEUES[self.kind][0]} job(s) of {v['cores']} cores, {v['memory']}"
        if v.get("processes"):
            text += f" ({v['processes']} worker processes)"
        for key in ("walltime", "queue", "account"):
            if v.get(key):
                text += f", {key} {v[key]}"
        return text


def hpc_settings(kind: str = "slurm", cluster_config: str | os.PathLike | None = None, **options) -> HpcSettings:
    """Check and resolve batch-job settings, without starting anything.

    Parameters
    ----------
    kind : {"slurm", "pbs"}
    cluster_config : path, optional
        YAML file of settings (:func:`read_cluster_config`).
    **options
        Settings that override the file (None: not given): ``jobs`` (int >= 1, default 1),
        ``cores`` (cores per job), ``memory`` (memory per job: bytes or ``"64GiB"``),
        ``processes`` (worker processes per job, dividing its cores and memory; default
        dask-jobqueue's, about the square root of the cores), ``walltime`` (``"HH:MM:SS"``,
        SLURM also ``"D-HH:MM:SS"``), ``queue`` (SLURM partition), ``account``,
        ``local_directory`` (workers' scratch folder on the compute nodes),
        ``job_extra_directives`` (list of extra ``#SBATCH`` / ``#PBS`` lines, without the
        prefix), ``python`` (the workers' Python executable), ``job_name``, and any other
        keyword of dask-jobqueue's cluster classes (``interface``, ``log_directory``,
        ``job_script_prologue``, ...).

    Returns
    -------
    HpcSettings

    Raises
    ------
    GrapesInputError
        An unknown kind or setting; no cores or memory from the options, the file or dask's
        configuration; a value of the wrong kind (cores < 1, more processes than cores, a
        memory that is not a size, a walltime that is not ``[D-]HH:MM:SS``, jobs < 1).
    """
    import dask
    from dask.utils import parse_bytes

    kind = _cluster_kind(kind)
    if kind is None:
        raise GrapesInputError("{cluster}: batch-job settings are for slurm or pbs",
                               cluster=Alt("kind", "--cluster"))
    known = _config_keys(kind)
    given = {}
    for key, value in options.items():
        if value is None or (isinstance(value, (tuple, list)) and not value and key == "job_extra_directives"):
            continue
        name = "name" if key == "job_name" else key.replace("_", "-")
        if name not in known:
            raise GrapesInputError(
                f"{{setting}} is not a setting of dask-jobqueue's {kind} clusters: the known ones are "
                f"{', '.join(sorted(k.replace('-', '_') for k in known))}", setting=_flag(key))
        given[name] = list(value) if isinstance(value, tuple) else value
    from_file = read_cluster_config(cluster_config, kind) if cluster_config is not None else {}
    explicit = {**from_file, **given}
    values = {**{str(k).replace("_", "-"): v for k, v in dask.config.get(f"jobqueue.{kind}", {}).items()},
              **explicit}

    def origin(key):  # where a value in effect comes from, to name it in an error
        v = values[key]
        if key in given:
            return _flag("job_name" if key == "name" else key.replace("-", "_"), v)
        place = str(cluster_config) if key in from_file else f"dask's configuration (jobqueue.{kind})"
        text = f"{key}: {v!r} in {place}"
        return Alt(text, text)

    name = _QUEUES[kind][0]

    def bad(key, fix):
        return GrapesInputError("{where}: " + fix, where=origin(key))

    for key in ("cores", "memory"):
        if values.get(key) in (None, ""):
            example = "32" if key == "cores" else "128GiB"
            raise GrapesInputError(
                f"the {name} jobs need their {key} per job: give {{opt}} or '{key}: {example}' in {{config}} (or in "
                "~/.config/dask/jobqueue.yaml, under jobqueue: " + kind + ":)",
                opt=_flag(key, example if key == "memory" else int(example)), config=_flag("cluster_config"))
    n_cores = _positive_int(values["cores"])
    if n_cores is None:
        raise bad("cores", "give the cores per job, a whole number >= 1")
    try:
        mem = parse_bytes(values["memory"]) if isinstance(values["memory"], str) else values["memory"]
        ok = isinstance(mem, (int, float)) and not isinstance(mem, bool) and mem > 0
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise bad("memory", "give the memory per job as a size, e.g. 128GiB or 64000MB")
    processes = values.get("processes")
    if processes is not None:
        p = _positive_int(processes)
        if p is None or p > n_cores:
            raise bad("processes", f"give the worker processes per job, a whole number from 1 to the cores per "
                                   f"job ({n_cores})")
    jobs = 1 if values.get("jobs") is None else _positive_int(values["jobs"])
    if jobs is None:
        raise bad("jobs", "give the number of jobs to submit, a whole number >= 1")
    walltime = values.get("walltime")
    if walltime is not None:
        if isinstance(walltime, int) and "walltime" in from_file and "walltime" not in given:
            h, rest = divmod(walltime, 3600)
            raise bad("walltime", "YAML reads an unquoted time such as 1:30:00 as a number of seconds: quote it, "
                                  f"walltime: '{h:02d}:{rest // 60:02d}:{rest % 60:02d}'")
        if not isinstance(walltime, str) or not _WALLTIME.match(walltime.strip()):
            raise bad("walltime", "give the time limit of a job as HH:MM:SS (SLURM also D-HH:MM:SS)")
    for key in ("queue", "account", "local-directory", "python", "name"):
        v = values.get(key)
        if v is not None and (not isinstance(v, (str, os.PathLike)) or not str(v).strip()):
            raise bad(key, "give a name or path (text)")
    extra = values.get("job-extra-directives")
    if isinstance(extra, str):
        extra = [extra]
        explicit["job-extra-directives"] = values["job-extra-directives"] = extra
    if extra is not None and not (isinstance(extra, (list, tuple)) and all(isinstance(x, str) for x in extra)):
        raise bad("job-extra-directives", "give a list of directives, e.g. ['--gres=gpu:0', '--exclusive']")
    if "local-directory" in explicit:
        explicit["local-directory"] = os.fspath(explicit["local-directory"])
    for key, n in (("cores", n_cores), ("processes", _positive_int(processes))):  # "4" in a file -> 4
        if key in explicit:
            explicit[key] = values[key] = n
    return HpcSettings(kind=kind, jobs=jobs, values=values, explicit=explicit)


def _positive_int(value) -> int | None:
    """`value` as an int >= 1 (an integer, or its digits as text), else None."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        n = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        n = int(value)
    else:
        return None
    return n if n >= 1 else None


def hpc_cluster(kind: str = "slurm", *, cluster_config: str | os.PathLike | None = None, scale: bool = True,
                dashboard: bool = True, **settings):
    """A dask-jobqueue cluster whose workers run as SLURM or PBS jobs.

    The scheduler runs in this process (on the login node, or in the job that runs the
    analysis); each job starts ``processes`` dask workers sharing its ``cores`` (as threads)
    and ``memory``. Use it as a context manager, or close it: closing cancels the jobs.

    Parameters
    ----------
    kind : {"slurm", "pbs"}
        The batch system (``SLURMCluster``: ``#SBATCH`` directives, ``sbatch``;
        ``PBSCluster``: ``#PBS``, ``qsub``).
    cluster_config : path, optional
        YAML file of settings (:func:`read_cluster_config`); `settings` override it, and it
        overrides dask's configuration (``~/.config/dask/jobqueue.yaml``).
    scale : bool
        Submit the jobs (``jobs`` of them, default 1) now. False: build the cluster and its
        job script (``cluster.job_script()``) without submitting anything; submit later with
        ``cluster.scale(jobs=N)``.
    dashboard : bool
        Serve the scheduler's dashboard (dask-jobqueue's default port, 8787, or a free one).
    **settings
        ``jobs``, ``cores``, ``memory``, ``processes``, ``walltime``, ``queue``, ``account``,
        ``local_directory``, ``job_extra_directives``, ``python``, ``job_name`` and other
        dask-jobqueue keywords: see :func:`hpc_settings`.

    Returns
    -------
    dask_jobqueue.JobQueueCluster
        Connect with ``distributed.Client(cluster)`` and pass the client to
        :func:`grapes_dask.analyze`; wait for a worker first (``client.wait_for_workers(1)``)
        so that the analysis plans its memory with the workers' limit
        (``memory / processes`` per worker, shared by its ``cores / processes`` threads).

    Raises
    ------
    GrapesInputError
        Bad or missing settings (:func:`hpc_settings`); with `scale`, no submit command
        (``sbatch`` / ``qsub``) on the PATH. Nothing is submitted then.

    Examples
    --------
    >>> from distributed import Client
    >>> with hpc_cluster("slurm", cores=32, memory="128GiB", walltime="02:00:00", queue="compute",
    ...                  jobs=4) as cluster, Client(cluster) as client:   # doctest: +SKIP
    ...     client.wait_for_workers(1)
    ...     table = grapes_dask.analyze("grey.zarr", "labels.zarr", client=client)
    """
    hs = hpc_settings(kind, cluster_config, **settings)
    if scale:
        _check_submit_command(hs)
    cluster = _build_hpc_cluster(hs, dashboard=dashboard)
    if scale:
        cluster.scale(jobs=hs.jobs)
    return cluster


def _build_hpc_cluster(hs: HpcSettings, *, dashboard: bool = True):
    """The dask-jobqueue cluster of `hs`, with its scheduler started and no job submitted.

    Its jobs record a refused submission (``sbatch``'s error) in ``cluster.grapes_submit_errors``
    instead of raising it in the event loop, where it would only be logged.
    """
    from distributed.core import Status

    cls = _jobqueue(hs.kind)
    failures: list = []

    class _Job(cls.job_cls):
        async def start(self):
            try:
                await super().start()
            except Exception as exc:  # noqa: BLE001 - reported by the caller, see _submit_failure
                failures.append(exc)
                # no job exists (job_id None: closing it cancels nothing); "running" lets the
                # cluster close it as it closes the others
                self.status = Status.running

        async def close(self):
            await super().close()
            if self.job_id is None:
                self.status = Status.closed

    kw = hs.keywords()
    if not dashboard:
        # the scheduler serves its health routes over HTTP anyway: on a free port, not the dashboard's 8787
        kw["scheduler_options"] = {"dashboard": False, "dashboard_address": ":0",
                                   **(hs.values.get("scheduler-options") or {})}
    try:
        cluster = cls(job_cls=_Job, **kw)
    except (ValueError, TypeError, OSError) as exc:
        raise GrapesInputError(f"dask-jobqueue refused the {_QUEUES[hs.kind][0]} settings: {exc}") from exc
    cluster.grapes_submit_errors = failures
    return cluster


def _submit_failure(hs: HpcSettings, cluster) -> GrapesInputError | None:
    """The error of a refused submission, or None."""
    failures = getattr(cluster, "grapes_submit_errors", None)
    if not failures:
        return None
    name, _, submit = _QUEUES[hs.kind]
    detail = str(failures[0]).strip()
    m = re.search(r"stderr:\s*(.*)", detail, flags=re.S)
    detail = (m.group(1).strip() if m and m.group(1).strip() else detail).replace("\n", " ")
    return GrapesInputError(
        f"{submit} refused the {name} job: {detail}. Fix the setting it names (queue, account, walltime, cores, "
        "memory, job-extra directives) in the options or the cluster config")


def _check_submit_command(hs: HpcSettings) -> None:
    name, _, submit = _QUEUES[hs.kind]
    if shutil.which(submit) is None:
        raise GrapesInputError(
            f"{submit} is not on the PATH, so no {name} job can be submitted from here: run on a login node of "
            f"the {name} cluster (or in a job there), or pick the cluster's kind with {{cluster}}",
            cluster=Alt("cluster=", "--cluster"))


def _no_job_worker_message(hs: HpcSettings, timeout: float) -> GrapesInputError:
    name, queue, _ = _QUEUES[hs.kind]
    history = {"slurm": "sacct", "pbs": "qstat -x -u $USER"}[hs.kind]
    return GrapesInputError(
        f"no dask worker joined within {timeout:g} s of submitting {hs.jobs} {name} job(s), which are cancelled "
        f"now. If they were still pending (`{queue}` while waiting, `{history}` afterwards), the queue is busy: "
        "wait longer with {worker_timeout}, or ask for less (cores, memory, walltime) or another queue. If they "
        "ran and ended, read their output files (the cluster config's log-directory collects them) and check "
        "that the compute nodes reach this machine (the 'interface' setting)", worker_timeout=None)


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
    args = getattr(task, "args", ()) or ()
    if func == "persisted" and len(args) >= 3:  # a resumable run's wrapper: (folder, file, function, *args)
        func, args = getattr(args[2], "__name__", func), args[3:]
    what = _TASK_NAMES.get(func) or _TASK_NAMES.get(key_split(key).lstrip("_"))
    if what is None:
        what = f"task {func}"
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
