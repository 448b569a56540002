"""``grapes-dask operando`` and ``grapes-dask report``, run through click's CliRunner.

One small three-state phantom per module (64^3). One run uses the local dask cluster as a user
would; the others replace the cluster by the local threads (the cluster is tested in
test_cli.py and test_cluster.py) to stay fast. Outputs are compared with the Python API called
on the same inputs and with hand computations; every user error must stop with status 2 and one
line before anything is computed.
"""

import base64
import contextlib
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import grapes_dask.cluster
import grapes_dask.report
import grapes_dask.stats
import grapes_dask.table
import grapes_dask.track
from grapes_dask import synthetic
from grapes_dask.cli import cli
from grapes_dask.columns import LONG_COLUMNS, Z_TEST_COLUMNS
from grapes_dask.output import read_table
from grapes_dask.track import track

NAMES = ("pristine", "4.0 V", "4.4 V")
FILES = ("pristine", "4.0_V", "4.4_V")
PNG = b"\x89PNG\r\n\x1a\n"
CLOSING = re.compile(r"^tracked (\d+) particles through 3 states \((\d+) kept\) in [\d.]+ s$")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@contextlib.contextmanager
def _threads(scheduler=None, **kw):
    """Stands in for cluster_client: no cluster, the analyses run on dask's local threads."""
    yield None


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return synthetic.make_phantom(tmp_path_factory.mktemp("ph"), shape=(64, 64, 64), n_states=3, seed=1,
                                  mean_radius=7.5, chunks=32)


def vol(series, i):
    return f"{series.grey[i]},{series.labels[i]}"


@pytest.fixture(scope="module")
def tables(series, tmp_path_factory):
    """Tables made by ``grapes-dask analyze``: key -> path."""
    d = tmp_path_factory.mktemp("tables")
    made = {}
    runs = {"s1_e5": (1, ["--exclude-outer-layers", "5"]), "s2_e5": (2, ["--exclude-outer-layers", "5"]),
            "s2_e3": (2, ["--exclude-outer-layers", "3"]),
            "s2_lw2": (2, ["--exclude-outer-layers", "5", "--layer-width", "2"])}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grapes_dask.cluster, "cluster_client", _threads)
        for key, (i, extra) in runs.items():
            made[key] = d / f"{key}.parquet"
            r = invoke("analyze", series.grey[i], series.labels[i], "--out", made[key], "--quiet", *extra)
            assert r.exit_code == 0, r.output
    return made


@pytest.fixture(scope="module")
def full_run(series, tmp_path_factory):
    """All three states as volumes, on the local cluster."""
    parent = tmp_path_factory.mktemp("full")
    out = parent / "run"
    args = ["operando"]
    for i, name in enumerate(NAMES):
        args += ["--state", f"{name}={vol(series, i)}"]
    r = invoke(*args, "--reference", "pristine", "--out", out, "--quiet")
    return r, out


@pytest.fixture(scope="module")
def tracked(series):
    """The same tracking through the Python API."""
    return track({n: (series.grey[i], series.labels[i]) for i, n in enumerate(NAMES)}, reference="pristine")


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.links = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        for k in ("src", "href"):
            if a.get(k, "").startswith(("http:", "https:", "//", "file:")):
                self.links.append(a[k])


def check_html(path: Path, n_figures: int):
    """Every image of the report is an embedded PNG, one per figure file; nothing external."""
    p = _Images()
    p.feed(path.read_text(encoding="utf-8"))
    assert len(p.srcs) == n_figures and n_figures > 0
    for src in p.srcs:
        head, _, data = src.partition(",")
        assert head == "data:image/png;base64"
        assert base64.b64decode(data, validate=True).startswith(PNG)
    assert p.links == []


def no_leftovers(parent: Path, keep=()):
    assert sorted(p.name for p in parent.iterdir()) == sorted(keep)


# --------------------------------------------------------------------------------------------
# a full run
# --------------------------------------------------------------------------------------------


