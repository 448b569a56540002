"""Self-contained HTML reports: figures, tables, parameters and provenance in one file.

1. :func:`write_report` builds one HTML file from sections of figures (embedded as base64
   PNG), tables (escaped HTML), text and parameter dicts, and adds a provenance section. The
   file needs nothing else: no external link, script, style sheet or font.
2. :func:`tracking_report` writes, for an operando tracking (``grapes_dask.track``), the
   figures as PNG files, ``summary.csv`` and ``report.html``: the summary per state (fig. 7;
   7b with the error of the mean change beside the paper's SE_tot bars), the z-tests against
   the reference and between consecutive states (fig. 12), the cleaning counts by reason, the
   change by position quantile (fig. 8), the condition pies (fig. 9a: the reference against the
   state of largest mean decrease; fig. 9: consecutive states), the radial profiles of the kept
   particles per state (fig. 6, three normalisations), change maps of the largest kept
   particles (fig. 10) and the parameters. :func:`statistics_lines` gives the statistics as the
   text that ``grapes-dask operando`` and the demo print.
3. :func:`tables_report` does the same for particle tables already computed (one or more
   states): radial profiles by volume quartile (fig. 6: grey levels, the paper's
   normalisation, and divided by each particle's ROI mean), size and grey-level distributions,
   and a property painted on a slice when label volumes are given.

Every output is written atomically (:func:`grapes_dask.io.atomic_output`), and all of them
are checked before anything is computed: an existing output raises unless ``overwrite=True``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io as _io
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._errors import GrapesInputError
from .units import describe_column

__all__ = ["Section", "Captioned", "ReportFiles", "write_report", "render_report", "tracking_report",
           "tables_report", "write_tracking", "file_name", "statistics_lines", "most_changed_state"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: .15em; margin-top: 2em; }
nav ol { columns: 2; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #555; }
.table-wrap { overflow-x: auto; margin: .8em 0; }
table { border-collapse: collapse; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .2em .5em; text-align: right; }
th { background: #f0f0f0; }
td.key, th.key { text-align: left; }
p.note { color: #8a5a00; }
footer { margin-top: 3em; font-size: .8em; color: #777; }
"""


@dataclass(frozen=True)
class Captioned:
    """A report item with a caption under it (a figure or a table)."""

    item: object
    caption: str = ""


