"""Tests of ``grapes_dask.output``: table files, prop_to_image and particle().

References are independent: files are read back with pyarrow, pandas.read_csv, json and
openpyxl directly; painted volumes are compared with a numpy ``np.where`` loop per label;
particle layer maps with scipy's ``distance_transform_edt`` of the zero-padded whole-volume mask.
"""

from __future__ import annotations

import json
import os

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import openpyxl
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from scipy import ndimage as ndi

import grapes_dask
from grapes_dask import GrapesInputError
from grapes_dask.output import particle, prop_to_image, read_table, write_table
from grapes_dask.synthetic import phantom_numpy

SPACING3 = (1.0, 0.7, 1.3)
WIDTH3 = 0.7
LIST_COLUMNS = [c for c in grapes_dask.table.PROFILE_COLUMNS]


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case3d():
    """A 3D phantom with sparse uint64 ids in 2**40..10**15 (Excel numbers), analysed with anisotropic spacing."""
    grey, lab, _ = phantom_numpy((24, 32, 28), seed=1, chunks=16, mean_radius=5, ids="sparse",
                                 max_id=2**49, label_dtype="uint64")
    df = grapes_dask.analyze(grey, lab, chunks=12, spacing=SPACING3, layer_width=WIDTH3)
    assert len(df) > 10 and 2**40 < df["label"].min() and df["label"].max() < 10**15
    df.loc[2, "roi_std"] = np.nan  # a NaN among the scalars (the normed profiles hold NaN already)
    return grey, lab, df


@pytest.fixture(scope="module")
def case2d():
    grey, lab, _ = phantom_numpy((40, 36), seed=3, chunks=16, mean_radius=5, ids="sparse")
    df = grapes_dask.analyze(grey, lab, chunks=16)
    assert len(df) > 3
    return grey, lab, df


def edge_table() -> pd.DataFrame:
    """Hand-built table: extreme ids, NaN/inf/-0.0, empty, missing and float32 lists, text."""
    df = pd.DataFrame({
        "label": np.array([2**64 - 1, 2**41 + 3, 7], dtype=np.uint64),
        "value": np.array([np.nan, np.inf, -0.0]),
        "count": np.array([-(2**62), 0, 5], dtype=np.int64),
        "flag": np.array([True, False, True]),
        "small": np.array([0.1, 1.5, -2.25], dtype=np.float32),
        "name": pd.Series(["a,b", 'q"uote', "NA"], dtype="str"),
        "profile": [np.array([1.5, np.nan, np.inf, -np.inf]), np.array([], dtype=np.float64), None],
        "counts": [np.array([1, 2**62], np.int64), np.array([], np.int64), np.array([3], np.int64)],
        "f32": [np.array([0.1, np.nan], np.float32), np.array([2.5], np.float32), np.array([], np.float32)],
    })
    df.attrs["grapes_dask"] = {"spacing": [1.0, 0.5, 0.25], "layer_width": 0.7, "grey": "grey.zarr",
                               "nested": {"a": [1, 2], "b": None}}
    df.attrs["note"] = "extra attribute"
    return df


def is_list_column(col: pd.Series) -> bool:
    return col.dtype == object and any(isinstance(v, np.ndarray) for v in col)


def assert_tables_equal(got: pd.DataFrame, want: pd.DataFrame, attrs: bool = True) -> None:
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want)
    for name in want.columns:
        if is_list_column(want[name]):
            for i, (g, w) in enumerate(zip(got[name], want[name])):
                if w is None:
                    assert g is None, (name, i, g)
                    continue
                assert isinstance(g, np.ndarray), (name, i, type(g))
                assert g.dtype == w.dtype, (name, i, g.dtype, w.dtype)
                np.testing.assert_array_equal(g, w, err_msg=f"{name} row {i}")
        else:
            pd.testing.assert_series_equal(got[name], want[name], check_exact=True, check_index=False)
    pd.testing.assert_index_equal(got.index, want.index, exact="equiv")
    if attrs:
        assert got.attrs == want.attrs


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def paint_reference(lab: np.ndarray, keys, values, fill, dtype) -> np.ndarray:
    """GRAPES-style painting: one ``np.where`` per table label."""
    out = np.full(lab.shape, fill, dtype=dtype)
    for k, v in zip(keys, values):
        if int(k) != 0:
            out = np.where(lab == k, np.asarray(v, dtype=dtype), out)
    return out