def test_operando_writes_every_output(full_run, tracked):
    r, out = full_run
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    # the statistics, as the demo prints them (one shared function), then the closing lines
    stats_lines = grapes_dask.report.statistics_lines(tracked)
    assert lines[:-2] == stats_lines, r.stdout
    # header, 3 states, note, 2 + 2 z-tests (pristine -> 4.0 V once), cleaning, noise
    assert len(stats_lines) == 1 + 3 + 1 + 3 + 1 + 1
    assert any(line.startswith("z-test 4.4 V vs pristine (reference): z = ") for line in lines)
    assert any(line.startswith("z-test 4.4 V vs 4.0 V (previous state): z = ") for line in lines)
    s = tracked.summary()
    assert f"pristine: mean ROI grey {s.loc['pristine', 'mean']:7.2f} +- {3 * s.loc['pristine', 'se_tot']:.2f}" in \
        r.stdout
    m = CLOSING.match(lines[-2])
    assert m, lines[-2]
    assert lines[-1] == f"report: {out / 'report.html'}"
    no_leftovers(out.parent, keep=["run"])
    assert {p.name for p in out.iterdir()} == {"particles.parquet", "tables", "summary.csv", "z_tests.csv",
                                               "cleaning.csv", "by_quantile.csv", "background.csv", "figures",
                                               "report.html"}
    pd.testing.assert_frame_equal(pd.read_csv(out / "cleaning.csv"), tracked.counts(), check_dtype=False)
    byq = pd.read_csv(out / "by_quantile.csv")
    exp_q = tracked.by_quantile("centroid-2", 4)
    assert len(byq) == len(exp_q) and list(byq["group"]) == list(exp_q["group"])
    assert np.allclose(byq["delta_mean"], exp_q["delta_mean"], rtol=1e-9, equal_nan=True)

    parts = read_table(out / "particles.parquet")
    assert tuple(parts.columns) == LONG_COLUMNS
    assert len(parts) == parts["label"].nunique() * 3  # one row per (label, state)
    assert not parts.duplicated(["label", "state"]).any()
    assert int(m.group(1)) == parts["label"].nunique()
    assert int(m.group(2)) == parts.loc[~parts["excluded"], "label"].nunique() > 0

    # the same numbers as the Python API on the same inputs
    exp = tracked.particles
    pd.testing.assert_frame_equal(parts.reset_index(drop=True), exp.reset_index(drop=True), check_dtype=False,
                                  check_categorical=False, rtol=1e-12)
    assert list(parts["state"].astype(str).unique()) == list(NAMES)

    # one table per state, names made file names
    assert sorted(p.name for p in (out / "tables").iterdir()) == sorted(f + ".parquet" for f in FILES)
    for name, f in zip(NAMES, FILES):
        t = read_table(out / "tables" / f"{f}.parquet")
        ref = tracked.tables[name]
        cols = ["label", "roi_mean", "roi_voxels", "volume", "touches_border"]
        pd.testing.assert_frame_equal(t[cols].reset_index(drop=True), ref[cols].reset_index(drop=True),
                                      check_dtype=False)
        assert t.attrs["grapes_dask"]["exclude_outer_layers"] == 5

    summ = pd.read_csv(out / "summary.csv", index_col=0)
    exp_s = tracked.summary()
    assert list(summ.index) == list(NAMES)
    pd.testing.assert_frame_equal(summ, exp_s, check_dtype=False, check_names=False, check_index_type=False,
                                  rtol=1e-9)
    # and by hand: kept particles' count and mean roi_mean per state
    kept = parts[~parts["excluded"]]
    for name in NAMES:
        k = kept[kept["state"].astype(str) == name]
        assert summ.loc[name, "n"] == len(k)
        assert summ.loc[name, "mean"] == pytest.approx(k["roi_mean"].mean(), rel=1e-12)

    z = pd.read_csv(out / "z_tests.csv")
    assert tuple(z.columns) == Z_TEST_COLUMNS
    assert list(zip(z["against"], z["state_a"], z["state_b"])) == [
        ("reference", "pristine", "4.0 V"), ("reference", "pristine", "4.4 V"), ("previous", "pristine", "4.0 V"),
        ("previous", "4.0 V", "4.4 V")]
    pd.testing.assert_frame_equal(z, tracked.z_tests().astype({"reject": bool}), check_dtype=False, rtol=1e-9)

    figs = sorted((out / "figures").glob("*.png"))
    assert {"fig7a_state_means.png", "fig7b_state_deltas.png", "fig12_normal_models.png"} <= {p.name for p in figs}
    assert any(p.name.startswith("fig10_change_map_") for p in figs)
    for p in figs:
        assert p.read_bytes().startswith(PNG)
    check_html(out / "report.html", len(figs))


