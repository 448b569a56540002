"""CSV list cells in standard JSON, and the long tables written with the particle table
(``write_table(..., extra=...)`` and the ``analyze`` command).

References: the files are read back with the standard library's ``json`` in strict mode (no
``NaN``/``Infinity`` tokens), ``pandas.read_csv``, pyarrow and openpyxl; the CLI's layers and
contacts tables are checked against numpy counts on the label volume.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import openpyxl
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr

import grapes_dask
from grapes_dask import GrapesInputError
from grapes_dask.output import check_table_path, companion_path, read_table, write_table
from grapes_dask.synthetic import phantom_numpy


def _refuse_constant(name):
    raise ValueError(f"non-standard JSON token {name}")


def strict_json(text):
    """The standard library's parser, refusing the NaN / Infinity / -Infinity extensions."""
    return json.loads(text, parse_constant=_refuse_constant)


def hand_table() -> pd.DataFrame:
    df = pd.DataFrame({
        "label": np.array([2**64 - 1, 5, 7], dtype=np.uint64),
        "value": np.array([np.nan, 1.5, -np.inf]),
        "profile": [np.array([1.5, np.nan, np.inf, -np.inf, -0.0, 1e-300, 0.1]), np.array([], np.float64), None],
        "f32": [np.array([0.1, np.nan, np.inf], np.float32), np.array([2.5], np.float32), np.array([], np.float32)],
        "counts": [np.array([1, 2**62], np.int64), np.array([], np.int64), np.array([3], np.int64)],
        "flags": [np.array([True, False]), np.array([], bool), np.array([True])],
    })
    df.attrs["grapes_dask"] = {"spacing": [1.0, 1.0, 1.0], "normalise": "radial_max"}
    return df


@pytest.fixture(scope="module")
def analysed():
    grey, lab, _ = phantom_numpy((24, 28, 26), seed=4, chunks=13, mean_radius=5)
    res = grapes_dask.analyze_tables(grey, lab, chunks=13)
    assert any(np.isnan(p).all() for p in res.particles["radial_layers_graylevelnormed"])  # radial_max NaN
    return res


def assert_same_table(got: pd.DataFrame, want: pd.DataFrame):
    assert list(got.columns) == list(want.columns) and len(got) == len(want)
    for name in want.columns:
        w = want[name]
        if w.dtype == object and any(isinstance(v, np.ndarray) for v in w):
            for g, v in zip(got[name], w):
                if v is None:
                    assert g is None
                    continue
                assert g.dtype == v.dtype, name
                np.testing.assert_array_equal(g, v, err_msg=name)
                assert (np.signbit(g) == np.signbit(v)).all() if g.dtype.kind == "f" else True
        else:
            pd.testing.assert_series_equal(got[name], w, check_exact=True, check_index=False)
    assert got.attrs == want.attrs


# --------------------------------------------------------------------------------------------
# CSV list cells
# --------------------------------------------------------------------------------------------


def test_csv_list_cells_are_standard_json(tmp_path, analysed):
    for df, name in ((hand_table(), "hand.csv"), (analysed.particles, "analysed.csv")):
        path = tmp_path / name
        write_table(df, path)
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)  # no options needed to read the text
        lists = [c for c in df.columns if df[c].dtype == object]
        assert lists
        for col in lists:
            for text, want in zip(raw[col], df[col]):
                if want is None:
                    assert text == ""
                    continue
                got = strict_json(text)  # every list cell parses as strict, standard JSON
                assert isinstance(got, list) and len(got) == len(want)
                want = np.asarray(want)
                if want.dtype.kind == "f":
                    # NaN as null, the infinities as numbers that overflow to +-inf
                    assert [v is None for v in got] == list(np.isnan(want))
                    vals = np.array([np.nan if v is None else v for v in got], np.float64).astype(want.dtype)
                    np.testing.assert_array_equal(vals, want)
                else:
                    np.testing.assert_array_equal(np.asarray(got, dtype=want.dtype), want)
        assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
        assert_same_table(read_table(path), df)  # and the sidecar round trip stays exact