def assert_same(got, want) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)  # NaN equals NaN here


# --------------------------------------------------------------------------------------------
# write_table / read_table
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_round_trip_analyzed_table(case3d, tmp_path, suffix):
    df = case3d[2]
    path = tmp_path / f"particles{suffix}"
    assert write_table(df, path) == path
    got = read_table(path)
    assert got["label"].dtype == np.uint64
    assert_tables_equal(got, df)
    assert np.isnan(got.loc[2, "roi_std"])
    assert any(np.isnan(p).any() for p in got["radial_layers_graylevelnormed"])


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_round_trip_edge_cases(tmp_path, suffix):
    df = edge_table()
    path = tmp_path / f"edge{suffix}"
    write_table(df, path)
    got = read_table(path)
    assert_tables_equal(got, df)
    assert np.signbit(got["value"].iloc[2])  # -0.0 kept


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_round_trip_2d_and_named_index(case2d, tmp_path, suffix):
    df = case2d[2]
    path = tmp_path / f"t2{suffix}"
    write_table(df, path)
    assert_tables_equal(read_table(path), df)
    indexed = df.set_index("label")
    write_table(indexed, tmp_path / f"indexed{suffix}")
    got = read_table(tmp_path / f"indexed{suffix}")
    assert got.index.name == "label" and got.index.dtype == np.uint64
    assert_tables_equal(got, indexed)


def test_parquet_layout_read_by_pyarrow(case3d, tmp_path):
    df = case3d[2]
    path = tmp_path / "p.parquet"
    write_table(df, path)
    schema = pq.read_schema(path)
    assert json.loads(schema.metadata[b"grapes_dask"]) == df.attrs["grapes_dask"]
    assert schema.field("label").type == pa.uint64()
    assert schema.field("radial_layers_count").type == pa.list_(pa.int64())
    assert schema.field("radial_layers_graylevelnormed").type == pa.list_(pa.float64())
    tbl = pq.read_table(path)
    normed = tbl.column("radial_layers_graylevelnormed").combine_chunks()
    assert normed.null_count == 0 and normed.values.null_count == 0  # NaN stored as NaN, not null
    assert np.isnan(normed.values.to_numpy()).any()
    assert tbl.column("label").to_pylist() == [int(x) for x in df["label"]]
    # the edge table: extra attrs under their own key, a missing list as a null
    path = tmp_path / "e.parquet"
    write_table(edge_table(), path)
    t = pq.read_table(path)
    assert json.loads(t.schema.metadata[b"grapes_dask.attrs"]) == {"note": "extra attribute"}
    assert t.column("profile").to_pylist()[2] is None
    assert t.schema.field("f32").type == pa.list_(pa.float32())


def test_csv_layout_read_by_pandas_and_json(case3d, tmp_path):
    df = case3d[2]
    path = tmp_path / "p.csv"
    write_table(df, path)
    raw = pd.read_csv(path, dtype={"label": str})
    assert list(raw["label"]) == [str(int(x)) for x in df["label"]]
    for name in LIST_COLUMNS:
        for text, want in zip(raw[name], df[name]):
            np.testing.assert_array_equal(np.array(json.loads(text), dtype=want.dtype), want)
    side = json.loads((tmp_path / "p.csv.json").read_text())
    assert side["attrs"] == df.attrs
    assert side["columns"]["label"] == "uint64"
    assert side["columns"]["radial_layers_graylevel"] == "list[float64]"
    assert pd.isna(raw.loc[2, "roi_std"])


def test_csv_without_sidecar_guesses(case3d, tmp_path):
    df = case3d[2]
    path = tmp_path / "p.csv"
    write_table(df, path)
    (tmp_path / "p.csv.json").unlink()
    got = read_table(path)
    assert got["label"].dtype == np.uint64
    assert (got["label"].to_numpy() == df["label"].to_numpy()).all()
    for a, b in zip(got["radial_layers_count"], df["radial_layers_count"]):
        np.testing.assert_array_equal(a, b)
    assert got.attrs == {}


