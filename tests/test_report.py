"""Tests of ``grapes_dask.report``: self-contained HTML reports.

The HTML is parsed with the standard library's ``html.parser``: every image is an embedded
PNG (its base64 decodes to a PNG signature and a header of the expected size), the section
headings are there, nothing refers to anything outside the file, text is escaped. The operando
report is built from a fake tracking object with the contract's methods returning hand-made
frames.
"""

from __future__ import annotations

import base64
import math
import struct
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from grapes_dask import GrapesInputError
from grapes_dask.report import Captioned, Section, render_report, tables_report, tracking_report, write_report
from grapes_dask.track import ChangeMap, Fraction

PNG = b"\x89PNG\r\n\x1a\n"
STATES = ["pristine", "4.0 V", "4.4 V", "2.5 V"]


class Page(HTMLParser):
    """Tags, headings, image sources, links and text of an HTML page."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tags, self.imgs, self.refs, self.headings, self.text = [], [], [], [], []
        self.cells = []
        self._heading = None
        self._cell = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(attrs)
        for key in ("src", "href", "action", "data", "poster", "srcset"):
            if key in attrs:
                self.refs.append(attrs[key])
        if tag in ("h1", "h2"):
            self._heading = [tag, ""]
        if tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("h1", "h2") and self._heading:
            self.headings.append(tuple(self._heading))
            self._heading = None
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._heading:
            self._heading[1] += data
        if self._cell is not None:
            self._cell += data


def png_size(data: bytes):
    assert data[:8] == PNG
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_self_contained(page: Page) -> list:
    """Every image an embedded PNG, no reference outside the page; returns the PNGs' sizes."""
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    for ref in page.refs:
        assert ref.startswith("#") or ref.startswith("data:image/png;base64,"), ref
    sizes = []
    for img in page.imgs:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        sizes.append(png_size(base64.b64decode(src.split(",", 1)[1], validate=True)))
        assert img.get("alt")
    return sizes


def h2(page):
    return [t for tag, t in page.headings if tag == "h2"]


def small_figure(w=3, h=2):
    fig = Figure(figsize=(w, h))
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


# --------------------------------------------------------------------------------------------
# write_report
# --------------------------------------------------------------------------------------------


