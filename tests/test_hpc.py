"""Batch-job clusters (SLURM / PBS through dask-jobqueue), scheduler files and performance reports.

There is no SLURM here: the job scripts are built without submitting anything (the submission
itself is made to fail the test), and the runs that do submit use stand-ins for ``sbatch`` and
``scancel`` put first on the PATH, which run the job script on this machine.
"""

import contextlib
import json
import os
import shlex
import signal
import stat
import textwrap

import dask
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from dask.utils import parse_bytes

import grapes_dask.cluster as gc
from grapes_dask import read_table, synthetic
from grapes_dask._errors import GrapesInputError
from grapes_dask.cli import cli
from grapes_dask.cluster import cluster_client, hpc_cluster, hpc_settings, read_cluster_config
from grapes_dask.plan import SAFETY_FRACTION, memory_budget

GiB = 2**30


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_submission(monkeypatch):
    """Any job submission (or cluster start, for the option checks) fails the test."""
    import dask_jobqueue.core

    async def submit(self, script):
        raise AssertionError(f"a job was submitted: {script}")

    monkeypatch.setattr(dask_jobqueue.core.Job, "_submit_job", submit)


@pytest.fixture
def no_dask_config(monkeypatch):
    """dask's own jobqueue configuration as dask-jobqueue ships it (no cores, no memory), whatever
    ~/.config/dask/jobqueue.yaml of the machine says."""
    import dask_jobqueue  # noqa: F401 - loads its defaults

    with dask.config.set({f"jobqueue.{k}.{s}": None for k in ("slurm", "pbs")
                          for s in ("cores", "memory", "processes", "queue", "account")}):
        yield


def directives(script: str, prefix: str) -> list:
    return [line[len(prefix):].strip() for line in script.splitlines() if line.startswith(prefix)]


def worker_command(script: str) -> list:
    lines = [line for line in script.splitlines() if "distributed.cli.dask_worker" in line]
    assert len(lines) == 1, script
    return shlex.split(lines[0])


def arg(cmd: list, flag: str) -> str:
    assert flag in cmd, (flag, cmd)
    return cmd[cmd.index(flag) + 1]