def test_csv_list_cells_by_hand(tmp_path):
    df = hand_table()
    write_table(df, tmp_path / "h.csv")
    raw = pd.read_csv(tmp_path / "h.csv", dtype=str, keep_default_na=False)
    assert raw["profile"][0] == "[1.5, null, 1e999, -1e999, -0.0, 1e-300, 0.1]"
    assert raw["profile"][1] == "[]" and raw["profile"][2] == ""
    assert raw["counts"][0] == "[1, 4611686018427387904]" and raw["flags"][0] == "[true, false]"
    side = json.loads((tmp_path / "h.csv.json").read_text())
    assert side["format"] == "grapes_dask.csv/2" and "null" in side["list_encoding"]


def test_csv_of_format_1_with_nan_tokens_still_reads(tmp_path):
    """Tables written before standard JSON (grapes_dask.csv/1): NaN and Infinity tokens."""
    (tmp_path / "old.csv").write_text('label,profile\n3,"[1.5, NaN, Infinity, -Infinity]"\n4,\n')
    (tmp_path / "old.csv.json").write_text(json.dumps({
        "format": "grapes_dask.csv/1", "table": "old.csv", "list_encoding": "json",
        "columns": {"label": "uint64", "profile": "list[float64]"}, "index_columns": [], "index_names": [],
        "attrs": {}}))
    got = read_table(tmp_path / "old.csv")
    np.testing.assert_array_equal(got["profile"][0], [1.5, np.nan, np.inf, -np.inf])
    assert got["profile"][1] is None and got["label"].dtype == np.uint64


def test_csv_without_sidecar_reads_null_as_nan(tmp_path):
    write_table(hand_table(), tmp_path / "h.csv")
    (tmp_path / "h.csv.json").unlink()
    got = read_table(tmp_path / "h.csv")
    np.testing.assert_array_equal(got["profile"][0], hand_table()["profile"][0])
    assert got["profile"][0].dtype == np.float64


def test_xlsx_list_cells_are_the_csv_text(tmp_path, analysed):
    df = analysed.particles
    write_table(df, tmp_path / "t.csv")
    write_table(df, tmp_path / "t.xlsx")
    raw = pd.read_csv(tmp_path / "t.csv", dtype=str, keep_default_na=False)
    rows = list(openpyxl.load_workbook(tmp_path / "t.xlsx")["particles"].iter_rows(values_only=True))
    col = {n: i for i, n in enumerate(rows[0])}
    for name in grapes_dask.table.PROFILE_COLUMNS:
        cells = [r[col[name]] for r in rows[1:]]
        assert cells == list(raw[name])
        for c in cells:
            strict_json(c)


# --------------------------------------------------------------------------------------------
# extra (long) tables
# --------------------------------------------------------------------------------------------


def long_tables(res):
    out = {}
    for name in ("layers", "contacts"):
        t = getattr(res, name).copy()
        t.attrs = {"grapes_dask": {"table": name}}
        out[name] = t
    return out


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_extra_tables_beside_the_table(tmp_path, analysed, suffix):
    path = tmp_path / f"particles{suffix}"
    extra = long_tables(analysed)
    write_table(analysed.particles, path, extra=extra)
    assert companion_path(path, "layers") == tmp_path / f"particles.layers{suffix}"
    want = {f"particles{suffix}", f"particles.layers{suffix}", f"particles.contacts{suffix}"}
    if suffix == ".csv":
        want |= {n + ".json" for n in want}
    assert set(os.listdir(tmp_path)) == want
    assert_same_table(read_table(path), analysed.particles)
    for name, t in extra.items():
        assert_same_table(read_table(companion_path(path, name)), t)
    if suffix == ".parquet":  # an ordinary Parquet file for other tools
        assert pq.read_table(companion_path(path, "layers")).column_names == ["label", "layer", "count", "mean", "std"]