def test_write_report_items(tmp_path):
    table = pd.DataFrame({"state": ["a<b", "c&d"], "mean": [1.23456789, np.nan]})
    sections = [
        Section("Figures & tables", (small_figure(), Captioned(small_figure(4, 2), "caption <i>x</i>"),
                                     "a paragraph with <script>alert(1)</script>", table)),
        ("Parameters", {"noise_sigma": {"pristine": 2.5, "4.0 V": 2.6}, "spacing": (1.0, 0.5, 0.5),
                        "html": "<b>bold</b>"}),
        ("Single item", small_figure()),
    ]
    path = write_report(tmp_path / "r.html", title="Report <1>", sections=sections, provenance={"run": "test"},
                        dpi=50)
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    sizes = check_self_contained(page)
    assert sizes == [(150, 100), (200, 100), (150, 100)]  # inches x dpi
    assert ("h1", "Report <1>") in page.headings
    assert h2(page) == ["Figures & tables", "Parameters", "Single item", "Provenance"]
    body = "".join(page.text)
    assert "a paragraph with <script>alert(1)</script>" in body  # shown as text, not run
    assert "caption <i>x</i>" in body and "i" not in page.tags
    assert "b" not in page.tags
    assert {"a<b", "c&d", "1.2346"} <= set(page.cells)
    assert {"noise_sigma.pristine", "2.5", "noise_sigma.4.0 V", "2.6", "spacing", "1, 0.5, 0.5", "html",
            "<b>bold</b>", "run", "test", "grapes_dask"} <= set(page.cells)
    # the table of contents links to every section, inside the page
    assert sorted(r for r in page.refs if r.startswith("#")) == sorted(
        "#" + a for a in ["figures-tables", "parameters", "single-item", "provenance"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_write_report_refuses_and_leaves_nothing(tmp_path):
    path = tmp_path / "r.html"
    with pytest.raises(GrapesInputError, match="report item"):
        write_report(path, title="t", sections=[("s", (object(),))])
    assert not path.exists() and not list(tmp_path.iterdir())
    write_report(path, title="first", sections=[])
    with pytest.raises(GrapesInputError, match="already exists"):
        write_report(path, title="second", sections=[])
    assert "first" in path.read_text()
    write_report(path, title="second", sections=[], overwrite=True)
    assert "<h1>second</h1>" in path.read_text()
    with pytest.raises(GrapesInputError, match="folder"):
        write_report(tmp_path / "missing" / "r.html", title="t", sections=[])
    with pytest.raises(GrapesInputError, match="Section"):
        render_report(title="t", sections=["just a string"])


# --------------------------------------------------------------------------------------------
# tracking_report with a fake tracking
# --------------------------------------------------------------------------------------------



class FakeTracking:
    """The contract's attributes and methods, returning hand-made frames."""

    def __init__(self, states=STATES, fail_quantiles=False, fail_map=None):
        self.states = list(states)
        self.reference = self.states[0]
        self.fail_quantiles = fail_quantiles
        self.fail_map = fail_map
        self.map_calls = []
        labels = np.array([3, 5, 8, 13, 21, 34], np.uint64)
        volume = np.array([500.0, 900.0, 300.0, 1200.0, 800.0, 100.0])  # 13 largest but excluded
        excluded = np.array([False, False, False, True, False, False])
        reason = np.where(excluded, "border", "")
        rows = []
        for k, s in enumerate(self.states):
            for lab, v, e, r in zip(labels, volume, excluded, reason):
                rows.append({"label": lab, "state": s, "roi_mean": 170.0 - k - 0.001 * v, "roi_voxels": int(v / 2),
                             "roi_sem": 0.1, "delta": -float(k), "delta_sem": 0.0 if k == 0 else 0.14,
                             "volume": v, "centroid-0": 10.0, "centroid-1": 20.0, "centroid-2": v / 10,
                             "excluded": e, "reason": r})
        self.particles = pd.DataFrame(rows)
        self.particles["state"] = pd.Categorical(self.particles["state"], categories=self.states, ordered=True)
        # per-state tables: 12 particles (the 6 above and 6 more), profiles of 6 layers, a bright rim in
        # every other one (the paper's normalisation is then undefined), darker cores in later states
        rng = np.random.default_rng(7)
        self.tables = {}
        all_labels = np.r_[labels, np.arange(100, 106, dtype=np.uint64)]
        for k, s in enumerate(self.states):
            prof = [np.array([140.0 + 20 * (i % 2), 150, 150, 150 - k, 150 - 2 * k, 150 - 3 * k])
                    + rng.normal(0, 0.5, 6) for i in range(len(all_labels))]
            t = pd.DataFrame({"label": all_labels, "radial_layers_graylevel": prof,
                              "roi_mean": [float(np.mean(p[5:])) for p in prof]})
            t.attrs["grapes_dask"] = {"start_at": "edge", "exclude_outer_layers": 5}
            self.tables[s] = t
        self.params = {"noise_sigma": {s: 2.5 for s in self.states}, "noise_source": "background",
                       "exclude_outer_layers": 5, "drop_smallest": 0.25, "neighbour_gap": 1,
                       "spacing": (1.0, 1.0, 1.0), "note": "<script>x</script>"}

    def summary(self):
        n = len(self.states)
        mean = 174.41 - np.arange(n) * 1.41
        sd = np.full(n, 11.1)
        ses = sd / math.sqrt(3650)
        d = mean - mean[0]
        return pd.DataFrame({"n": 3650, "mean": mean, "sd": sd, "sem": 0.05, "ses": ses,
                             "se_tot": np.sqrt(ses ** 2 + 0.05 ** 2), "delta_mean": d,
                             "delta_sd": np.r_[0, np.full(n - 1, 2.0)], "delta_sem": np.r_[0, np.full(n - 1, 0.07)],
                             "delta_ses": np.r_[0, np.full(n - 1, 0.033)],
                             "delta_se_tot": np.r_[0, np.full(n - 1, math.hypot(0.07, 0.033))]},
                            index=pd.Index(self.states, name="state"))

    def z_tests(self, alternative="less", sigma=5.0, against="both"):
        pairs = [("reference", self.reference, s) for s in self.states[1:]]
        pairs += [("previous", a, b) for a, b in zip(self.states[:-1], self.states[1:])]
        return pd.DataFrame({"against": [k for k, _, _ in pairs], "state_a": [a for _, a, _ in pairs],
                             "state_b": [b for _, _, b in pairs], "n_a": 3650, "n_b": 3650, "mean_a": 174.41,
                             "mean_b": 173.0, "z": -5.39, "p": 3.5e-8, "critical": -sigma, "reject": True,
                             "sigma": sigma, "testable": True})

    def counts(self):
        return pd.DataFrame({"reason": ["inconsistent", "neighbour", "border", "empty_roi", "smallest", "kept"],
                             "n": [0, 0, 1, 0, 1, 4]})

    def by_quantile(self, column="centroid-2", q=4, state=None):
        if self.fail_quantiles:
            raise GrapesInputError("too few particles for {q} groups", q=q)
        rows = [{"group": g, "lo": g * 10.0, "hi": g * 10.0 + 5, "state": s, "n": 1, "delta_mean": -g * (k + 1.0),
                 "delta_sd": 1.0, "delta_sem": 0.1, "delta_ses": 0.2, "delta_se_tot": 0.22, "mean": 170.0,
                 "se_tot": 0.5} for k, s in enumerate(self.states[1:]) for g in range(1, q + 1)]
        return pd.DataFrame(rows)

    def fraction(self, state_a, state_b):
        return Fraction(state_a, state_b, 4, 3, 0.75, math.sqrt(0.75 * 0.25 / 4))

    def change_map(self, label, state, *, margin=4, sigma=1.0, exclude_outer_layers=None, upsample=10):
        self.map_calls.append((label, state))
        if label == self.fail_map:
            raise GrapesInputError("the volumes of {state} are not available", state=state)
        shape = (8, 10, 9)
        z, y, x = np.indices(shape)
        mask = (z - 3.5) ** 2 + (y - 4.5) ** 2 + (x - 4) ** 2 <= 9
        delta = np.where(mask, -float(self.states.index(state)) * 3, np.nan).astype(np.float32)
        return ChangeMap(label, state, self.reference, delta, mask, (0.1, 0.0, -0.2), (1, 2, 3), (1.0, 1.0, 1.0))


TRACKING_HEADINGS = ["Summary per state", "z-tests against the reference and between consecutive states", "Cleaning",
                     "Change by x position quantile (centroid-2)", "Conditions", "Radial profiles of the kept particles",
                     "Change maps of the largest kept particles", "Parameters"]
KEPT_PROFILES = {"fig6_kept_profiles", "fig6_kept_profiles_paper", "fig6_kept_profiles_normalised"}


def test_tracking_report(tmp_path):
    tr = FakeTracking()
    out = tmp_path / "op"
    res = tracking_report(tr, out, n_maps=2, dpi=40)
    assert res.report == out / "report.html" and res.summary == out / "summary.csv"
    # the two largest kept particles (13 is larger but excluded), every non-reference state
    assert tr.map_calls == [(5, s) for s in STATES[1:]] + [(21, s) for s in STATES[1:]]
    want = {"fig7a_state_means", "fig7b_state_deltas", "fig12_normal_models", "fig8_by_quantile", "fig9_fractions",
            "fig9a_reference_vs_most_changed", "fig10_change_map_5", "fig10_change_map_21"} | KEPT_PROFILES
    assert set(res.figures) == want and res.notes == ()
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(f"{n}.png" for n in want)
    for p in res.figures.values():
        assert p.read_bytes()[:8] == PNG
    back = pd.read_csv(res.summary, index_col="state")
    pd.testing.assert_frame_equal(back, tr.summary(), check_dtype=False)
    page = Page(res.report.read_text(encoding="utf-8"))
    assert len(check_self_contained(page)) == len(want)
    assert h2(page) == TRACKING_HEADINGS + ["Provenance"]
    cells = set(page.cells)
    assert {"inconsistent", "border", "kept", "-5.39", "exclude_outer_layers", "noise_sigma.4.4 V",
            "<script>x</script>", "grapes_dask.report.tracking_report"} <= cells
    assert "script" not in page.tags
    body = "".join(page.text)
    assert "4 of 6 particles kept" not in body and "5 of 6 particles kept" in body
    # fig. 9a: the reference against the state of largest mean decrease (the last one here: delta -1.41 k)
    most = STATES[int(np.argmin(tr.summary()["delta_mean"].to_numpy()))]
    assert most == STATES[-1] and f"darker at {most} (the state with the largest mean decrease" in body
    # the radial profiles are those of the 5 kept particles of each state's table, not the 12 of the table
    assert "The 5 kept particles in each state" in body
    assert "against = reference" in body and "-5.39" in cells
    # kept labels 3, 5, 8, 21, 34 are rows 0, 1, 2, 4, 5: rows 1 and 5 have the bright rim -> 2 of 5 undefined
    assert "pristine: 2 of 5" in body
    # outputs exist: refused before anything is drawn, replaced with overwrite
    tr2 = FakeTracking()
    with pytest.raises(GrapesInputError, match="already exists"):
        tracking_report(tr2, out)
    assert tr2.map_calls == []
    res2 = tracking_report(tr2, out, overwrite=True, n_maps=0, dpi=30)
    assert not any(n.startswith("fig10") for n in res2.figures)
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(f"{n}.png" for n in res2.figures)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_tracking_report_paper_normalisation_undefined_everywhere(tmp_path):
    tr = FakeTracking(states=STATES[:2])
    for t in tr.tables.values():  # a bright rim in every particle
        t["radial_layers_graylevel"] = [np.r_[200.0, p[1:]] for p in t["radial_layers_graylevel"]]
    res = tracking_report(tr, tmp_path, n_maps=0, dpi=30)
    assert "fig6_kept_profiles_paper" not in res.figures
    assert {"fig6_kept_profiles", "fig6_kept_profiles_normalised"} <= set(res.figures)
    assert any("paper's normalisation" in n and "undefined for every particle" in n and "pristine: 5 of 5" in n
               for n in res.notes)


def test_tracking_report_notes_when_something_cannot_be_drawn(tmp_path):
    tr = FakeTracking(states=STATES[:2], fail_quantiles=True, fail_map=5)
    res = tracking_report(tr, tmp_path, n_maps=2, dpi=30)
    assert "fig8_by_quantile" not in res.figures and "fig10_change_map_5" not in res.figures
    assert "fig10_change_map_21" in res.figures
    assert any("Figure 8" in n and "too few particles" in n for n in res.notes)
    assert any("particle 5" in n and "not available" in n for n in res.notes)
    page = Page(res.report.read_text(encoding="utf-8"))
    check_self_contained(page)
    assert h2(page) == TRACKING_HEADINGS + ["Notes", "Provenance"]
    with pytest.raises(GrapesInputError, match="track"):
        tracking_report(object(), tmp_path / "x")


# --------------------------------------------------------------------------------------------
# tables_report
# --------------------------------------------------------------------------------------------


def particle_table(rng, n, dark=0.0, border_every=7):
    profiles = [list(150 - dark * np.linspace(0, 1, 6) + rng.normal(0, 1, 6)) for _ in range(n)]
    t = pd.DataFrame({"label": np.arange(1, n + 1, dtype=np.uint64), "volume": rng.uniform(100, 2000, n),
                      "touches_border": np.arange(n) % border_every == 0,
                      "radial_layers_graylevel": profiles, "roi_mean": rng.normal(150 - dark, 4, n),
                      "equivalent_diameter_volume": rng.normal(12, 2, n), "sphericity": rng.uniform(0.7, 1, n)})
    t.attrs["grapes_dask"] = {"layer_width": 1.0, "start_at": "edge", "exclude_outer_layers": 2}
    return t


def _check_paper_normalisation(figures, tables):
    """The paper-normalised figure's first curve against the radial_max normalisation computed here:
    (g - g[1]) / max(g - g[1]) per particle, NaN when that maximum is <= 0, then the mean per layer over
    the largest volume quarter (rank rule, ties by label) of the particles not touching the border."""
    import matplotlib.image as mpimg

    assert mpimg.imread(figures["fig6_largest_group_profiles_paper"]).shape[2] in (3, 4)
    name, t = next(iter(tables.items()))
    u = t[~t["touches_border"].astype(bool)]
    n = len(u)
    order = sorted(range(n), key=lambda i: (u["volume"].iloc[i], u["label"].iloc[i]))
    top = [order[r] for r in range(3 * n // 4, n)]
    rows = []
    for i in top:
        g = np.asarray(u["radial_layers_graylevel"].iloc[i], float)
        d = g - g[0]
        rows.append(d / d.max() if d.max() > 0 else np.full(len(g), np.nan))
    mat = np.array(rows)
    return name, np.nanmean(mat, axis=0)


def test_tables_report_paper_normalisation_curve(tmp_path):
    from grapes_dask import plotting as P

    rng = np.random.default_rng(4)
    tables = {"pristine": particle_table(rng, 70)}
    seen = []
    real = P.plot_radial_profiles

    def spy(tabs, column="radial_layers_graylevelnormed", **kw):
        fig = real(tabs, column=column, **kw)
        if "paper" in (kw.get("title") or ""):
            seen.append(fig)
        return fig

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "plot_radial_profiles", spy)
        res = tables_report(tables, tmp_path, dpi=30, min_particles=1)
    assert len(seen) == 1
    name, expected = _check_paper_normalisation(res.figures, tables)
    (cont,) = [c for c in seen[0].axes[0].containers]
    x, y = cont.lines[0].get_data()
    np.testing.assert_allclose(y, expected[np.asarray(x, int) - 1], rtol=1e-12)
    assert y[0] == 0.0  # the surface layer is 0 in the paper's normalisation


def test_tables_report_two_states_with_labels(tmp_path):
    rng = np.random.default_rng(4)
    tables = {"pristine": particle_table(rng, 70), "charged 4.4 V": particle_table(rng, 60, dark=15)}
    lab = np.zeros((5, 20, 20), np.uint32)
    lab[:, 2:8, 2:9] = 1
    lab[:, 10:18, 5:15] = 2
    res = tables_report(tables, tmp_path, labels={"charged 4.4 V": lab}, dpi=30)
    assert set(res.figures) == {"fig6_largest_group_profiles", "fig6_largest_group_profiles_normalised",
                                "fig6_largest_group_profiles_paper", "profiles_by_volume_1", "profiles_by_volume_2",
                                "distributions", "property_map_1"}
    page = Page(res.report.read_text(encoding="utf-8"))
    assert len(check_self_contained(page)) == 7
    _check_paper_normalisation(res.figures, tables)
    assert h2(page) == ["Summary", "Radial profiles by volume group", "Distributions", "roi_mean on a slice",
                        "Parameters", "Provenance"]
    summary = pd.read_csv(res.summary, index_col="table")
    for name, t in tables.items():
        border = sum(bool(b) for b in t["touches_border"])
        assert summary.loc[name, "particles"] == len(t)
        assert summary.loc[name, "touching the border"] == border
        assert summary.loc[name, "used"] == len(t) - border
        used = [v for v, b in zip(t["roi_mean"], t["touches_border"]) if not b]
        m = sum(used) / len(used)
        assert summary.loc[name, "roi_mean mean"] == pytest.approx(m)
        sd = math.sqrt(sum((v - m) ** 2 for v in used) / (len(used) - 1))
        assert summary.loc[name, "roi_mean sd"] == pytest.approx(sd)
        assert summary.loc[name, "roi_mean ses"] == pytest.approx(sd / math.sqrt(len(used)))
    assert {"pristine.start_at", "charged 4.4 V.exclude_outer_layers"} <= set(page.cells)


def test_tables_report_single_table_and_small(tmp_path):
    rng = np.random.default_rng(6)
    t = particle_table(rng, 40)
    res = tables_report(t, tmp_path / "one", dpi=30)  # a DataFrame alone, no labels: no map
    assert set(res.figures) == {"fig6_largest_group_profiles", "fig6_largest_group_profiles_normalised",
                                "fig6_largest_group_profiles_paper", "profiles_by_volume_1", "distributions"}
    page = Page(res.report.read_text(encoding="utf-8"))
    check_self_contained(page)
    assert "roi_mean on a slice" not in h2(page)
    tiny = {"big": t, "tiny": particle_table(rng, 3, border_every=100)}
    res = tables_report(tiny, tmp_path / "two", q=4, dpi=30)
    assert any("'tiny'" in n and "fewer than 4 groups" in n for n in res.notes)
    assert "Notes" in h2(Page(res.report.read_text(encoding="utf-8")))
    with pytest.raises(GrapesInputError, match="empty"):
        tables_report({}, tmp_path / "three")
    with pytest.raises(GrapesInputError, match="labels"):
        tables_report(tiny, tmp_path / "four", labels=np.zeros((3, 3), np.uint8))
    with pytest.raises(GrapesInputError, match="volume"):
        tables_report({"x": t.drop(columns="volume")}, tmp_path / "five")
    assert not (tmp_path / "five" / "report.html").exists()