def test_states_as_tables_mixed_with_volumes(series, tables, full_run, tmp_path, monkeypatch):
    """NAME=TABLE and NAME=GREY,LABELS,TABLE are not analysed again; their roi_mean is the one
    of the same volumes analysed by operando."""
    calls = []
    real = grapes_dask.table.analyze_tables

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(grapes_dask.cluster, "cluster_client", _threads)
    monkeypatch.setattr(grapes_dask.table, "analyze_tables", counted)
    out = tmp_path / "mixed"
    r = invoke("operando", "--state", f"pristine={vol(series, 0)}", "--state", f"4.0 V={tables['s1_e5']}",
               "--state", f"4.4 V={vol(series, 2)},{tables['s2_e5']}", "--noise-sigma", "4",
               "--neighbour-gap", "none", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert len(calls) == 1  # pristine only
    parts = read_table(out / "particles.parquet")
    exp = track({"pristine": (series.grey[0], series.labels[0]), "4.0 V": read_table(tables["s1_e5"]),
                 "4.4 V": (series.grey[2], series.labels[2], read_table(tables["s2_e5"]))},
                noise_sigma=4.0, neighbour_gap=None).particles
    pd.testing.assert_frame_equal(parts.reset_index(drop=True), exp.reset_index(drop=True), check_dtype=False,
                                  check_categorical=False, rtol=1e-12)
    full = read_table(full_run[1] / "particles.parquet")
    cols = ["label", "state", "roi_mean", "roi_voxels", "delta", "volume", "centroid-0", "centroid-1", "centroid-2"]
    pd.testing.assert_frame_equal(parts[cols].astype({"state": str}), full[cols].astype({"state": str}),
                                  check_dtype=False, rtol=1e-12)
    assert sorted(p.name for p in (out / "tables").iterdir()) == sorted(f + ".parquet" for f in FILES)
    assert (out / "report.html").exists()


def test_a_run_that_keeps_no_particle_is_an_error(series, tmp_path, monkeypatch):
    """Every particle's ROI empty (exclude-outer-layers deeper than any particle): status 2, one
    error line naming the rule and the option, no output folder, no half-written file."""
    monkeypatch.setattr(grapes_dask.cluster, "cluster_client", _threads)
    out = tmp_path / "empty"
    args = ["operando"]
    for i, name in enumerate(NAMES):
        args += ["--state", f"{name}={vol(series, i)}"]
    r = invoke(*args, "--exclude-outer-layers", "40", "--noise-sigma", "4", "--out", out, "--quiet")
    assert r.exit_code == 2, r.output
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in r.output
    assert "cleaning kept 0 of" in err[0] and "rule 'empty_roi' removed" in err[0]
    assert "lower --exclude-outer-layers (now 40)" in err[0]
    assert r.stdout == ""
    no_leftovers(tmp_path, keep=["empty.partials"] if (tmp_path / "empty.partials").exists() else [])


def test_a_run_that_keeps_few_particles_warns(series, tmp_path, monkeypatch):
    monkeypatch.setattr(grapes_dask.cluster, "cluster_client", _threads)
    out = tmp_path / "few"
    args = ["operando"]
    for i, name in enumerate(NAMES):
        args += ["--state", f"{name}={vol(series, i)}"]
    r = invoke(*args, "--drop-smallest", "0.93", "--noise-sigma", "4", "--out", out, "--quiet")
    with pytest.warns(grapes_dask.track.FewParticlesWarning):
        tr = track({n: (series.grey[i], series.labels[i]) for i, n in enumerate(NAMES)}, noise_sigma=4.0,
                   drop_smallest=0.93)
    c = tr.counts().set_index("reason")
    kept, total = int(c.loc["kept", "n"]), int(tr.particles["label"].nunique())
    assert r.exit_code == 0 and 2 <= kept < 0.1 * total, (r.output, kept, total)
    warn = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    rule = c.drop(index="kept")["n"].idxmax()  # the rule that applies to most particles is named
    assert len(warn) == 1 and f"kept only {kept} of {total}" in warn[0]
    assert f"rule {rule!r} removed {int(c.loc[rule, 'n'])}" in warn[0]
    assert f"smallest {int(c.loc['smallest', 'n'])}" in warn[0]
    assert (out / "report.html").exists()


# --------------------------------------------------------------------------------------------
# user errors: status 2, one line, before any compute
# --------------------------------------------------------------------------------------------


def _no_compute(*a, **kw):
    raise AssertionError("computation started before the inputs were checked")


@pytest.fixture
def guarded(monkeypatch):
    for mod, name in ((grapes_dask.cluster, "cluster_client"), (grapes_dask.track, "track"),
                      (grapes_dask.table, "analyze_tables"), (grapes_dask.stats, "estimate_noise"),
                      (grapes_dask.report, "tracking_report"), (grapes_dask.report, "tables_report")):
        monkeypatch.setattr(mod, name, _no_compute)


def expect_error(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert r.stdout == ""
    err = r.stderr
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


def _cases(series, tables, tmp_path):
    g0, g1, g2 = (vol(series, i) for i in range(3))
    three = ["--state", f"p={g0}", "--state", f"c={g1}", "--state", f"d={g2}"]
    crop = tmp_path / "crop"
    synthetic.make_phantom(crop, shape=(64, 64, 48), seed=1, mean_radius=7.5, chunks=32)
    t = {k: str(v) for k, v in tables.items()}
    tab = ["--noise-sigma", "3", "--neighbour-gap", "none"]
    pd.DataFrame({"label": [1, 2], "x": [0.5, 1.5]}).to_csv(tmp_path / "other.csv", index=False)
    return {
        "syntax": (["--state", "pristine", "--state", f"c={g1}"], ["--state 'pristine'", "NAME=GREY,LABELS"]),
        "syntax, empty name": (["--state", f"={g0}", "--state", f"c={g1}"], ["NAME=GREY,LABELS"]),
        "syntax, four parts": (["--state", f"p={g0},a.zarr,b.parquet", "--state", f"c={g1}"], ["NAME=GREY,LABELS"]),
        "table that is a volume": (["--state", f"p={series.grey[0]}", "--state", f"c={g1}"],
                                   ["is not a table", "p=GREY,LABELS"]),
        "table where labels go": (["--state", f"p={series.grey[0]},{t['s1_e5']}", "--state", f"c={g1}"],
                                  ["is a table where the label volume was expected"]),
        "third part not a table": (["--state", f"p={g0},{series.grey[1]}", "--state", f"c={g1}"],
                                   ["is not a table", "the table last"]),
        "same state twice": (["--state", f"p={g0}", "--state", f"p={g1}"], ["'p' is given twice"]),
        "same file name": (["--state", f"4.4 V={g0}", "--state", f"4.4_V={g1}"], ["same file name"]),
        "one state": (["--state", f"p={g0}"], ["1 --state given", "at least two"]),
        "memory limit": (["--state", f"p={g0}", "--state", f"c={g1}", "--memory-limit", "lots"],
                         ["--memory-limit lots", "8GiB"]),
        "layer width": (["--state", f"p={g0}", "--state", f"c={g1}", "--layer-width", "-1"],
                        ["--layer-width -1.0", "positive"]),
        "reference": (three + ["--reference", "charged"], ["--reference charged is not among the states",
                                                           "['p', 'c', 'd']"]),
        "shapes": (["--state", f"p={g0}", "--state", f"c={crop / 'grey.zarr'},{crop / 'labels.zarr'}"],
                   ["different shapes, (64, 64, 64) and (64, 64, 48)"]),
        "missing volume": (["--state", f"p={g0}", "--state", f"c={tmp_path / 'no.zarr'},{series.labels[1]}"],
                           ["state 'c'", "no.zarr", "does not exist"]),
        "missing table": (["--state", f"p={g0}", "--state", f"c={tmp_path / 'no.parquet'}"] + tab,
                          ["state 'c'", "no.parquet", "does not exist"]),
        "not a particle table": (["--state", f"p={g0}", "--state", f"c={tmp_path / 'other.csv'}"] + tab,
                                 ["state 'c'", "no analysis parameters", "grapes-dask analyze"]),
        "tables, exclude_outer_layers": (["--state", f"p={t['s1_e5']}", "--state", f"c={t['s2_e3']}"] + tab,
                                         ["state 'c'", "exclude_outer_layers=3", "--exclude-outer-layers 5",
                                          "--exclude-outer-layers 3"]),
        "table against this run": (["--state", f"p={t['s1_e5']}", "--state", f"c={t['s2_e5']}",
                                    "--exclude-outer-layers", "3"] + tab, ["exclude_outer_layers=5"]),
        "tables, layer_width": (["--state", f"p={t['s1_e5']}", "--state", f"c={t['s2_lw2']}"] + tab,
                                ["different layer_width (1.0 and 2.0)"]),
        "table against volumes, layer_width": (["--state", f"p={g0}", "--state", f"c={t['s2_lw2']}"] + tab,
                                               ["layer_width=2.0", "--layer-width"]),
        "table without labels, neighbour rule": (["--state", f"p={g0}", "--state", f"c={t['s2_e5']}",
                                                  "--noise-sigma", "3"],
                                                 ["state 'c'", "c=GREY,LABELS,TABLE", "--neighbour-gap none"]),
        "table without grey, noise": (["--state", f"p={g0}", "--state", f"c={t['s2_e5']}", "--neighbour-gap",
                                       "none"], ["noise of state 'c'", "--noise-sigma SIGMA"]),
        "table spacing": (["--state", f"p={g0}", "--state", f"c={t['s2_e5']}", "--spacing", "2"] + tab,
                          ["spacing", "--spacing 2.0 2.0 2.0"]),
        "region syntax": (three + ["--noise-region", "0:5,a:b,0:5"], ["--noise-region '0:5,a:b,0:5'", "start:stop"]),
        "region axes": (three + ["--noise-region", "0:5,0:5"], ["--noise-region 0:5,0:5 does not fit state 'p'",
                                                                "2 axes"]),
        "region outside": (three + ["--noise-region", "0:5,0:5,60:90"], ["axis 2 spans 60..90, outside"]),
        "region negative": (three + ["--noise-region", "-4:5,0:5,0:5"], ["axis 0 spans -4..5, outside"]),
        "region empty": (three + ["--noise-region", "0:5,7:7,0:5"], ["axis 1 spans 7..7, which is empty"]),
        "region and sigma": (three + ["--noise-region", "0:5,0:5,0:5", "--noise-sigma", "2"],
                             ["leave out one of the two"]),
        "gap -1": (three + ["--neighbour-gap", "-1"], ["--neighbour-gap -1", "none"]),
        "gap abc": (three + ["--neighbour-gap", "abc"], ["--neighbour-gap abc"]),
        "gap 1.5": (three + ["--neighbour-gap", "1.5"], ["--neighbour-gap 1.5"]),
        "drop 1.5": (three + ["--drop-smallest", "1.5"], ["--drop-smallest 1.5", "0 <= f < 1"]),
        "drop -0.1": (three + ["--drop-smallest", "-0.1"], ["--drop-smallest -0.1"]),
        "noise sigma": (three + ["--noise-sigma", "-1"], ["--noise-sigma -1.0", ">= 0"]),
        "exclude_outer_layers": (three + ["--exclude-outer-layers", "-1"], ["--exclude-outer-layers -1"]),
        "workers with scheduler": (three + ["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"],
                                   ["--workers 2", "--scheduler"]),
    }


def test_bad_inputs_stop_before_any_compute(series, tables, tmp_path, guarded):
    out = tmp_path / "out"
    for what, (args, needles) in _cases(series, tables, tmp_path).items():
        r = invoke("operando", *args, "--out", out, "--quiet")
        try:
            expect_error(r, *needles)
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from None
        assert not out.exists(), what
    # an existing DIR, and one in a folder that does not exist
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    three = ["--state", f"p={vol(series, 0)}", "--state", f"c={vol(series, 1)}"]
    expect_error(invoke("operando", *three, "--out", out), f"'{out}' already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    expect_error(invoke("operando", *three, "--out", tmp_path / "no" / "out"), "does not exist")


# --------------------------------------------------------------------------------------------
# one folder, written at the end
# --------------------------------------------------------------------------------------------


def _table_states(tables):
    return ["--state", f"a={tables['s1_e5']}", "--state", f"b={tables['s2_e5']}", "--noise-sigma", "3",
            "--neighbour-gap", "none", "--quiet"]


@pytest.mark.parametrize("exc, code", [(RuntimeError("disk full"), 1), (KeyboardInterrupt(), 130)])
def test_failure_midway_leaves_nothing(tables, tmp_path, monkeypatch, exc, code):
    seen = {}

    def fail(tracking, out_dir, *a, **kw):
        seen["dir"] = Path(out_dir)
        (Path(out_dir) / "report.html").write_text("half")
        raise exc

    monkeypatch.setattr(grapes_dask.cluster, "cluster_client", _threads)
    monkeypatch.setattr(grapes_dask.report, "tracking_report", fail)
    parent = tmp_path / "p"
    parent.mkdir()
    r = invoke("operando", *_table_states(tables), "--out", parent / "run")
    assert r.exit_code == code, r.output
    assert seen["dir"].parent == parent and seen["dir"].name != "run"  # written under a temporary name
    no_leftovers(parent)
    if code == 130:
        assert "interrupted" in r.stderr and "Traceback" not in r.stderr


def test_overwrite_replaces_the_old_folder_only_at_the_end(tables, tmp_path, monkeypatch):
    real = grapes_dask.report.tracking_report
    seen = {}

    def check_then_write(tracking, out_dir, *a, **kw):
        seen["old kept while writing"] = (old / "mine.txt").read_text() == "old" and not (old / "tables").exists()
        return real(tracking, out_dir, *a, **kw)

    monkeypatch.setattr(grapes_dask.cluster, "cluster_client", _threads)
    monkeypatch.setattr(grapes_dask.report, "tracking_report", check_then_write)
    parent = tmp_path / "p"
    old = parent / "run"
    old.mkdir(parents=True)
    (old / "mine.txt").write_text("old")
    r = invoke("operando", *_table_states(tables), "--out", old, "--overwrite")
    assert r.exit_code == 0, r.output
    assert seen["old kept while writing"]
    assert not (old / "mine.txt").exists()
    assert (old / "report.html").exists() and (old / "tables" / "a.parquet").exists()
    no_leftovers(parent, keep=["run"])
    # a failed overwrite leaves the earlier run as it was
    before = sorted(p.relative_to(old) for p in old.rglob("*"))
    monkeypatch.setattr(grapes_dask.report, "tracking_report", _no_compute)
    r = invoke("operando", *_table_states(tables), "--out", old, "--overwrite")
    assert r.exit_code == 1
    assert sorted(p.relative_to(old) for p in old.rglob("*")) == before
    no_leftovers(parent, keep=["run"])


# --------------------------------------------------------------------------------------------
# grapes-dask report
# --------------------------------------------------------------------------------------------


def test_report_of_tables(tables, tmp_path):
    out = tmp_path / "rep"
    r = invoke("report", tables["s1_e5"], tables["s2_e5"], "--out", out, "--name", "4.0 V", "--name", "4.4 V")
    assert r.exit_code == 0, r.output
    assert r.stdout == f"report: {out / 'report.html'}\n"
    summ = pd.read_csv(out / "summary.csv", index_col=0)
    assert list(summ.index) == ["4.0 V", "4.4 V"]
    for name, key in (("4.0 V", "s1_e5"), ("4.4 V", "s2_e5")):  # by hand
        t = read_table(tables[key])
        used = t[~t["touches_border"].astype(bool)]
        assert summ.loc[name, "particles"] == len(t) and summ.loc[name, "used"] == len(used)
        assert summ.loc[name, "roi_mean mean"] == pytest.approx(used["roi_mean"].mean(), rel=1e-12)
        assert summ.loc[name, "roi_mean sd"] == pytest.approx(np.std(used["roi_mean"], ddof=1), rel=1e-12)
    figs = sorted((out / "figures").glob("*.png"))
    assert "fig6_largest_group_profiles.png" in {p.name for p in figs}
    check_html(out / "report.html", len(figs))
    # default names: the file names without their suffix
    out2 = tmp_path / "rep2"
    r = invoke("report", tables["s1_e5"], tables["s2_e3"], "--out", out2)
    assert r.exit_code == 0, r.output
    assert list(pd.read_csv(out2 / "summary.csv", index_col=0).index) == ["s1_e5", "s2_e3"]


def test_report_errors(tables, tmp_path, guarded):
    out = tmp_path / "rep"
    a, b = tables["s1_e5"], tables["s2_e5"]
    expect_error(invoke("report", a, b, "--out", out, "--name", "x"), "1 --name for 2 tables")
    expect_error(invoke("report", a, b, "--out", out, "--name", "x", "--name", "x"), "two tables are named 'x'",
                 "--name")
    expect_error(invoke("report", a, a, "--out", out), "two tables are named 's1_e5'")
    expect_error(invoke("report", a, tmp_path / "no.parquet", "--out", out), "no.parquet", "does not exist")
    vol_path = tmp_path / "grey.zarr"
    vol_path.mkdir()
    expect_error(invoke("report", a, vol_path, "--out", out), "grey.zarr", "unsupported suffix")
    assert not out.exists()
    out.mkdir()
    expect_error(invoke("report", a, "--out", out), "already exists", "--overwrite")


def test_api_noise_region_checked_before_compute():
    """track checks the background box against each state's shape before reading a voxel."""
    import dask
    import dask.array as da

    from grapes_dask._errors import GrapesInputError

    def boom(dtype):
        def fail():
            raise RuntimeError("computed")
        return da.from_delayed(dask.delayed(fail)(), shape=(20, 24, 28), dtype=dtype)

    states = {"a": (boom(np.uint8), boom(np.uint16)), "b": (boom(np.uint8), boom(np.uint16))}
    for region, why in ((((0, 5), (0, 5)), "2 axes, the volume 3"),
                        (((0, 5), (0, 5), (20, 29)), "axis 2 spans 20..29, outside the volume (0..28)"),
                        (((0, 5), (3, 3), (0, 5)), "axis 1 spans 3..3, which is empty"),
                        (((0, 1), (0, 1), (0, 1)), "one voxel"),
                        (((0, 5), (0, 5), (0.5, 5)), "not integers"),
                        ({"a": ((0, 5), (0, 5), (0, 5)), "b": ((0, 25), (0, 5), (0, 5))}, "state 'b'")):
        with pytest.raises(GrapesInputError, match=re.escape(why)) as err:
            track(states, noise_region=region)
        assert "noise_region=" in str(err.value)
    # slices and open bounds are boxes too
    with pytest.raises(RuntimeError, match="computed"):
        track(states, noise_region=(slice(0, 5), slice(None), (0, None)), neighbour_gap=None)


def test_operando_partials_per_state_resume(series, tmp_path, monkeypatch):
    """Each analysed state keeps its partials in its own subfolder; a second run resumes all of
    them and writes the same long table."""
    monkeypatch.setattr(grapes_dask.cluster, "cluster_client", _threads)
    args = ["operando", "--state", f"pristine={vol(series, 0)}", "--state", f"4.0 V={vol(series, 1)}",
            "--reference", "pristine", "--quiet", "--partials", tmp_path / "keep", "--keep-partials"]
    r1 = invoke(*args, "--out", tmp_path / "one")
    assert r1.exit_code == 0, r1.output
    subs = sorted(p.name for p in (tmp_path / "keep").iterdir())
    assert subs == ["4.0_V", "pristine"]
    for s in subs:
        assert (tmp_path / "keep" / s / "manifest.json").is_file()
        assert list((tmp_path / "keep" / s).glob("pass2-*.npz"))
    r2 = invoke(*args[:-1], "--out", tmp_path / "two")  # without --keep-partials: removed at the end
    assert r2.exit_code == 0, r2.output
    assert r2.output.count("note: resuming pass 2:") == 2
    assert not (tmp_path / "keep").exists()
    a, b = read_table(tmp_path / "one" / "particles.parquet"), read_table(tmp_path / "two" / "particles.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert not (tmp_path / "one.partials").exists() and not (tmp_path / "two.partials").exists()