def test_extra_tables_as_xlsx_sheets(tmp_path, analysed, monkeypatch):
    import grapes_dask.output as out

    extra = long_tables(analysed)
    write_table(analysed.particles, tmp_path / "t.xlsx", extra=extra)
    assert os.listdir(tmp_path) == ["t.xlsx"]
    wb = openpyxl.load_workbook(tmp_path / "t.xlsx")
    assert wb.sheetnames == ["particles", "layers", "contacts", "parameters", "columns"]

    def sheet_frame(names):
        rows = [r for n in names for r in list(wb[n].iter_rows(values_only=True))[1:]]
        return pd.DataFrame(rows, columns=list(next(wb[names[0]].iter_rows(values_only=True))))

    for name, t in extra.items():
        got = sheet_frame([name])
        assert list(got.columns) == list(t.columns) and len(got) == len(t)
        for c in t.columns:
            np.testing.assert_allclose(got[c].to_numpy(float), t[c].to_numpy(float), rtol=1e-15, equal_nan=True)
    # a table longer than a sheet continues on NAME_2, NAME_3...
    monkeypatch.setattr(out, "_XLSX_MAX_ROWS", 20)
    n = len(extra["layers"])
    assert n > 40
    write_table(analysed.particles.iloc[:15], tmp_path / "s.xlsx", extra={"layers": extra["layers"]})
    wb = openpyxl.load_workbook(tmp_path / "s.xlsx")
    k = -(-n // 20)
    names = ["layers"] + [f"layers_{j}" for j in range(2, k + 1)]
    assert wb.sheetnames == ["particles"] + names + ["parameters", "columns"]
    got = sheet_frame(names)
    np.testing.assert_array_equal(got["count"].to_numpy(), extra["layers"]["count"].to_numpy())
    np.testing.assert_array_equal(got["label"].to_numpy(np.uint64), extra["layers"]["label"].to_numpy())


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_existing_extra_table_is_refused_before_anything(tmp_path, analysed, suffix):
    blocker = companion_path(tmp_path / f"t{suffix}", "contacts")
    if suffix == ".csv":
        blocker = blocker.with_name(blocker.name + ".json")  # even the sidecar alone
    blocker.write_text("old")
    with pytest.raises(GrapesInputError, match="already exists"):
        check_table_path(tmp_path / f"t{suffix}", extra=("layers", "contacts"))
    check_table_path(tmp_path / f"t{suffix}", extra=("layers",))  # the others are free
    with pytest.raises(GrapesInputError, match="already exists"):
        write_table(analysed.particles, tmp_path / f"t{suffix}", extra=long_tables(analysed))
    assert os.listdir(tmp_path) == [blocker.name] and blocker.read_text() == "old"
    write_table(analysed.particles, tmp_path / f"t{suffix}", extra=long_tables(analysed), overwrite=True)
    assert blocker.read_bytes() != b"old"


def test_failing_extra_table_leaves_nothing(tmp_path, analysed, monkeypatch):
    real = pq.write_table
    calls = []

    def fail_second(table, where, *a, **k):
        calls.append(where)
        if len(calls) == 2:
            with open(where, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("disk full")
        return real(table, where, *a, **k)

    (tmp_path / "t.parquet").write_bytes(b"old")
    monkeypatch.setattr(pq, "write_table", fail_second)
    with pytest.raises(RuntimeError, match="disk full"):
        write_table(analysed.particles, tmp_path / "t.parquet", extra=long_tables(analysed), overwrite=True)
    assert os.listdir(tmp_path) == ["t.parquet"] and (tmp_path / "t.parquet").read_bytes() == b"old"


@pytest.mark.parametrize("name", ["particles", "Parameters", "columns", "1st", "a-b", "x" * 25, "", 3])
def test_bad_extra_names(tmp_path, name):
    with pytest.raises(GrapesInputError, match="extra table name"):
        write_table(hand_table(), tmp_path / "t.parquet", extra={name: hand_table()})
    with pytest.raises(GrapesInputError, match="extra must map"):
        write_table(hand_table(), tmp_path / "t.parquet", extra=[hand_table()])
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# the analyze command
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from grapes_dask import synthetic

    return synthetic.make_phantom(tmp_path_factory.mktemp("ph"), shape=(28, 32, 30), seed=5, mean_radius=5.0,
                                  chunks=16)


@pytest.fixture
def no_cluster(monkeypatch):
    """Run the command on dask's local scheduler (the cluster is tested elsewhere)."""
    import grapes_dask.cluster

    @contextlib.contextmanager
    def fake_cluster(scheduler=None, **kw):
        yield None

    monkeypatch.setattr(grapes_dask.cluster, "cluster_client", fake_cluster)


def invoke(*args):
    from click.testing import CliRunner

    from grapes_dask.cli import cli

    return CliRunner().invoke(cli, ["analyze", *[str(a) for a in args], "--quiet"])


def ref_contacts(lab):
    """Pairs of labels sharing faces (6-connectivity) and their face counts, with numpy."""
    pairs = []
    for a in range(lab.ndim):
        lo = lab[tuple(slice(None, -1) if i == a else slice(None) for i in range(lab.ndim))].ravel()
        hi = lab[tuple(slice(1, None) if i == a else slice(None) for i in range(lab.ndim))].ravel()
        m = (lo != hi) & (lo > 0) & (hi > 0)
        pairs.append(np.stack([np.minimum(lo[m], hi[m]), np.maximum(lo[m], hi[m])], axis=1))
    uniq, counts = np.unique(np.concatenate(pairs), axis=0, return_counts=True)
    return {(int(a), int(b)): int(c) for (a, b), c in zip(uniq, counts)}


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_analyze_writes_layers_and_contacts_beside(tmp_path, phantom, no_cluster, suffix):
    out = tmp_path / f"t{suffix}"
    r = invoke(phantom.grey[0], phantom.labels[0], "--out", out, "--exclude-outer-layers", "1",
               "--normalise", "roi_mean")
    assert r.exit_code == 0, r.output
    assert f"t.layers{suffix}" in r.output and f"t.contacts{suffix}" in r.output
    lab = zarr.open(str(phantom.labels[0]), mode="r")[...]
    particles = read_table(out)
    layers = read_table(tmp_path / f"t.layers{suffix}")
    contacts = read_table(tmp_path / f"t.contacts{suffix}")
    assert list(layers.columns) == ["label", "layer", "count", "mean", "std"]
    assert layers["label"].dtype == np.uint64 and layers["layer"].dtype == np.int64
    # every voxel of every particle is in one layer row; the rows are the profiles' non-empty layers
    ids, sizes = np.unique(lab[lab > 0], return_counts=True)
    per_label = layers.groupby("label")["count"].sum()
    assert list(per_label.index) == list(ids) and list(per_label) == list(sizes)
    for _, row in particles.iterrows():
        mine = layers[layers["label"] == row["label"]]
        nz = np.flatnonzero(row["radial_layers_count"]) + 1
        assert list(mine["layer"]) == list(nz)
        np.testing.assert_array_equal(mine["mean"].to_numpy(), row["radial_layers_graylevel"][nz - 1])
    got = {(int(a), int(b)): int(n) for a, b, n in contacts[["label_a", "label_b", "n_faces"]].to_numpy()}
    assert got == ref_contacts(lab) and len(got) > 0
    for t, name in ((layers, "layers"), (contacts, "contacts")):
        params = t.attrs["grapes_dask"]
        assert params["table"] == name and params["exclude_outer_layers"] == 1 and params["command"] == "analyze"
    # --normalise roi_mean: each layer's mean over the ROI mean
    assert particles.attrs["grapes_dask"]["normalise"] == "roi_mean"
    for _, row in particles.iterrows():
        np.testing.assert_allclose(row["radial_layers_graylevelnormed"],
                                   row["radial_layers_graylevel"] / row["roi_mean"], rtol=1e-15)


def test_analyze_xlsx_sheets_and_no_long_tables(tmp_path, phantom, no_cluster):
    r = invoke(phantom.grey[0], phantom.labels[0], "--out", tmp_path / "t.xlsx")
    assert r.exit_code == 0, r.output
    assert os.listdir(tmp_path) == ["t.xlsx"]
    wb = openpyxl.load_workbook(tmp_path / "t.xlsx")
    assert wb.sheetnames == ["particles", "layers", "contacts", "parameters", "columns"]
    assert next(wb["contacts"].iter_rows(values_only=True)) == ("label_a", "label_b", "n_faces")
    r = invoke(phantom.grey[0], phantom.labels[0], "--out", tmp_path / "only.parquet", "--no-long-tables")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path)) == ["only.parquet", "t.xlsx"]


def test_analyze_refuses_existing_long_tables_before_computing(tmp_path, phantom, no_cluster, monkeypatch):
    import grapes_dask.table

    calls = []
    real = grapes_dask.table.analyze_tables
    monkeypatch.setattr(grapes_dask.table, "analyze_tables", lambda *a, **k: calls.append(1))
    (tmp_path / "t.layers.csv").write_text("old")
    r = invoke(phantom.grey[0], phantom.labels[0], "--out", tmp_path / "t.csv")
    assert r.exit_code == 2 and "t.layers.csv" in r.output and "--overwrite" in r.output, r.output
    assert calls == [] and os.listdir(tmp_path) == ["t.layers.csv"]
    # skipping the long tables, nothing is in the way
    monkeypatch.setattr(grapes_dask.table, "analyze_tables", real)
    r = invoke(phantom.grey[0], phantom.labels[0], "--out", tmp_path / "t.csv", "--no-long-tables")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "t.layers.csv").read_text() == "old"
