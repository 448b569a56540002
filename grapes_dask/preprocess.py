"""From reconstructed volumes of an operando series to grey + label volumes ready for tracking.

The paper's chain (section 2.2, case study 2), each step out of core and written to Zarr under
one folder, ``DIR/<state>/``:

1. **register** every state onto the reference state (:func:`grapes_dask.registration.register`,
   translation or rigid), and resample it onto the reference grid
   (:func:`grapes_dask.registration.apply_transform`) -> ``grey.zarr`` (the reference state's grey is
   used as it is); the transform goes to ``transform.json`` and the Zarr attributes;
2. optionally **denoise** each registered state (:func:`grapes_dask.denoising.denoise`) ->
   ``denoised.zarr``, used for the segmentation only: the analysis reads the unsmoothed grey
   levels, as in the paper;
3. **segment** the reference state (:func:`grapes_dask.segmentation.segment`) -> ``labels.zarr``;
4. segment every other state **seeded** with the reference labels, so that each particle keeps
   its id and a particle that is gone stays absent -> ``labels.zarr``.

:func:`prepare_series` returns the ``{state: (grey, labels)}`` mapping that
:func:`grapes_dask.track.track` takes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import GrapesInputError

__all__ = ["prepare_series", "PreparedSeries"]


@dataclass
class PreparedSeries:
    """Result of :func:`prepare_series`.

    Attributes
    ----------
    states : dict
        State name -> ``(grey path, labels path)``, in the order given: the input of
        :func:`grapes_dask.track.track`.
    reference : str
        Name of the reference state.
    transforms : dict
        State name -> :class:`grapes_dask.registration.Transform` (the reference has none).
    segmentations : dict
        State name -> :class:`grapes_dask.segmentation.Segmentation` (its `labels` read the written
        Zarr array).
    seconds : dict
        State name -> seconds per step.
    """

    states: dict
    reference: str
    transforms: dict = field(default_factory=dict)
    segmentations: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def summary(self) -> str:
        """One line per state: shift, particles, ids kept from the reference."""
        lines = []
        for name in self.states:
            seg = self.segmentations[name]
            tr = self.transforms.get(name)
            shift = "reference" if tr is None else "shift " + ", ".join(f"{v:+.2f}" for v in tr.shift) + " voxels"
            lines.append(f"{name}: {shift}; {seg.n_particles} particles; threshold {seg.threshold:g}")
        return "\n".join(lines)


def prepare_series(
    states: dict,
    out_dir,
    *,
    reference: str | None = None,
    register: str | None = "translation",
    denoise: str | None = None,
    denoise_options: dict | None = None,
    segment_options: dict | None = None,
    spacing=None,
    overwrite: bool = False,
    client=None,
    progress: bool = False,
    echo=None,
) -> PreparedSeries:
    """Register, denoise and segment the states of an operando series, out of core.

    Parameters
    ----------
    states : dict
        State name -> grey volume (anything :func:`grapes_dask.io.resolve_volume` opens), in
        the order of the series. Every state has the reference's shape.
    out_dir : path
        Folder of the results: ``out_dir/<state>/grey.zarr`` (registered grey, except the
        reference's, used where it is), ``denoised.zarr`` (with `denoise`), ``labels.zarr``,
        ``transform.json``.
    reference : str, optional
        The state the others are registered onto and seeded from (default: the first).
    register : {"translation", "rigid", None}
        Registration model (None: the states are already aligned).
    denoise : {"nlm", "gaussian", "median", None}
        Filter applied before the segmentation only (None: segment the registered grey).
    denoise_options, segment_options : dict, optional
        Keyword arguments of :func:`grapes_dask.denoising.denoise` and
        :func:`grapes_dask.segmentation.segment` (not `seeds`, `out`).
    spacing : float or sequence of float, optional
        Voxel size (default: from the reference's metadata).
    overwrite : bool
        Replace existing outputs in `out_dir`.
    client : distributed.Client, optional
    progress : bool
        Report each step's progress on standard error.
    echo : callable, optional
        Called with one line of text as each step starts (e.g. ``print``).

    Returns
    -------
    PreparedSeries
    """
    from .io import resolve_volume
    from .segmentation import segment

    if len(states) < 1:
        raise GrapesInputError("give at least one state to prepare")
    names = list(states)
    reference = names[0] if reference is None else reference
    if reference not in states:
        raise GrapesInputError(f"the {{reference}} state {reference!r} is not one of the states {names}",
                               reference=reference)
    if register not in ("translation", "rigid", None):
        raise GrapesInputError("{register} must be 'translation', 'rigid' or None", register=register)
    if denoise not in ("nlm", "gaussian", "median", None):
        raise GrapesInputError("{denoise} must be 'nlm', 'gaussian', 'median' or None", denoise=denoise)
    seg_opts = dict(segment_options or {})
    for bad in ("seeds", "out", "overwrite", "client", "progress"):
        if bad in seg_opts:
            raise GrapesInputError(f"segment_options may not set {bad!r}: prepare_series sets it")
    vols = {n: resolve_volume(v) for n, v in states.items()}
    ref_shape = vols[reference].array.shape
    for n, v in vols.items():
        if v.array.shape != ref_shape:
            raise GrapesInputError(
                f"state {n!r} ({v.name}) has shape {v.array.shape}, the reference {reference!r} has {ref_shape}: "
                "crop the states to the same region of interest first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = [reference] + [n for n in names if n != reference]
    res = PreparedSeries(states={}, reference=reference)
    grey_of, labels_of = {}, {}
    say = echo or (lambda text: None)
    for n in order:
        t = {}
        d = out / _safe(n)
        d.mkdir(exist_ok=True)
        # 1. registration onto the reference
        t0 = time.perf_counter()
        if n == reference or register is None:
            grey_of[n] = vols[n]
        else:
            from .registration import apply_transform, register as estimate

            say(f"{n}: registering onto {reference} ({register})")
            tr = estimate(vols[reference], vols[n], method=register)
            res.transforms[n] = tr
            (d / "transform.json").write_text(json.dumps(tr.to_dict(), indent=1))
            apply_transform(vols[n], tr, out=d / "grey.zarr", overwrite=overwrite)
            grey_of[n] = resolve_volume(d / "grey.zarr")
        t["register"] = time.perf_counter() - t0
        # 2. denoising (for the segmentation only)
        t0 = time.perf_counter()
        seg_input: Any = grey_of[n]
        if denoise is not None:
            from .denoising import denoise as run_denoise

            say(f"{n}: denoising ({denoise})")
            run_denoise(grey_of[n], method=denoise, out=d / "denoised.zarr", overwrite=overwrite,
                        **(denoise_options or {}))
            seg_input = resolve_volume(d / "denoised.zarr")
        t["denoise"] = time.perf_counter() - t0
        # 3./4. segmentation, seeded from the reference for the other states
        t0 = time.perf_counter()
        seeds = None if n == reference else labels_of[reference]
        say(f"{n}: segmenting" + ("" if seeds is None else f", seeded with the labels of {reference}"))
        seg = segment(seg_input, seeds=seeds, out=d / "labels.zarr", overwrite=overwrite, spacing=spacing,
                      client=client, progress=progress, **seg_opts)
        labels_of[n] = seg.path
        res.segmentations[n] = seg
        t["segment"] = time.perf_counter() - t0
        res.seconds[n] = t
    for n in names:  # the order given
        g = grey_of[n]
        res.states[n] = (g, str(labels_of[n]))
    return res


def _safe(name: str) -> str:
    from .report import file_name

    return file_name(name)
