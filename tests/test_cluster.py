"""The embedded cluster and its dashboard, and scheduler addresses (grapes_dask.cluster)."""

import json
import time
import urllib.request

import pytest

from grapes_dask import GrapesInputError
from grapes_dask.cluster import check_scheduler, cluster_client, dashboard_link


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read().decode("utf-8", "replace")


@pytest.mark.parametrize("workers", [None, 2])
def test_dashboard_link_serves_the_status_page(workers):
    with cluster_client(workers=workers) as client:
        link = dashboard_link(client)
        assert link.startswith("http://127.0.0.1:") and link.endswith("/status")
        status, page = _get(link)
        assert status == 200
        assert "bokeh" in page.lower() and "needs bokeh" not in page.lower()
        # the task stream and progress plots are served too
        base = link.rsplit("/", 1)[0]
        for path in ("/individual-task-stream", "/individual-progress"):
            assert _get(base + path)[0] == 200
        n_threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
        assert n_threads >= 1
        assert len(client.scheduler_info()["workers"]) == (workers or 1)


def test_scheduler_file_checked_at_once(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(GrapesInputError, match="scheduler file .*missing.json' does not exist"):
        check_scheduler(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(GrapesInputError, match="cannot be read as JSON"):
        check_scheduler(str(bad))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"type": "Scheduler"}))
    with pytest.raises(GrapesInputError, match="holds no 'address'"):
        check_scheduler(str(empty))
    with pytest.raises(GrapesInputError, match="does not exist"):
        with cluster_client(str(tmp_path / "missing.json")):
            pass
    assert time.perf_counter() - t0 < 5
    check_scheduler("tcp://127.0.0.1:8786")  # an address is reached later, with a timeout
    check_scheduler("localhost:8786")


def test_workers_must_be_positive():
    with pytest.raises(GrapesInputError, match="workers=0: give at least one worker"):
        with cluster_client(workers=0):
            pass