def write_exe(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``sbatch`` and ``scancel`` stand-ins on the PATH: sbatch runs the job script at once as its own
    process group (and prints its id as the job id); scancel kills that group. The job ids are
    collected in ``submitted``/``cancelled``; groups still alive at the end are killed."""
    d = tmp_path / "fake_slurm"
    (d / "bin").mkdir(parents=True)
    write_exe(d / "bin" / "sbatch", f"""
        #!/bin/bash
        cp "$1" "{d}/job-$$.sh"
        setsid bash "{d}/job-$$.sh" > "{d}/job-$$.out" 2>&1 < /dev/null &
        echo $! >> "{d}/submitted"
        echo "Submitted batch job $!"
        """)
    write_exe(d / "bin" / "scancel", f"""
        #!/bin/bash
        for id in "$@"; do echo "$id" >> "{d}/cancelled"; kill -TERM -- "-$id" 2>/dev/null; done
        exit 0
        """)
    monkeypatch.setenv("PATH", f"{d / 'bin'}{os.pathsep}{os.environ['PATH']}")
    yield d
    for f in ("submitted",):
        if (d / f).exists():
            for pid in (d / f).read_text().split():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(pid), signal.SIGKILL)


def ids(d, name):
    p = d / name
    return p.read_text().split() if p.exists() else []


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return synthetic.make_phantom(tmp_path_factory.mktemp("ph"), shape=(64, 64, 64), seed=3, mean_radius=7.0,
                                  chunks=32)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# --------------------------------------------------------------------------------------------
# job scripts, built without submitting
# --------------------------------------------------------------------------------------------


SETTINGS = dict(cores=8, memory="16GiB", processes=2, walltime="01:30:00", queue="short", account="proj42",
                job_name="grapes-test", local_directory="/scratch/grapes", job_extra_directives=["--exclusive"],
                python="/opt/venv/bin/python")


def test_slurm_job_script(no_submission, no_dask_config):
    with hpc_cluster("slurm", scale=False, dashboard=False, **SETTINGS) as cluster:
        script = cluster.job_script()
        assert not cluster.workers  # no job object, so nothing was submitted
    assert script.startswith("#!/usr/bin/env bash")
    assert directives(script, "#SBATCH") == [
        "-J grapes-test", "-p short", "-A proj42", "-n 1", "--cpus-per-task=8", "--mem=16G", "-t 01:30:00",
        "--exclusive"]
    cmd = worker_command(script)
    assert cmd[:3] == ["/opt/venv/bin/python", "-m", "distributed.cli.dask_worker"]
    assert cmd[3].startswith("tcp://")  # the scheduler, started in this process
    # 2 worker processes share the job: 8 / 2 threads and 16 GiB / 2 each
    assert arg(cmd, "--nworkers") == "2" and arg(cmd, "--nthreads") == "4"
    assert parse_bytes(arg(cmd, "--memory-limit")) == 8 * GiB
    assert arg(cmd, "--local-directory") == "/scratch/grapes"
    assert "--nanny" in cmd


def test_pbs_job_script(no_submission, no_dask_config):
    with hpc_cluster("PBS", scale=False, dashboard=False, **SETTINGS) as cluster:
        script = cluster.job_script()
        assert not cluster.workers
    d = directives(script, "#PBS")
    assert d[:3] == ["-N grapes-test", "-q short", "-A proj42"]
    select = [x for x in d if x.startswith("-l select=")]
    assert len(select) == 1 and "ncpus=8" in select[0] and "mem=16GB" in select[0]
    assert "-l walltime=01:30:00" in d and "--exclusive" in d
    cmd = worker_command(script)
    assert arg(cmd, "--nthreads") == "4" and parse_bytes(arg(cmd, "--memory-limit")) == 8 * GiB


def test_one_process_per_job_by_choice():
    with hpc_cluster("slurm", scale=False, dashboard=False, cores=6, memory="3000MiB", processes=1) as cluster:
        cmd = worker_command(cluster.job_script())
        assert cluster.scheduler.http_server.port != 8787
    assert arg(cmd, "--nthreads") == "6" and "--nworkers" not in cmd
    # dask-jobqueue writes the worker's limit with 3 digits ("2.93GiB"), SLURM's --mem rounded up
    assert parse_bytes(arg(cmd, "--memory-limit")) == pytest.approx(3000 * 2**20, rel=0.005)
    assert "#SBATCH --mem=3G" in cluster.job_script()


@pytest.mark.parametrize("layout", ["dask", "flat"])
def test_config_file_then_options_then_dask_config(tmp_path, layout, no_submission, no_dask_config):
    settings = textwrap.dedent("""
        cores: 4
        memory: 8GiB
        processes: 1
        walltime: '02:00:00'
        queue: long
        jobs: 3
        job-extra-directives: ['--gres=gpu:0']
        local_directory: /tmp/w
        """)
    text = settings if layout == "flat" else "jobqueue:\n  slurm:\n" + textwrap.indent(settings, "    ")
    cfg = tmp_path / "slurm.yaml"
    cfg.write_text(text)
    got = read_cluster_config(cfg, "slurm")
    assert got["cores"] == 4 and got["local-directory"] == "/tmp/w" and got["jobs"] == 3
    # ~/.config/dask/jobqueue.yaml (here dask.config.set) gives what neither the file nor the options give
    with dask.config.set({"jobqueue.slurm.account": "from-dask-config", "jobqueue.slurm.queue": "dask-queue"}):
        hs = hpc_settings("slurm", cfg, cores=6)  # the option overrides the file
        with hpc_cluster("slurm", cluster_config=cfg, cores=6, scale=False, dashboard=False) as cluster:
            script = cluster.job_script()
    assert hs.jobs == 3 and hs.values["cores"] == 6 and hs.values["queue"] == "long"
    assert hs.values["account"] == "from-dask-config"
    d = directives(script, "#SBATCH")
    assert "--cpus-per-task=6" in d and "--mem=8G" in d and "-p long" in d and "-t 02:00:00" in d
    assert "-A from-dask-config" in d and "--gres=gpu:0" in d
    cmd = worker_command(script)
    assert arg(cmd, "--nthreads") == "6" and parse_bytes(arg(cmd, "--memory-limit")) == 8 * GiB
    assert arg(cmd, "--local-directory") == "/tmp/w"


@pytest.mark.parametrize("text, kind, message", [
    ("cores: 4\nmemroy: 8GiB\n", "slurm", "do not have: memroy"),
    ("jobqueue:\n  pbs:\n    cores: 4\n", "slurm", "no 'jobqueue: slurm:' section (it has: pbs)"),
    ("jobqueue:\n  slurm: {cores: 4}\ndistributed:\n  x: 1\n", "slurm", "other dask settings (distributed)"),
    ("- cores\n- 4\n", "slurm", "holds a list"),
    ("cores: [4\n", "slurm", "cannot be read as YAML"),
])
def test_bad_config_files(tmp_path, text, kind, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(GrapesInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_cluster_config(cfg, kind)
    with pytest.raises(GrapesInputError, match="does not exist"):
        read_cluster_config(tmp_path / "missing.yaml", kind)


@pytest.mark.parametrize("kw, message", [
    (dict(memory="8GiB"), "need their cores per job: give cores=32 or 'cores: 32' in cluster_config"),
    (dict(cores=4), "need their memory per job: give memory='128GiB'"),
    (dict(cores=0, memory="8GiB"), "cores=0: give the cores per job"),
    (dict(cores=4, memory="lots"), "memory='lots': give the memory per job as a size"),
    (dict(cores=4, memory="8GiB", processes=5), "processes=5: give the worker processes per job, a whole number "
                                                "from 1 to the cores per job \\(4\\)"),
    (dict(cores=4, memory="8GiB", walltime="2h"), "walltime='2h': give the time limit"),
    (dict(cores=4, memory="8GiB", jobs=0), "jobs=0: give the number of jobs"),
    (dict(cores=4, memory="8GiB", job_extra_directives=[3]), "give a list of directives"),
    (dict(cores=4, memory="8GiB", colour="red"), "colour is not a setting of dask-jobqueue's slurm clusters"),
])
def test_bad_settings(kw, message, no_dask_config):
    with pytest.raises(GrapesInputError, match=message):
        hpc_settings("slurm", **kw)


def test_unquoted_walltime_in_yaml_is_named(tmp_path, no_dask_config):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cores: 4\nmemory: 8GiB\nwalltime: 1:30:00\n")  # YAML 1.1: 5400 seconds
    with pytest.raises(GrapesInputError, match=r"walltime: 5400 in .*c.yaml.*quote it, walltime: '01:30:00'"):
        hpc_settings("slurm", cfg)


def test_walltime_forms():
    for ok in ("30", "01:30:00", "2-00:00:00", "1-12", "90:00"):
        assert hpc_settings("slurm", cores=1, memory="1GiB", walltime=ok).values["walltime"] == ok
    with pytest.raises(GrapesInputError, match="walltime"):
        hpc_settings("slurm", cores=1, memory="1GiB", walltime="01:30:00:00")


# --------------------------------------------------------------------------------------------
# options that do not go together: refused before any job exists
# --------------------------------------------------------------------------------------------


@pytest.fixture
def nothing_started(monkeypatch, tmp_path):
    """Building a cluster fails the test; sbatch/qsub stand-ins that fail it too are on the PATH."""
    def build(*a, **k):
        raise AssertionError("a cluster was built")

    monkeypatch.setattr(gc, "_build_hpc_cluster", build)
    b = tmp_path / "bin"
    b.mkdir()
    for name in ("sbatch", "qsub"):
        write_exe(b / name, "#!/bin/bash\nexit 99\n")
    monkeypatch.setenv("PATH", f"{b}{os.pathsep}{os.environ['PATH']}")


JOB = ["--job-cores", "4", "--job-memory", "8GiB"]


@pytest.mark.parametrize("extra, message", [
    (["--cluster", "slurm", "--scheduler", "tcp://127.0.0.1:1"] + JOB,
     "--cluster slurm starts a scheduler for the SLURM jobs, and --scheduler names another"),
    (["--cluster", "slurm", "--workers", "2"] + JOB, "--workers 2 sizes the local cluster; the SLURM jobs are sized "
                                                     "with --jobs, --job-cores and --job-processes"),
    (["--cluster", "slurm", "--memory-limit", "4GiB"] + JOB, "--memory-limit 4GiB sets the memory of the local "
                                                            "cluster's workers; the memory of a SLURM job is "
                                                            "--job-memory"),
    (["--cluster", "lsf"] + JOB, "cluster kind 'lsf' is unknown: give slurm or pbs"),
    (["--cluster", "slurm", "--job-memory", "8GiB"], "the SLURM jobs need their cores per job: give --job-cores 32 "
                                                     "or 'cores: 32' in --cluster-config"),
    (["--cluster", "pbs", "--job-cores", "4"], "the PBS jobs need their memory per job: give --job-memory 128GiB"),
    (["--cluster", "slurm", "--job-processes", "8"] + JOB, "--job-processes 8: give the worker processes per job"),
    (["--cluster", "slurm", "--jobs", "0"] + JOB, "--jobs 0: give the number of jobs"),
    (["--cluster", "slurm", "--walltime", "two hours"] + JOB, "--walltime two hours: give the time limit"),
    (["--job-cores", "4"], "--job-cores is a setting of batch jobs: add --cluster slurm"),
    (["--walltime", "01:00:00"], "--walltime is a setting of batch jobs: add --cluster slurm"),
    (["--cluster-config", "c.yaml"], "--cluster-config is a setting of batch jobs: add --cluster slurm"),
    (["--cluster", "slurm", "--cluster-config", "missing.yaml"], "cluster config 'missing.yaml' does not exist"),
    (["--scheduler", "tcp://127.0.0.1:1", "--scheduler-file", "s.json"],
     "--scheduler tcp://127.0.0.1:1 and --scheduler-file s.json both name the scheduler"),
    (["--scheduler-file", "missing.json"], "scheduler file 'missing.json' does not exist"),
    (["--scheduler-file", "EXISTING", "--workers", "2"], "--workers 2 sizes the local cluster: leave it out with "
                                                         "--scheduler-file"),
    (["--scheduler-file", "EXISTING", "--memory-limit", "2GiB"], "--memory-limit 2GiB sets the memory of the local "
                                                                 "cluster; the workers of --scheduler-file"),
    (["--worker-timeout", "0"], "--worker-timeout 0.0: give the seconds to wait"),
])
@pytest.mark.parametrize("command", ["analyze", "operando"])
def test_bad_combinations_refused_before_anything_starts(tmp_path, phantom, extra, message, command,
                                                         nothing_started, no_dask_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sched = tmp_path / "sched.json"
    sched.write_text(json.dumps({"address": "tcp://127.0.0.1:1"}))
    extra = [str(sched) if a == "EXISTING" else a for a in extra]
    vol = f"{phantom.grey[0]},{phantom.labels[0]}"
    if command == "analyze":
        args = ["analyze", phantom.grey[0], phantom.labels[0], "--out", tmp_path / "t.parquet"]
        out = tmp_path / "t.parquet"
    else:
        args = ["operando", "--state", f"a={vol}", "--state", f"b={vol}", "--out", tmp_path / "res"]
        out = tmp_path / "res"
    r = invoke(*args, *extra, "--quiet")
    assert r.exit_code == 2, r.output
    assert message in r.output, r.output
    assert not out.exists()


def test_no_sbatch_on_the_path(tmp_path, monkeypatch, no_dask_config):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    with pytest.raises(GrapesInputError, match="sbatch is not on the PATH"):
        with cluster_client(cluster="slurm", cores=1, memory="1GiB"):
            pass
    # building the job script alone needs no sbatch
    with hpc_cluster("slurm", cores=1, memory="1GiB", scale=False, dashboard=False) as cluster:
        assert "--cpus-per-task=1" in cluster.job_script()


def test_python_api_names_its_keywords(no_dask_config):
    with pytest.raises(GrapesInputError, match="workers=2 sizes the local cluster; the SLURM jobs are sized with "
                                               "jobs, cores and processes"):
        with cluster_client(cluster="slurm", workers=2, cores=1, memory="1GiB"):
            pass
    with pytest.raises(GrapesInputError, match="cores is a setting of batch jobs: add cluster='slurm'"):
        with cluster_client(cores=4):
            pass


# --------------------------------------------------------------------------------------------
# jobs submitted to the stand-in sbatch
# --------------------------------------------------------------------------------------------


def test_memory_budget_follows_the_job_workers(fake_slurm, no_dask_config):
    """The first worker of the job is waited for, and the analysis budget is its memory limit
    (job memory / processes) shared by its threads (cores / processes)."""
    lines = []
    with cluster_client(cluster="slurm", cores=2, memory="1536MiB", processes=1, walltime="00:10:00", jobs=1,
                        worker_timeout=120, dashboard=False, echo=lines.append) as client:
        workers = list(client.scheduler_info()["workers"].values())
        assert len(workers) == 1  # there before the client is handed over
        assert workers[0]["memory_limit"] == 1536 * 2**20 and workers[0]["nthreads"] == 2
        budget, threads, source = memory_budget(None, client)
        assert budget == int(1536 * 2**20 // 2 * SAFETY_FRACTION) and threads == 2
        assert "worker memory limit 1.50 GiB / 2 thread(s)" in source
        assert client.submit(pow, 3, 4).result() == 81
    submitted = ids(fake_slurm, "submitted")
    assert len(submitted) == 1 and ids(fake_slurm, "cancelled") == submitted  # cancelled on exit
    script = next(fake_slurm.glob("job-*.sh")).read_text()
    assert "#SBATCH -t 00:10:00" in script and "#SBATCH --mem=2G" in script  # 1.5 GiB, rounded up
    assert lines[0].startswith("submitted 1 SLURM job(s) of 2 cores, 1536MiB") and "squeue -u $USER" in lines[0]


def test_refused_submission_named_at_once(tmp_path, monkeypatch, no_dask_config):
    import time

    b = tmp_path / "bin"
    b.mkdir()
    write_exe(b / "sbatch", """
        #!/bin/bash
        echo "sbatch: error: invalid partition specified: nosuch" >&2
        exit 1
        """)
    write_exe(b / "scancel", "#!/bin/bash\nexit 0\n")
    monkeypatch.setenv("PATH", f"{b}{os.pathsep}{os.environ['PATH']}")
    t0 = time.monotonic()
    with pytest.raises(GrapesInputError, match="sbatch refused the SLURM job: sbatch: error: invalid partition "
                                               "specified: nosuch"):
        with cluster_client(cluster="slurm", cores=1, memory="1GiB", queue="nosuch", worker_timeout=60,
                            dashboard=False):
            pass
    assert time.monotonic() - t0 < 30  # not the 60 s of the timeout


def test_no_worker_in_time_names_squeue(tmp_path, monkeypatch, no_dask_config):
    """A job that stays pending: the run stops after the timeout, says where to look, and cancels it."""
    b = tmp_path / "bin"
    b.mkdir()
    write_exe(b / "sbatch", "#!/bin/bash\necho 'Submitted batch job 4242'\n")
    write_exe(b / "scancel", f"#!/bin/bash\necho \"$@\" >> {tmp_path}/cancelled\n")
    monkeypatch.setenv("PATH", f"{b}{os.pathsep}{os.environ['PATH']}")
    runner_args = ["--cluster", "slurm", "--job-cores", "1", "--job-memory", "1GiB", "--worker-timeout", "2"]
    r = invoke("analyze", "g.zarr", "l.zarr", "--out", tmp_path / "t.parquet", *runner_args, "--quiet")
    # the inputs are checked first here: give real ones
    assert r.exit_code == 2
    ph = synthetic.make_phantom(tmp_path / "ph", shape=(16, 16, 16), seed=1, mean_radius=4.0, chunks=16)
    r = invoke("analyze", ph.grey[0], ph.labels[0], "--out", tmp_path / "t.parquet", *runner_args, "--quiet")
    assert r.exit_code == 2, r.output
    assert "no dask worker joined within 2 s of submitting 1 SLURM job(s), which are cancelled now" in r.output
    assert "`squeue -u $USER`" in r.output and "--worker-timeout" in r.output
    assert (tmp_path / "cancelled").read_text().split() == ["4242"]
    assert not (tmp_path / "t.parquet").exists()


def test_analyze_on_slurm_jobs_same_table(fake_slurm, phantom, tmp_path, no_dask_config):
    """The whole command on (stand-in) SLURM jobs: the table of a local run, the budget from the job."""
    from grapes_dask import analyze

    out = tmp_path / "t.parquet"
    cfg = tmp_path / "slurm.yaml"
    cfg.write_text("cores: 2\nmemory: 2GiB\nprocesses: 1\nwalltime: '00:20:00'\njob-name: grapes-ci\n")
    r = invoke("analyze", phantom.grey[0], phantom.labels[0], "--out", out, "--cluster", "slurm",
               "--cluster-config", cfg, "--walltime", "00:15:00", "--worker-timeout", "120", "--quiet")
    assert r.exit_code == 0, r.output
    script = next(fake_slurm.glob("job-*.sh")).read_text()
    assert "#SBATCH -J grapes-ci" in script and "#SBATCH -t 00:15:00" in script  # the option over the file
    assert len(ids(fake_slurm, "submitted")) == 1 and ids(fake_slurm, "cancelled") == ids(fake_slurm, "submitted")
    got = pd.read_parquet(out)
    grey, labels = (np.asarray(a) for a in phantom.open(state=0))
    expected = analyze(grey, labels)
    np.testing.assert_array_equal(got["label"], expected["label"])
    np.testing.assert_array_equal(got["voxel_count"], np.bincount(labels.ravel())[got["label"]])
    for col in ("roi_mean", "intensity_mean", "roi_voxels"):
        np.testing.assert_array_equal(got[col], expected[col])
    for a, b in zip(got["radial_layers_graylevel"], expected["radial_layers_graylevel"]):
        np.testing.assert_array_equal(a, b)
    # the budget was planned with the job worker's memory, 2 GiB for its 2 threads
    assert read_table(out).attrs["grapes_dask"]["memory_limit_source"] == \
        f"worker memory limit 2.00 GiB / 2 thread(s) x {SAFETY_FRACTION}"


# --------------------------------------------------------------------------------------------
# scheduler files
# --------------------------------------------------------------------------------------------


def test_scheduler_file_option(phantom, tmp_path):
    from distributed import LocalCluster

    from grapes_dask import analyze

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None,
                      memory_limit="2GiB") as cluster:
        sched = tmp_path / "scheduler.json"
        sched.write_text(json.dumps({"address": cluster.scheduler_address}))
        out = tmp_path / "t.parquet"
        r = invoke("analyze", phantom.grey[0], phantom.labels[0], "--out", out, "--scheduler-file", sched, "--quiet")
        assert r.exit_code == 0, r.output
    grey, labels = (np.asarray(a) for a in phantom.open(state=0))
    expected = analyze(grey, labels)
    got = pd.read_parquet(out)
    np.testing.assert_array_equal(got["label"], expected["label"])
    for a, b in zip(got["radial_layers_graylevel"], expected["radial_layers_graylevel"]):
        np.testing.assert_array_equal(a, b)


def test_scheduler_without_workers_times_out_clearly(phantom, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        sched = tmp_path / "scheduler.json"
        sched.write_text(json.dumps({"address": cluster.scheduler_address}))
        r = invoke("analyze", phantom.grey[0], phantom.labels[0], "--out", tmp_path / "t.parquet",
                   "--scheduler-file", sched, "--worker-timeout", "1.5", "--quiet")
    assert r.exit_code == 2, r.output
    assert f"no dask worker is connected to the scheduler '{sched}' after 1.5 s" in r.output
    assert "squeue -u $USER" in r.output


# --------------------------------------------------------------------------------------------
# --profile
# --------------------------------------------------------------------------------------------


def test_profile_report_of_both_passes(phantom, tmp_path):
    out, prof = tmp_path / "t.parquet", tmp_path / "profile.html"
    r = invoke("analyze", phantom.grey[0], phantom.labels[0], "--out", out, "--profile", prof, "--quiet")
    assert r.exit_code == 0, r.output
    html = prof.read_text()
    assert html.lstrip().lower().startswith("<!doctype html") or "<html" in html[:2000].lower()
    assert "_pass1_task" in html and "_pass2_task" in html
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "profile.html", "t.contacts.parquet", "t.layers.parquet", "t.parquet"]  # no temporary left


def test_profile_refused_early(phantom, tmp_path):
    out = tmp_path / "t.parquet"
    base = ["analyze", phantom.grey[0], phantom.labels[0], "--out", out, "--quiet"]
    r = invoke(*base, "--profile", tmp_path / "nofolder" / "p.html")
    assert r.exit_code == 2 and "the folder of output" in r.output and "nofolder" in r.output
    assert not out.exists()
    existing = tmp_path / "p.html"
    existing.write_text("old")
    r = invoke(*base, "--profile", existing)
    assert r.exit_code == 2 and "already exists: choose another path or pass --overwrite" in r.output
    assert not out.exists() and existing.read_text() == "old"
    r = invoke(*base, "--profile", out)
    assert r.exit_code == 2 and "is also the output" in r.output
    r = invoke(*base, "--profile", existing, "--overwrite")
    assert r.exit_code == 0, r.output
    assert "_pass2_task" in existing.read_text()
    # operando: not inside the output folder, which is written as a whole
    vol = f"{phantom.grey[0]},{phantom.labels[0]}"
    r = invoke("operando", "--state", f"a={vol}", "--state", f"b={vol}", "--out", tmp_path / "res",
               "--profile", tmp_path / "res" / "p.html", "--quiet")
    assert r.exit_code == 2 and "is inside --out" in r.output