@dataclass(frozen=True)
class Section:
    """One section of a report.

    Attributes
    ----------
    title : str
        Heading (``<h2>``).
    items : tuple
        In order: matplotlib Figures (embedded as PNG), pandas DataFrames (HTML tables),
        dicts (two-column parameter tables, nested keys joined with "."), str (a paragraph),
        :class:`Captioned` (any of these with a caption).
    """

    title: str
    items: tuple = ()


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`tracking_report` and :func:`tables_report`.

    Attributes
    ----------
    report : pathlib.Path
        The HTML report.
    summary : pathlib.Path
        The summary table (csv).
    figures : dict of str -> pathlib.Path
        Figure name -> PNG file (in the ``figures`` folder).
    notes : tuple of str
        Figures that could not be drawn, and why.
    """

    report: Path
    summary: Path
    figures: dict = field(default_factory=dict)
    notes: tuple = ()


# --------------------------------------------------------------------------------------------
# 1. HTML
# --------------------------------------------------------------------------------------------


def _png_bytes(fig, dpi: int) -> bytes:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _flatten(params, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, name + "."))
        else:
            out.append((name, value))
    return out


def _fmt_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_value(v) for v in value) if value else "(none)"
    if isinstance(value, np.ndarray):
        return _fmt_value(value.tolist())
    if value is None:
        return "None"
    return str(value)


def _fmt_float(v) -> str:
    return f"{v:.5g}"


def _html_item(item, dpi: int) -> str:
    caption = ""
    if isinstance(item, Captioned):
        item, caption = item.item, item.caption
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    if hasattr(item, "savefig"):
        data = base64.b64encode(_png_bytes(item, dpi)).decode("ascii")
        alt = html.escape(caption or "figure", quote=True)
        return f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">{cap}</figure>'
    if hasattr(item, "to_html"):
        table = item.to_html(escape=True, float_format=_fmt_float, na_rep="", max_rows=500, border=0)
        return f'<figure><div class="table-wrap">{table}</div>{cap}</figure>'
    if isinstance(item, dict):
        rows = "".join(f'<tr><td class="key">{html.escape(str(k))}</td><td class="key">'
                       f"{html.escape(_fmt_value(v))}</td></tr>" for k, v in _flatten(item))
        table = (f'<table><thead><tr><th class="key">parameter</th><th class="key">value</th></tr></thead>'
                 f"<tbody>{rows}</tbody></table>")
        return f'<figure><div class="table-wrap">{table}</div>{cap}</figure>'
    if isinstance(item, str):
        return f"<p>{html.escape(item)}</p>"
    raise GrapesInputError(f"report item of type {type(item).__name__}: give a matplotlib Figure, a pandas "
                           f"DataFrame, a dict or a str")


def _anchor(title: str, used: set) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
    name, k = base, 2
    while name in used:
        name, k = f"{base}-{k}", k + 1
    used.add(name)
    return name


def _provenance(extra: dict | None) -> dict:
    import matplotlib
    import pandas

    from . import __version__

    out = {
        "grapes_dask": __version__,
        "written (UTC)": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "pandas": pandas.__version__,
        "matplotlib": matplotlib.__version__,
    }
    out.update(extra or {})
    return out


def _as_section(s) -> Section:
    if isinstance(s, Section):
        return s
    if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str):
        items = s[1]
        items = (items,) if not isinstance(items, (list, tuple)) else tuple(items)
        return Section(s[0], items)
    raise GrapesInputError(f"sections: give Section objects or (title, items) pairs, not {type(s).__name__}")


def render_report(*, title: str, sections, provenance: dict | None = None, dpi: int = 110) -> str:
    """The HTML text of a report (see :func:`write_report`)."""
    sections = [_as_section(s) for s in sections]
    sections.append(Section("Provenance", (_provenance(provenance),)))
    used: set = set()
    anchors = [_anchor(s.title, used) for s in sections]
    toc = "".join(f'<li><a href="#{a}">{html.escape(s.title)}</a></li>' for a, s in zip(anchors, sections))
    body = []
    for a, s in zip(anchors, sections):
        body.append(f'<section><h2 id="{a}">{html.escape(s.title)}</h2>')
        body.extend(_html_item(item, dpi) for item in s.items)
        body.append("</section>")
    t = html.escape(title)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{t}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{t}</h1>\n<nav><ol>{toc}</ol></nav>\n"
            + "\n".join(body)
            + "\n<footer>written by grapes_dask; figures are embedded, the file needs nothing else.</footer>\n"
              "</body>\n</html>\n")


def write_report(path, *, title: str, sections, provenance: dict | None = None, overwrite: bool = False,
                 dpi: int = 110) -> Path:
    """Write a self-contained HTML report (figures, tables, text, parameters) atomically.

    Parameters
    ----------
    path : path
        The ``.html`` file to write; its folder must exist.
    title : str
        Title (``<title>`` and ``<h1>``).
    sections : sequence of Section or (title, items) pairs
        The report's sections, in order (see :class:`Section` for the items).
    provenance : dict, optional
        Extra entries of the closing "Provenance" section (which always lists the grapes_dask,
        Python, numpy, pandas and matplotlib versions, the platform and the date).
    overwrite : bool
        Replace an existing `path`.
    dpi : int
        Resolution of the embedded PNGs, dots per inch.

    Returns
    -------
    pathlib.Path
        `path`.

    Raises
    ------
    GrapesInputError
        `path` exists (and not `overwrite`), its folder is missing, or an item has an
        unsupported type; nothing is written then.
    """
    from .io import _check_can_write, atomic_output

    path = Path(path)
    _check_can_write(path, overwrite)
    text = render_report(title=title, sections=sections, provenance=provenance, dpi=dpi)
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# shared by the two reports
# --------------------------------------------------------------------------------------------


class _Collector:
    """Figures drawn for a report: name -> Figure, and notes on those that could not be drawn."""

    def __init__(self):
        self.figures: dict = {}
        self.notes: list = []

    def draw(self, name: str, what: str, fn, *args, **kw):
        """The figure of ``fn(*args, **kw)`` (kept under `name`), or a note when the input does
        not allow it (:class:`GrapesInputError`, NotImplementedError)."""
        try:
            fig = fn(*args, **kw)
        except (GrapesInputError, NotImplementedError) as err:
            note = f"{what} not drawn: {err}"
            self.notes.append(note)
            return note
        self.figures[name] = fig
        return fig

    def item(self, name: str, what: str, fn, *args, caption: str = "", **kw):
        fig = self.draw(name, what, fn, *args, **kw)
        return fig if isinstance(fig, str) else Captioned(fig, caption)


def _prepare_out(out_dir, overwrite: bool):
    from .io import _check_can_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dests = {"report": out / "report.html", "summary": out / "summary.csv", "figures": out / "figures"}
    for p in dests.values():
        _check_can_write(p, overwrite)
    return dests


def _write_outputs(dests, figures: dict, summary, *, title, sections, provenance, overwrite, dpi, notes):
    from .io import atomic_output

    paths = {}
    with atomic_output(dests["figures"], overwrite=overwrite) as tmp:
        tmp.mkdir()
        for name, fig in figures.items():
            fig.savefig(tmp / f"{name}.png", format="png", dpi=dpi)
            paths[name] = dests["figures"] / f"{name}.png"
    with atomic_output(dests["summary"], overwrite=overwrite) as tmp:
        summary.to_csv(tmp)
    write_report(dests["report"], title=title, sections=sections, provenance=provenance, overwrite=overwrite,
                 dpi=dpi)
    return ReportFiles(report=dests["report"], summary=dests["summary"], figures=paths, notes=tuple(notes))


# --------------------------------------------------------------------------------------------
# 2. operando tracking
# --------------------------------------------------------------------------------------------


def most_changed_state(summary, reference) -> str | None:
    """The state with the largest mean decrease against the reference (the most negative
    ``delta_mean`` of ``Tracking.summary()``; the paper's "most charged" state of fig. 9a), or
    None when no other state has a finite change."""
    import numpy as _np

    d = summary["delta_mean"].astype(float)
    d = d[[str(i) != str(reference) for i in d.index]]
    d = d[_np.isfinite(d.to_numpy())]
    return None if d.empty else str(d.idxmin())


def statistics_lines(tracking, *, n_se: float = 3.0, sigma: float = 5.0, extra: dict | None = None,
                     noise_note: str = "") -> list:
    """The statistics of an operando tracking as lines of text (``grapes-dask operando`` and the
    demo print them).

    Parameters
    ----------
    tracking : Tracking
        The result of :func:`grapes_dask.track.track`.
    n_se : float
        Every "+-" is n_se standard errors (the paper: 3).
    sigma : float
        Significance level of the z-tests (eq. 6), standard deviations of the normal distribution.
    extra : dict of str -> str, optional
        Text appended to a state's line (the demo: the injected damage).
    noise_note : str
        Text appended to the noise line.

    Returns
    -------
    list of str
        Per state the population mean of the kept particles' ROI grey level +- n_se SE_tot
        (eq. 5) and its change against the reference +- n_se SE_tot, with the error of the mean
        change (+- n_se SES of the changes, eq. 4) in brackets; a line on why the two errors
        differ; the z-tests against the reference and between consecutive states (a test with
        fewer than 2 particles says "not testable"); the cleaning counts; the noise of each
        state. Grey levels.
    """
    import numpy as _np

    summ = tracking.summary()
    extra = extra or {}
    lines = [f"statistics over the kept particles (grey levels; +- is {n_se:g} SE_tot, paper eq. 5; in brackets "
             f"+- {n_se:g} SES, the error of the mean change)"]
    for name, row in summ.iterrows():
        tail = f"   {extra[name]}" if name in extra else ""
        lines.append(f"{name:>9}: mean ROI grey {row['mean']:7.2f} +- {n_se * row['se_tot']:.2f}   change "
                     f"{row['delta_mean']:+6.2f} +- {n_se * row['delta_se_tot']:.2f} "
                     f"[+- {n_se * row['delta_ses']:.2f}]{tail}")
    lines.append("(SE_tot: eq. 3 counts the measurement error of one particle, not of the mean, so its bars can "
                 "cross 0 where a z-test rejects; docs/statistics.md)")
    z = tracking.z_tests(alternative="less", sigma=sigma)
    seen = set()
    for _, r in z.iterrows():
        if (r["state_a"], r["state_b"]) in seen:  # the reference and the state after it: printed once
            continue
        seen.add((r["state_a"], r["state_b"]))
        kind = "reference" if r["against"] == "reference" else "previous state"
        head = f"z-test {r['state_b']} vs {r['state_a']} ({kind}):"
        if not bool(r["testable"]):
            lines.append(f"{head} not testable ({int(r['n_b'])} and {int(r['n_a'])} kept particles; 2 needed)")
            continue
        verdict = f"darker, significant at {sigma:g} sigma" if bool(r["reject"]) else "not significantly darker"
        lines.append(f"{head} z = {r['z']:+.2f} -> {verdict}")
    c = tracking.counts().set_index("reason")
    n = int(tracking.particles["label"].nunique())
    excl = ", ".join(f"{k} {int(v)}" for k, v in c["n"].items() if k != "kept" and v) or "none"
    lines.append(f"cleaning: {int(c.loc['kept', 'n'])} of {n} particles kept; excluded: {excl}")
    noise = tracking.params.get("noise", {}) or {}
    if noise:
        parts = []
        for state, v in noise.items():
            sig = float(v.get("sigma", _np.nan))
            parts.append(f"{state} {sig:.2f} ({v.get('source')})")
        lines.append(f"noise sigma_bg: {', '.join(parts)}{noise_note}")
    return lines


def _profile_figures(figs, tables: dict, *, stem: str, what: str, n_se: float, min_particles: int,
                     column: str = "radial_layers_graylevel") -> list:
    """Fig. 6 three ways for `tables` (name -> particle table): mean grey level per layer, the
    paper's normalisation (``radial_max``: surface 0, brightest layer 1) and the profile divided
    by the particle's ROI mean; each layer's mean over the particles ± n_se SE."""
    from . import plotting as P
    from .table import normalise_profiles

    items = [figs.item(f"{stem}_profiles", f"{what} profiles", P.plot_radial_profiles, tables,
                       column=column, n_se=n_se, min_particles=min_particles,
                       title=f"mean {column} per layer, ±{n_se:g} SE",
                       caption=f"Fig. 6 ({what}): mean {column} per radial layer (1 = surface), error bars "
                               f"±{n_se:g} standard errors of the mean over the particles.")]
    for how, name, title, caption in (
            ("radial_max", "paper", "paper's normalisation (surface 0, max 1)",
             "Fig. 6 in the paper's normalisation: each particle's profile minus its surface layer, divided by its "
             "largest such difference (radial_max; surface 0, brightest layer 1). Undefined (left out) for a "
             "particle whose surface layer is its brightest, e.g. with a bright phase-contrast rim: {lost}."),
            ("roi_mean", "normalised", "profile / ROI mean",
             "The same particles, each layer's mean divided by the particle's own ROI mean (1 = as bright as its "
             "interior; below 1 = darker, e.g. cracked cores); defined for every particle with a ROI.")):
        try:
            normed = {k: normalise_profiles(t, how) for k, t in tables.items()}
        except GrapesInputError as exc:
            figs.notes.append(f"{what} profiles ({title}) not drawn: {exc}")
            items.append(figs.notes[-1])
            continue
        lost, drawn = [], {}
        for k, t in normed.items():
            ok = sum(1 for p in t["radial_layers_graylevelnormed"]
                     if p is not None and np.size(p) and np.isfinite(np.asarray(p, float)).any())
            lost.append(f"{k}: {len(t) - ok} of {len(t)}")
            if ok:
                drawn[k] = t
        if not drawn:
            why = ("whose surface layer is its brightest (a bright rim); the profiles divided by the ROI mean are "
                   "defined") if how == "radial_max" else "none has a ROI mean"
            figs.notes.append(f"{what}: profiles in {title} not drawn: undefined for every particle ("
                              f"{'; '.join(lost)}), {why}")
            items.append(figs.notes[-1])
            continue
        items.append(figs.item(f"{stem}_profiles_{name}", f"{what} profiles ({title})", P.plot_radial_profiles,
                               drawn, column="radial_layers_graylevelnormed", n_se=n_se,
                               min_particles=min_particles, title=f"{title}, ±{n_se:g} SE",
                               caption=caption.format(lost="; ".join(lost))))
    return items


def _kept_profiles(tracking, figs, *, min_particles: int) -> list:
    """Fig. 6 of the kept particles, one curve per state (each state's own table)."""
    tables = getattr(tracking, "tables", None)
    if not tables:
        return ["no particle tables in the tracking: no radial profile"]
    parts = tracking.particles
    kept = set(parts.loc[~parts["excluded"].astype(bool), "label"].astype("uint64").tolist())
    if not kept:
        return ["no kept particle: no radial profile"]
    sub = {}
    for s in tracking.states:
        t = tables.get(s)
        if t is None or "radial_layers_graylevel" not in t.columns:
            continue
        sub[str(s)] = t[t["label"].astype("uint64").isin(kept)]
    if not sub:
        return ["the particle tables have no radial profile column: no radial profile"]
    text = (f"The {len(kept)} kept particles in each state, each state's own particle table (the same particles in "
            f"every state). Layers with fewer than {min_particles} particles are not drawn.")
    return [text] + _profile_figures(figs, sub, stem="fig6_kept", what="kept particles per state", n_se=2.0,
                                     min_particles=min_particles)


def tracking_report(tracking, out_dir, overwrite: bool = False, *, n_maps: int = 3, n_se: float = 3.0,
                    sigma: float = 5.0, quantile_column: str | None = None, q: int = 4, dpi: int = 110,
                    title: str | None = None) -> ReportFiles:
    """Figures, ``summary.csv`` and a self-contained ``report.html`` of an operando tracking.

    Parameters
    ----------
    tracking : Tracking-like
        The result of :func:`grapes_dask.track.track`, used through ``states``, ``reference``,
        ``particles``, ``summary()``, ``z_tests()``, ``counts()``, ``by_quantile()``,
        ``fraction()``, ``change_map()`` and ``params``.
    out_dir : path
        Folder for ``report.html``, ``summary.csv`` and ``figures/*.png`` (created if missing).
    overwrite : bool
        Replace earlier outputs; otherwise an existing output raises before anything is drawn.
    n_maps : int
        Change maps (fig. 10) of the `n_maps` largest kept particles (by reference volume), one
        figure per particle with every non-reference state; 0 draws none.
    n_se : float
        Error bars of the state means and changes (fig. 7): +- n_se SE_tot (the paper: 3), and
        for the changes +- n_se ``delta_ses`` beside them (the error of the mean change).
    sigma : float
        Significance level of the z-tests, in standard deviations (the paper: 5).
    quantile_column : str, optional
        Column of the position quantiles (fig. 8); default ``centroid-2`` (x) in 3D, ``centroid-1``
        in 2D.
    q : int
        Number of quantile groups (4: quartiles).
    dpi : int
        Resolution of the figures.
    title : str, optional

    Returns
    -------
    ReportFiles
        The paths written, and notes on figures that could not be drawn.
    """
    from . import plotting as P

    for attr in ("states", "reference", "particles", "summary", "z_tests", "counts", "by_quantile", "fraction",
                 "change_map", "params"):
        if not hasattr(tracking, attr):
            raise GrapesInputError(f"tracking has no {attr!r}: give the result of grapes_dask.track.track()")
    dests = _prepare_out(out_dir, overwrite)
    states = [str(s) for s in tracking.states]
    reference = str(tracking.reference)
    others = [s for s in states if s != reference]
    parts = tracking.particles
    summary = tracking.summary()
    col = quantile_column or ("centroid-2" if "centroid-2" in parts.columns else "centroid-1")
    figs = _Collector()

    # fig. 7, 12: summary and z-tests
    kept = parts[~parts["excluded"].astype(bool)]
    n_kept = int(kept["label"].nunique())
    n_all = int(parts["label"].nunique())
    ztests = tracking.z_tests(alternative="less", sigma=sigma)
    sec_summary = Section("Summary per state", (
        f"{len(states)} states ({', '.join(states)}), reference {reference}. {n_kept} of {n_all} particles kept "
        f"after cleaning. Mean of the particles' mean ROI grey level, and of their change against {reference}, "
        f"with the measurement (SEM, eq. 3), sampling (SES, eq. 4) and total (SE_tot, eq. 5) standard errors, "
        f"in grey levels.",
        summary,
        figs.item("fig7a_state_means", "Figure 7a", P.plot_state_means, summary, n_se=n_se,
                  caption=f"Fig. 7a: population mean per state, error bars ±{n_se:g} SE_tot."),
        figs.item("fig7b_state_deltas", "Figure 7b", P.plot_state_deltas, summary, n_se=n_se, reference=reference,
                  z_tests=ztests,
                  caption=f"Fig. 7b: population mean change against {reference}. Thin bars: ±{n_se:g} SE_tot "
                          "(eq. 5), as the paper; its SEM (eq. 3) is the root mean square of the particles' "
                          "measurement errors, the error of one particle's change, not divided by sqrt(n), so "
                          f"these bars can cross 0. Thick red bars: ±{n_se:g} SES of the per-particle changes "
                          "(eq. 4, sd / sqrt(n), which already contains the image noise): the error of the "
                          "population mean change. z: the z-test of eq. 6 against the reference (* = rejects at "
                          f"{sigma:g} sigma), which divides by sqrt(n) too: a significant z beside SE_tot bars that "
                          "cross 0 is no contradiction."),
    ))
    sec_z = Section("z-tests against the reference and between consecutive states", (
        f"Two-sample z-test of eq. 6 on the kept particles' mean ROI grey level, sample 1 = state_b (the state "
        f"tested), sample 2 = state_a: the reference (against = reference; the paper's test is 4.0 V against "
        f"pristine) or the state before (against = previous); alternative: state_b is darker; significance level "
        f"{sigma:g} sigma. testable is False (z, p empty) when a state has fewer than 2 kept particles.",
        ztests,
        figs.item("fig12_normal_models", "Figure 12", P.plot_normal_models, summary, reference=reference,
                  states=[reference, others[0]] if others else None,
                  caption="Fig. 12: modelled normal distributions of the population means, N(mean, SES), of "
                          f"{reference} and {others[0] if others else reference} (as the paper's, the first "
                          f"change); vertical lines: {reference} mean ± k sigma (eq. 6)."),
    ))
    sec_clean = Section("Cleaning", (
        "Particles excluded, by reason (a particle can have several reasons, each counted); every particle "
        "stays in the particle table with its reasons.",
        tracking.counts(),
    ))

    # fig. 8: position quantiles
    items = []
    col_name = describe_column(col, spacing=tracking.params.get("spacing"),
                               unit=tracking.params.get("spacing_unit"))[0]
    try:
        byq = tracking.by_quantile(column=col, q=q)
    except GrapesInputError as err:
        items.append(f"not computed: {err}")
        figs.notes.append(f"Figure 8 not drawn: {err}")
    else:
        items += [f"Kept particles split into {q} groups of {col} (1 = lowest); mean change against {reference} "
                  f"per group and state.", byq,
                  figs.item("fig8_by_quantile", "Figure 8", P.plot_quantile_deltas, byq, n_se=1.0, column=col,
                            spacing=tracking.params.get("spacing"), unit=tracking.params.get("spacing_unit"),
                            caption=f"Fig. 8: mean change per {col_name} group, error bars ±1 SE_tot.")]
    sec_q = Section(f"Change by {col_name.split(' (')[0]} quantile ({col})", tuple(items))

    # fig. 9: conditions
    fracs, items = [], []
    most = most_changed_state(summary, reference)
    if most is not None:
        try:
            first = tracking.fraction(reference, most)
        except GrapesInputError as err:
            items.append(f"fraction {reference} -> {most} not computed: {err}")
        else:
            items.append(figs.item(
                "fig9a_reference_vs_most_changed", "Figure 9a", P.plot_fractions, [first],
                title=f"{reference} against {most}",
                caption=f"Fig. 9a: share of the kept particles darker at {most} (the state with the largest mean "
                        f"decrease against {reference}) than at {reference}: {100 * first.fraction:.1f} ± "
                        f"{100 * first.se:.1f} % (1 binomial SE), n = {first.n}."))
            fracs.append(first)
    n_first = len(fracs)
    for a, b in zip(states[:-1], states[1:]):
        try:
            fracs.append(tracking.fraction(a, b))
        except GrapesInputError as err:
            items.append(f"fraction {a} -> {b} not computed: {err}")
    if fracs:
        import pandas as pd

        table = pd.DataFrame([{k: getattr(f, k) for k in ("state_a", "state_b", "n", "n_darker", "fraction", "se")}
                              for f in fracs])
        items = ["Share of kept particles whose mean ROI grey level is lower in state_b than in state_a, with its "
                 "standard error sqrt(f (1 - f) / n): first the reference against the state of largest mean "
                 "decrease (fig. 9a), then consecutive states.", table] + items
        if fracs[n_first:]:
            items.append(figs.item("fig9_fractions", "Figure 9", P.plot_fractions, fracs[n_first:],
                                   caption="Fig. 9: share of particles darker at the later of two consecutive "
                                           "states."))
    sec_f = Section("Conditions", tuple(items) or ("only one state: no condition",))

    # fig. 10: change maps of the largest kept particles
    items = []
    if n_maps > 0 and others:
        ref_rows = kept[kept["state"].astype(str) == reference] if len(kept) else kept
        largest = ref_rows.sort_values(["volume", "label"], ascending=[False, True])["label"].head(n_maps)
        for label in largest:
            label = int(label)
            maps = []
            try:
                maps = [tracking.change_map(label, s) for s in others]
            except (GrapesInputError, NotImplementedError) as err:
                items.append(f"change maps of particle {label} not computed: {err}")
                figs.notes.append(f"Figure 10 of particle {label} not drawn: {err}")
                continue
            items.append(figs.item(f"fig10_change_map_{label}", f"Figure 10 (particle {label})", P.plot_change_maps,
                                   maps, caption=f"Fig. 10: grey-level change of particle {label} against "
                                                 f"{reference}, central slice of its box (along z)."))
        if not len(largest):
            items.append("no kept particle: no change map")
    sec_maps = Section("Change maps of the largest kept particles", tuple(items) or ("no change map drawn",))

    sec_prof = Section("Radial profiles of the kept particles", tuple(_kept_profiles(tracking, figs, min_particles=10)))

    sections = [sec_summary, sec_z, sec_clean, sec_q, sec_f, sec_prof, sec_maps,
                Section("Parameters", (dict(tracking.params),))]
    sections[-1:-1] = _background_sections(tracking)
    # after the paper (grapes_dask.change) and fig. 5 / 8b on the reference state's volumes
    from .change_plots import change_sections
    from .particle_figures import particle_figure_sections

    if hasattr(tracking, "classify"):  # a Tracking (not a stand-in with the paper's methods only)
        sections[-1:-1] = change_sections(tracking, figs)
    g_ref, l_ref = getattr(tracking, "_volumes", {}).get(reference, (None, None))
    if l_ref is not None and reference in getattr(tracking, "tables", {}):
        sections[-1:-1] = particle_figure_sections(g_ref, l_ref, tracking.tables[reference], figs=figs,
                                                   name=reference)
    if figs.notes:
        sections.append(Section("Notes", tuple(figs.notes)))
    return _write_outputs(dests, figs.figures, summary, title=title or f"Operando tracking: {', '.join(states)}",
                          sections=sections, provenance={"report": "grapes_dask.report.tracking_report"},
                          overwrite=overwrite, dpi=dpi, notes=figs.notes)


# --------------------------------------------------------------------------------------------
# 3. particle tables
# --------------------------------------------------------------------------------------------


def _volume_column(table) -> str:
    for c in ("volume", "voxel_count"):
        if c in table.columns:
            return c
    raise GrapesInputError("a table has no 'volume' or 'voxel_count' column: give particle tables of "
                           "grapes_dask.analyze")


def _quartiles(table, q: int, vcol: str) -> dict:
    """Group label -> sub-table, by `q` quantile groups of the volume (1 = smallest).

    The groups of :func:`grapes_dask.stats.quantile_groups` (:func:`grapes_dask.stats.quantile_labels`:
    by rank, ties by label, sizes within one of each other); the caller checks that there are at
    least `q` particles.
    """
    from .stats import quantile_groups

    groups = quantile_groups(table, vcol, q, profiles=(), columns=[]).groups.fillna(0).to_numpy(int)
    out = {}
    for k in range(1, q + 1):
        sub = table[groups == k]
        if len(sub):
            out[f"Q{k} ({sub[vcol].min():.4g}-{sub[vcol].max():.4g})"] = sub
    return out


def tables_report(tables, out_dir, overwrite: bool = False, *, labels=None, column: str = "radial_layers_graylevel",
                  q: int = 4, n_se: float = 2.0, min_particles: int = 10, property_column: str = "roi_mean",
                  drop_border: bool = True, dpi: int = 110, title: str | None = None) -> ReportFiles:
    """Figures, ``summary.csv`` and a self-contained ``report.html`` of particle tables.

    Parameters
    ----------
    tables : dict of str -> pandas.DataFrame, or a DataFrame
        Particle tables (:func:`grapes_dask.analyze`), e.g. one per state; a single DataFrame is
        named "particles".
    out_dir : path
        Folder for ``report.html``, ``summary.csv`` and ``figures/*.png`` (created if missing).
    overwrite : bool
        Replace earlier outputs; otherwise an existing output raises before anything is drawn.
    labels : dict of str -> label volume, or a label volume, optional
        Label volumes (arrays or paths :func:`grapes_dask.io.open_volume` reads) of the tables,
        for a map of `property_column` on the central z slice (only that slice is read). None:
        no map.
    column : str
        Profile column of the fig. 6-style profiles (``radial_layers_graylevel``: mean grey
        level per layer, in grey levels; ``radial_layers_graylevelnormed`` where its
        normalisation is defined).
    q : int
        Volume groups of the profiles (4: quartiles; 1 = smallest).
    n_se : float
        Error bars of the profiles: +- n_se standard errors (the paper's fig. 6: 2).
    min_particles : int
        Layers with fewer particles are not drawn.
    property_column : str
        Scalar column of the property map.
    drop_border : bool
        Leave out particles touching the volume border (``touches_border``), whose profiles are
        cut; the count is in the summary.
    dpi : int
    title : str, optional

    Returns
    -------
    ReportFiles
        The paths written, and notes on figures that could not be drawn.
    """
    import pandas as pd

    from . import plotting as P
    from .stats import population_stats

    if hasattr(tables, "columns"):
        tables = {"particles": tables}
    if not tables:
        raise GrapesInputError("tables is empty: give a dict of name -> particle table")
    if labels is not None and not isinstance(labels, dict):
        if len(tables) != 1:
            raise GrapesInputError("{labels}: give a dict of table name -> label volume for several tables",
                                   labels=None)
        labels = {next(iter(tables)): labels}
    for name in labels or {}:
        if name not in tables:
            raise GrapesInputError(f"{{labels}}: {name!r} is not a table name ({list(tables)})", labels=None)
    for name, t in tables.items():
        if not hasattr(t, "columns"):
            raise GrapesInputError(f"table {name!r}: give a pandas DataFrame, not {type(t).__name__}")
    vcols = {name: _volume_column(t) for name, t in tables.items()}
    dests = _prepare_out(out_dir, overwrite)
    figs = _Collector()

    used = {}
    rows = []
    for name, t in tables.items():
        border = t["touches_border"].astype(bool) if drop_border and "touches_border" in t.columns else None
        u = t[~border] if border is not None else t
        used[name] = u
        row = {"table": name, "particles": len(t), "touching the border": int(border.sum()) if border is not None
               else 0, "used": len(u), f"median {vcols[name]}": float(u[vcols[name]].median()) if len(u) else np.nan}
        if "roi_mean" in u.columns:
            ps = population_stats(u["roi_mean"].to_numpy(float))
            row.update({"roi_mean mean": ps.mean, "roi_mean sd": ps.sd, "roi_mean ses": ps.ses})
        rows.append(row)
    summary = pd.DataFrame(rows).set_index("table")

    names = list(tables)
    intro = (f"{len(names)} table(s): {', '.join(names)}. "
             + ("Particles touching the volume border are left out of the figures. " if drop_border else "")
             + "roi_mean: population mean, sample standard deviation (ddof=1) and sampling standard error "
               "(eq. 4) of the particles' mean ROI grey level, in grey levels.")
    sections = [Section("Summary", (intro, summary))]

    # fig. 6: largest volume group of every table, then all groups per table
    items = []
    top = {}
    for name, u in used.items():
        if len(u) >= q:
            groups = _quartiles(u, q, vcols[name])
            top[name] = list(groups.values())[-1]
    if top:
        # three ways: grey levels, the paper's normalisation (radial_max, undefined where the rim is the
        # brightest layer) and each profile divided by the particle's own ROI mean
        items += _profile_figures(figs, top, stem="fig6_largest_group",
                                  what=f"largest volume group (top 1/{q}) of each table", n_se=n_se,
                                  min_particles=min_particles, column=column)
    for k, (name, u) in enumerate(used.items(), start=1):
        if len(u) < q:
            figs.notes.append(f"profiles of {name!r} not drawn: {len(u)} particles, fewer than {q} groups")
            items.append(figs.notes[-1])
            continue
        items.append(figs.item(f"profiles_by_volume_{k}", f"profiles of {name!r}", P.plot_radial_profiles,
                               _quartiles(u, q, vcols[name]), column=column, n_se=n_se, min_particles=min_particles,
                               title=f"{name}: by {vcols[name]} group (Q1 smallest), error bars ±{n_se:g} SE",
                               caption=f"{name}: mean {column} per radial layer in each of {q} volume groups."))
    sections.append(Section("Radial profiles by volume group", tuple(items)))

    # distributions
    dist_cols = [c for c in ("equivalent_diameter_volume", "roi_mean", "sphericity")
                 if any(c in u.columns for u in used.values())]
    sections.append(Section("Distributions", (
        figs.item("distributions", "Distributions", P.plot_distributions, used, columns=dist_cols or ["volume"],
                  density=len(used) > 1, caption="Particle size, grey level and shape, one line per table."),)))

    # property maps
    if labels:
        from .io import open_volume

        items = []
        for k, (name, lab) in enumerate(labels.items(), start=1):
            try:
                vol = open_volume(lab)
            except GrapesInputError as err:
                items.append(f"labels of {name!r} not read: {err}")
                figs.notes.append(items[-1])
                continue
            items.append(figs.item(f"property_map_{k}", f"property map of {name!r}", P.plot_property_slice, vol,
                                   tables[name], property_column,
                                   title=f"{name}: {property_column} per particle, central slice",
                                   caption=f"{name}: {property_column} of each particle on the central slice."))
        sections.append(Section(f"{property_column} on a slice", tuple(items)))

    params = {name: t.attrs.get("grapes_dask", {}) for name, t in tables.items()}
    params = {k: v for k, v in params.items() if v}
    sections.append(Section("Parameters", (dict(params) if params else "no analysis parameters recorded in the "
                                                                       "tables' metadata",)))
    if figs.notes:
        sections.append(Section("Notes", tuple(figs.notes)))
    return _write_outputs(dests, figs.figures, summary, title=title or f"Particle tables: {', '.join(names)}",
                          sections=sections, provenance={"report": "grapes_dask.report.tables_report"},
                          overwrite=overwrite, dpi=dpi, notes=figs.notes)


def _background_sections(tracking) -> list:
    """The section on sigma_bg's source and the beam stability (empty list for a Tracking-like
    object without :meth:`~grapes_dask.track.Tracking.background`)."""
    if not hasattr(tracking, "background"):
        return []
    import pandas as pd

    params = dict(getattr(tracking, "params", {}) or {})
    noise = pd.DataFrame([{"state": s, "sigma": r.get("sigma"), "source": r.get("source"),
                           "box": r.get("region"), "warning": r.get("warning") or ""}
                          for s, r in (params.get("noise") or {}).items()])
    bg = params.get("background") or {}
    items = ["Image noise sigma_bg per state (eq. 1) and where it was measured: empty_space (a label-free slab "
             "at a face of the volume that passed the flat-field test), region (a box given), background (the "
             "voxels between particles, whose texture inflates it: a fallback) or given.", noise]
    if bg.get("box") is None:
        items.append(f"Beam stability not checked: {bg.get('note') or 'no empty region'}.")
    else:
        table = tracking.background()
        flagged = [str(s) for s in table.loc[table["flag"], "state"]]
        items += [f"Beam stability (paper 3.3): the grey-level peak (median) and spread (IQR / 1.349) of the empty "
                  f"region {bg['box']} ({bg.get('source')}) in every state, its shift against {tracking.reference}, "
                  "and the ratio of the shift to the mean change of the kept particles. A state is flagged when "
                  "its shift exceeds 3 standard errors and 10% of the mean change. "
                  + (f"Flagged: {', '.join(flagged)}. " if flagged else "No state flagged. ")
                  + ("The shifts were subtracted from the ROI means (correct_drift)." if bg.get("correct_drift")
                     else "The ROI means are not corrected (correct_drift not set)."), table]
    return [Section("Noise and beam stability", tuple(items))]


def file_name(name: str) -> str:
    """A state name as a file name: letters, digits, ``.``, ``-`` and ``_`` kept, others ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "state"


def write_tracking(tracking, folder, *, title: str | None = None) -> ReportFiles:
    """Every output of an operando tracking into an existing, empty `folder`.

    Written: ``particles.parquet`` (the long table), ``tables/NAME.parquet`` (each state's
    particle table, NAME from :func:`file_name`), ``z_tests.csv``, ``cleaning.csv`` (counts by
    reason), ``by_quantile.csv`` (changes by x-position quartile, with at least 4 kept
    particles), ``background.csv`` (:meth:`~grapes_dask.track.Tracking.background`), and the
    files of :func:`tracking_report` (``summary.csv``, ``figures/``,
    ``report.html``). The CLI and the demo call it on a temporary folder renamed when complete.

    Parameters
    ----------
    tracking : grapes_dask.track.Tracking
    folder : path
    title : str, optional
        Title of the report.

    Returns
    -------
    ReportFiles
        Those of the report.
    """
    from .output import write_table

    folder = Path(folder)
    write_table(tracking.particles, folder / "particles.parquet")
    (folder / "tables").mkdir()
    for name, table in tracking.tables.items():
        write_table(table, folder / "tables" / f"{file_name(name)}.parquet")
    tracking.z_tests().to_csv(folder / "z_tests.csv", index=False)
    tracking.counts().to_csv(folder / "cleaning.csv", index=False)
    if hasattr(tracking, "background"):
        tracking.background().to_csv(folder / "background.csv", index=False)
    parts = tracking.particles
    column = "centroid-2" if "centroid-2" in parts.columns else "centroid-1"
    kept = int((~parts.loc[parts["state"] == tracking.reference, "excluded"]).sum())
    if kept >= 4:
        tracking.by_quantile(column, 4).to_csv(folder / "by_quantile.csv", index=False)
    return tracking_report(tracking, folder, title=title)