def test_xlsx_layout_read_by_openpyxl(case3d, tmp_path):
    df = case3d[2]
    path = tmp_path / "p.xlsx"
    write_table(df, path)
    wb = openpyxl.load_workbook(path)
    assert wb.sheetnames == ["particles", "parameters", "columns"]
    rows = list(wb["particles"].iter_rows(values_only=True))
    assert list(rows[0]) == list(df.columns)
    assert len(rows) == len(df) + 1
    col = {n: i for i, n in enumerate(rows[0])}
    for r, (_, want) in zip(rows[1:], df.iterrows()):
        assert r[col["label"]] == int(want["label"])  # < 10**15: a number, exact
        assert r[col["voxel_count"]] == want["voxel_count"]
        assert r[col["touches_border"]] is bool(want["touches_border"])
        if np.isnan(want["roi_std"]):
            assert r[col["roi_std"]] is None
        else:  # openpyxl writes 16 significant digits (Excel shows 15)
            assert r[col["roi_std"]] == pytest.approx(want["roi_std"], rel=1e-15, abs=0)
        for name in LIST_COLUMNS:
            np.testing.assert_array_equal(np.array(json.loads(r[col[name]]), dtype=want[name].dtype), want[name])
    params = dict(list(wb["parameters"].iter_rows(values_only=True))[1:])
    assert params["layer_width"] == WIDTH3
    assert json.loads(params["spacing"]) == list(SPACING3)
    assert params["command"] == "analyze"
    dtypes = dict(list(wb["columns"].iter_rows(values_only=True))[1:])
    assert dtypes["label"] == "uint64" and dtypes["radial_layers"] == "list[int64]"


def test_xlsx_edge_cases(tmp_path):
    df = edge_table()
    path = tmp_path / "e.xlsx"
    write_table(df, path)
    wb = openpyxl.load_workbook(path)
    rows = list(wb["particles"].iter_rows(values_only=True))
    col = {n: i for i, n in enumerate(rows[0])}
    # integers of 10**15 or more are text in full (Excel keeps 15 digits)
    assert [r[col["label"]] for r in rows[1:]] == [str(int(x)) for x in df["label"]]
    assert [r[col["count"]] for r in rows[1:]] == [str(int(x)) for x in df["count"]]
    assert [r[col["value"]] for r in rows[1:]] == [None, "inf", 0.0]
    assert rows[3][col["profile"]] is None
    assert json.loads(rows[2][col["profile"]]) == []
    params = dict(list(wb["parameters"].iter_rows(values_only=True))[1:])
    assert json.loads(params["note"]) == "extra attribute"
    assert json.loads(params["nested"]) == {"a": [1, 2], "b": None}


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".xlsx"])
def test_dask_dataframe(case3d, tmp_path, suffix):
    df = case3d[2]
    with dask.config.set({"dataframe.convert-string": False}):  # else dask turns arrays into text
        ddf = dd.from_pandas(df, npartitions=3)
    path = tmp_path / f"d{suffix}"
    write_table(ddf, path)
    if suffix == ".xlsx":
        rows = list(openpyxl.load_workbook(path)["particles"].iter_rows(values_only=True))
        assert len(rows) == len(df) + 1
    else:
        assert_tables_equal(read_table(path), df)


def test_particle_table_dask_frame(case2d, tmp_path):
    grey, lab, df = case2d
    ddf = grapes_dask.particle_table(grey, lab, chunks=16)
    write_table(ddf, tmp_path / "pt.parquet")
    got = read_table(tmp_path / "pt.parquet")
    skip = {"created"}  # each run records its own date
    assert {k: v for k, v in got.attrs["grapes_dask"].items() if k not in skip} == \
           {k: v for k, v in df.attrs["grapes_dask"].items() if k not in skip}
    assert_tables_equal(got, df, attrs=False)


# --------------------------------------------------------------------------------------------
# atomicity and input errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".xlsx"])
def test_existing_file_untouched_without_overwrite(tmp_path, suffix):
    path = tmp_path / f"t{suffix}"
    path.write_bytes(b"old")
    with pytest.raises(GrapesInputError, match="already exists"):
        write_table(edge_table(), path)
    assert path.read_bytes() == b"old"
    assert listing(tmp_path) == [path.name]
    write_table(edge_table(), path, overwrite=True)
    assert path.read_bytes() != b"old"
    if suffix != ".xlsx":
        assert_tables_equal(read_table(path), edge_table())
    assert not [f for f in listing(tmp_path) if f.startswith(".")]


def test_existing_csv_sidecar_refused(tmp_path):
    (tmp_path / "t.csv.json").write_text("{}")
    with pytest.raises(GrapesInputError, match="t.csv.json"):
        write_table(edge_table(), tmp_path / "t.csv")
    assert listing(tmp_path) == ["t.csv.json"]


def test_existing_file_refused_before_computing(tmp_path):
    (tmp_path / "t.parquet").write_bytes(b"old")
    calls = []

    def boom(part):
        calls.append(1)
        raise RuntimeError("computed")

    ddf = dd.from_pandas(pd.DataFrame({"label": np.arange(4, dtype=np.uint64)}), npartitions=2)
    ddf = ddf.map_partitions(boom, meta=ddf._meta)
    with pytest.raises(GrapesInputError, match="already exists"):
        write_table(ddf, tmp_path / "t.parquet")
    assert calls == []


def _partial_then_fail(*args, **kwargs):
    target = args[1] if len(args) > 1 else kwargs.get("where", kwargs.get("path_or_buf"))
    with open(target, "wb") as f:
        f.write(b"partial")
    raise RuntimeError("disk full")


@pytest.mark.parametrize("existing", [False, True])
def test_failing_parquet_write_leaves_nothing(tmp_path, monkeypatch, existing):
    path = tmp_path / "t.parquet"
    if existing:
        path.write_bytes(b"old")
    monkeypatch.setattr(pq, "write_table", _partial_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_table(edge_table(), path, overwrite=True)
    assert listing(tmp_path) == (["t.parquet"] if existing else [])
    if existing:
        assert path.read_bytes() == b"old"


def test_failing_csv_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(self, path_or_buf=None, *args, **kwargs):
        _partial_then_fail(self, path_or_buf)

    monkeypatch.setattr(pd.DataFrame, "to_csv", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_table(edge_table(), tmp_path / "t.csv")
    assert listing(tmp_path) == []


def test_failing_xlsx_write_leaves_nothing(tmp_path, monkeypatch):
    df = pd.DataFrame({"label": np.arange(1, 4, dtype=np.uint64),
                       "profile": [np.zeros(2), np.zeros(3), np.arange(20_000, dtype=np.float64)]})
    with pytest.raises(GrapesInputError, match="32767"):
        write_table(df, tmp_path / "t.xlsx")
    assert listing(tmp_path) == []
    monkeypatch.setattr(openpyxl.Workbook, "save", _partial_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_table(edge_table(), tmp_path / "t.xlsx")
    assert listing(tmp_path) == []


def test_bad_destinations(tmp_path):
    with pytest.raises(GrapesInputError) as e:
        write_table(edge_table(), tmp_path / "t.txt")
    for s in (".parquet", ".csv", ".xlsx"):
        assert s in str(e.value)
    with pytest.raises(GrapesInputError, match="does not exist"):
        write_table(edge_table(), tmp_path / "missing" / "t.csv")
    with pytest.raises(GrapesInputError, match="pandas or dask DataFrame"):
        write_table({"label": [1]}, tmp_path / "t.csv")
    bad = edge_table()
    bad.attrs["grapes_dask"] = {"thing": object()}
    with pytest.raises(GrapesInputError, match="JSON"):
        write_table(bad, tmp_path / "t.parquet")
    assert listing(tmp_path) == []
    with pytest.raises(GrapesInputError, match=r"\.parquet, \.csv"):
        read_table(tmp_path / "t.xlsx")
    with pytest.raises(GrapesInputError, match="does not exist"):
        read_table(tmp_path / "nothing.parquet")


# --------------------------------------------------------------------------------------------
# prop_to_image
# --------------------------------------------------------------------------------------------


def random_labels(shape, ids, seed=0, dtype=np.uint64):
    rng = np.random.default_rng(seed)
    lab = np.asarray(ids, dtype=dtype)[rng.integers(0, len(ids), size=shape)]
    lab[rng.random(shape) < 0.3] = 0
    return lab


def test_prop_to_image_sparse_ids_uneven_chunks():
    rng = np.random.default_rng(1)
    ids = np.unique(rng.integers(1, 2**50, size=12, dtype=np.uint64)) + np.uint64(2**40)
    lab = random_labels((19, 23, 17), ids)
    in_table = ids[::2][:-1]  # some labels of the volume are not in the table
    extra = np.array([5, 2**63 + 11], dtype=np.uint64)  # and some table labels are not in the volume
    keys = np.concatenate([extra, in_table[::-1]])  # unsorted
    values = rng.normal(size=len(keys))
    values[-1] = np.nan
    table = pd.DataFrame({"label": keys, "value": values, "count": np.arange(len(keys), dtype=np.int32) + 1})
    for chunks in [(5, 7, 11), 4, (19, 23, 17)]:
        img = prop_to_image(lab, table, "value", chunks=chunks)
        assert isinstance(img, da.Array) and img.dtype == np.float64
        assert_same(img.compute(), paint_reference(lab, keys, values, 0, np.float64))
    img = prop_to_image(lab, table, "value", chunks=(5, 7, 11), fill=np.nan)
    assert_same(img, paint_reference(lab, keys, values, np.nan, np.float64))
    # integer column: dtype kept when the fill fits, promoted when it does not
    img = prop_to_image(lab, table, "count", chunks=(5, 7, 11), fill=-1)
    assert img.dtype == np.int32
    assert_same(img, paint_reference(lab, keys, table["count"], -1, np.int32))
    img = prop_to_image(lab, table, "count", chunks=(5, 7, 11), fill=np.nan)
    assert img.dtype == np.float64
    assert_same(img, paint_reference(lab, keys, table["count"], np.nan, np.float64))
    img = prop_to_image(lab, table, "count", fill=0, dtype=np.uint8)
    assert_same(img, paint_reference(lab, keys, table["count"], 0, np.uint8))


def test_prop_to_image_analyzed_tables(case3d, case2d):
    for grey, lab, df in (case3d, case2d):
        partial = df.iloc[1::2]  # half of the particles
        for column in ("intensity_mean", "voxel_count", "touches_border", "roi_std"):
            img = prop_to_image(lab, partial, column, chunks=(7, 5, 9)[-lab.ndim:])
            want = paint_reference(lab, partial["label"], partial[column], 0, partial[column].dtype)
            assert_same(img, want)


def test_prop_to_image_signed_and_bool_labels():
    lab = random_labels((13, 21), [1, 3, 4, 70_000], seed=2, dtype=np.int32)
    lab[0, :3] = -3  # invalid ids are never painted
    table = pd.DataFrame({"label": np.array([3, 4, 70_000], np.int64), "v": [1.5, 2.5, 3.5]})
    want = paint_reference(np.where(lab < 0, 0, lab), table["label"], table["v"], 0, np.float64)
    assert_same(prop_to_image(lab, table, "v", chunks=(4, 6)), want)
    mask = lab > 0
    table = pd.DataFrame({"label": np.array([1], np.uint64), "v": [9.0]})
    assert_same(prop_to_image(mask, table, "v", chunks=5), np.where(mask, 9.0, 0.0))


def test_prop_to_image_to_zarr(case3d, tmp_path):
    grey, lab, df = case3d
    src = tmp_path / "labels.zarr"
    z = zarr.create_array(store=str(src), shape=lab.shape, dtype=lab.dtype, chunks=(8, 9, 10),
                          attributes={"spacing": list(SPACING3)})
    z[...] = lab
    table_path = tmp_path / "t.parquet"
    write_table(df, table_path)
    out = tmp_path / "mean.zarr"
    assert prop_to_image(str(src), table_path, "intensity_mean", out, chunks=(8, 9, 10), fill=np.nan) == out
    stored = zarr.open_array(str(out), mode="r")
    assert_same(stored[...], paint_reference(lab, df["label"], df["intensity_mean"], np.nan, np.float64))
    attrs = dict(stored.attrs)
    assert attrs["spacing"] == list(SPACING3)
    assert attrs["grapes_dask"]["column"] == "intensity_mean"
    assert attrs["grapes_dask"]["command"] == "prop_to_image"
    assert attrs["grapes_dask"]["analysis"]["layer_width"] == WIDTH3
    assert not [f for f in listing(tmp_path) if f.startswith(".")]
    before = listing(out)
    with pytest.raises(GrapesInputError, match="already exists"):
        prop_to_image(lab, df, "sphericity", out)
    assert listing(out) == before
    prop_to_image(lab, dd.from_pandas(df, npartitions=2), "sphericity", out, overwrite=True)
    assert_same(zarr.open_array(str(out), mode="r")[...],
                paint_reference(lab, df["label"], df["sphericity"], 0, np.float64))


def test_prop_to_image_errors(case3d):
    grey, lab, df = case3d
    with pytest.raises(GrapesInputError, match="list") as e:
        prop_to_image(lab, df, "radial_layers_graylevel")
    assert "intensity_mean" in str(e.value)
    with pytest.raises(GrapesInputError, match="no column 'nope'") as e:
        prop_to_image(lab, df, "nope")
    assert "intensity_mean" in str(e.value) and "sphericity" in str(e.value)
    with pytest.raises(GrapesInputError, match="integer ids"):
        prop_to_image(lab.astype(np.float32), df, "intensity_mean")
    dup = pd.concat([df.iloc[:3], df.iloc[:1]])
    with pytest.raises(GrapesInputError, match="more than once"):
        prop_to_image(lab, dup, "intensity_mean")
    with pytest.raises(GrapesInputError, match="no 'label' column"):
        prop_to_image(lab, df.drop(columns="label"), "intensity_mean")
    with pytest.raises(GrapesInputError, match="fill"):
        prop_to_image(lab, df, "voxel_count", fill=np.nan, dtype=np.int64)
    with pytest.raises(GrapesInputError, match="paints numbers"):
        prop_to_image(lab, df.assign(word="x"), "word")


# --------------------------------------------------------------------------------------------
# particle
# --------------------------------------------------------------------------------------------


def crop_of(row, pad, shape):
    nd = len(shape)
    lo = [max(0, int(row[f"bbox-{a}"]) - pad) for a in range(nd)]
    hi = [min(n, int(row[f"bbox-{a + nd}"]) + pad) for a, n in enumerate(shape)]
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def edge_layers_reference(lab, label, spacing, width, sl):
    """scipy EDT of the particle's whole-volume mask, zero-padded by one voxel (black border): the
    distance in the voxel size's unit, the layers from the distance in voxels of the finest axis
    (`width` such voxels per layer)."""
    mask = np.pad(lab == label, 1)
    inner = (slice(1, -1),) * lab.ndim
    d = ndi.distance_transform_edt(mask, sampling=spacing)[inner][sl]
    d_fine = ndi.distance_transform_edt(mask, sampling=[s / min(spacing) for s in spacing])[inner][sl]
    inside = (lab == label)[sl]
    layers = np.where(inside, np.maximum(1, np.rint(d_fine / width)), 0).astype(np.int64)
    return np.where(inside, d, 0.0), layers


@pytest.mark.parametrize("pad", [0, 1, 3])
def test_particle_3d(case3d, pad):
    grey, lab, df = case3d
    touching = 0
    for _, row in df.iterrows():
        label = int(row["label"])
        p = particle(grey, lab, df, label, pad=pad)
        sl = crop_of(row, pad, lab.shape)
        assert p.slices == sl and p.origin == tuple(s.start for s in sl)
        assert p.label == label and p.row["label"] == row["label"]
        assert_same(p.labels, lab[sl])
        assert_same(p.grey, grey[sl])
        assert_same(p.mask, lab[sl] == row["label"])
        d, layers = edge_layers_reference(lab, row["label"], SPACING3, WIDTH3, sl)
        assert_same(p.layers, layers)
        np.testing.assert_allclose(p.distance, d, rtol=1e-12, atol=0)
        # the table was analysed with the same spacing and layer width: same layer counts
        counts = np.bincount(p.layers[p.mask], minlength=len(row["radial_layers_count"]) + 1)[1:]
        np.testing.assert_array_equal(counts, row["radial_layers_count"])
        touching += bool(row["touches_border"])
    assert touching  # clipping at the volume border was exercised


def test_particle_2d_and_parameters(case2d):
    grey, lab, df = case2d
    for _, row in df.iterrows():
        p = particle(grey, lab, df, row["label"], spacing=(0.6, 1.1), layer_width=0.5)
        sl = crop_of(row, 1, lab.shape)
        assert_same(p.grey, grey[sl])
        d, layers = edge_layers_reference(lab, row["label"], (0.6, 1.1), 0.5, sl)
        assert_same(p.layers, layers)
        assert p.spacing == (0.6, 1.1) and p.layer_width == 0.5
    # black_border=False: the volume's sides are not boundaries (scipy on the unpadded mask)
    touching = df[df["touches_border"]]
    assert len(touching)
    for _, row in touching.iterrows():
        p = particle(grey, lab, df, row["label"], black_border=False)
        sl = crop_of(row, 1, lab.shape)
        d = ndi.distance_transform_edt(lab == row["label"])[sl]
        inside = (lab == row["label"])[sl]
        assert_same(p.layers, np.where(inside, np.maximum(1, np.rint(d)), 0).astype(np.int64))
    p = particle(None, lab, df, df["label"].iloc[0])  # the table's own parameters
    assert p.grey is None and p.spacing == (1.0, 1.0) and p.layer_width == 1.0 and p.start_at == "edge"


def test_particle_center_layers(case2d):
    grey, lab, _ = case2d
    df = grapes_dask.analyze(grey, lab, chunks=16, start_at="center", layer_width=1.5)
    for _, row in df.iterrows():
        p = particle(grey, lab, df, row["label"])
        assert p.start_at == "center"
        sl = crop_of(row, 1, lab.shape)
        yy, xx = np.indices(lab.shape)
        c = np.hypot(yy - row["centroid-0"], xx - row["centroid-1"])[sl]
        inside = (lab == row["label"])[sl]
        assert_same(p.layers, np.where(inside, 1 + np.rint(c / 1.5), 0).astype(np.int64))
        counts = np.bincount(p.layers[p.mask], minlength=len(row["radial_layers_count"]) + 1)[1:]
        np.testing.assert_array_equal(counts, row["radial_layers_count"])


class Recorder:
    """Array-like that records every region read from it."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.ndim = a, a.shape, a.dtype, a.ndim
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.a[key]


def test_particle_reads_only_its_box(case3d):
    grey, lab, df = case3d
    row = df.iloc[int(np.argmin(df["voxel_count"]))]
    rg, rl = Recorder(grey), Recorder(lab)
    g = da.from_array(rg, chunks=8, asarray=False, lock=False, fancy=False)
    lab_d = da.from_array(rl, chunks=8, asarray=False, lock=False, fancy=False)
    p = particle(g, lab_d, df, row["label"])
    sl = crop_of(row, 1, lab.shape)
    assert_same(p.mask, lab[sl] == row["label"])
    for rec in (rg, rl):
        assert rec.reads
        read = 0
        for key in rec.reads:
            if any(k.start == k.stop for k in key):  # dask's empty probe for the meta
                continue
            box = [range(*k.indices(n)) for k, n in zip(key, lab.shape)]
            read += np.prod([len(b) for b in box])
            # every read overlaps the crop
            assert all(b.start < s.stop and s.start < b.stop for b, s in zip(box, sl)), key
        assert read < lab.size


def test_particle_errors(case3d, tmp_path):
    grey, lab, df = case3d
    with pytest.raises(GrapesInputError, match="not in the table"):
        particle(grey, lab, df, 12345)
    with pytest.raises(GrapesInputError, match="label="):
        particle(grey, lab, df, -1)
    with pytest.raises(GrapesInputError, match="label="):
        particle(grey, lab, df, 1.5)
    with pytest.raises(GrapesInputError, match="same shape|one shape"):
        particle(grey[:-1], lab, df, df["label"].iloc[0])
    with pytest.raises(GrapesInputError, match="bbox"):
        particle(grey, lab, df.drop(columns="bbox-5"), df["label"].iloc[0])
    with pytest.raises(GrapesInputError, match="pad"):
        particle(grey, lab, df, df["label"].iloc[0], pad=-1)
    # a table read from a file and a dask table work the same
    path = tmp_path / "t.csv"
    write_table(df, path)
    label = df["label"].iloc[4]
    a = particle(grey, lab, path, label)
    b = particle(grey, lab, dd.from_pandas(df, npartitions=2), label)
    assert_same(a.layers, b.layers)
    assert a.origin == b.origin
