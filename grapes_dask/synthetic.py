"""Synthetic micro-CT phantoms of packed electrode particles, with ground truth.

A phantom imitates a segmented micro-CT volume of NMC secondary particles: a grey-level volume
and a label volume in which every particle has its own id, optionally through several operando
states of charge in which the same particles crack (darken) and partly heal. The ground truth
(centre, radii, orientation, damage of every particle in every state) is known exactly, so that
the analysis can be checked against it.

Stages of the pipeline
----------------------
1. **Particles** (:func:`make_particles`). Polydisperse spheres and ellipsoids (random
   orientations) are placed by random sequential addition, largest first, in a grid hash
   (Numba). Each new particle is snapped against its nearest neighbour at a centre distance of
   ``min_gap .. 1.0`` times the sum of their radii along the line of centres, so that particles
   touch and overlap slightly. Ids are ``1..N`` or random distinct sparse ids.
2. **States** (:func:`make_truth`). One row per particle and state: the per-particle damage
   (a fixed per-particle susceptibility times a per-state level, optionally falling along one
   axis) and an optional rigid drift of the whole sample per state.
3. **Labels** (one task per chunk). Each chunk is a pure function of the particles whose boxes
   meet it (a spatial index is built once). A voxel belongs to the particle of smallest power
   distance ``r_eq**2 * (s**2 - 1)`` among those with normalised ellipsoidal distance
   ``s <= 1``: overlaps are split by flat faces (exactly planes for two spheres), as a watershed
   segmentation would split them.
4. **Grey** (same task, on the chunk grown by a small halo of labels). Particle bulk level,
   pore level, sub-resolution voids and cracks drawn on a ``supersample``-times finer grid and
   averaged down (partial-volume effect), concentrated at the particle core, then a bright (or
   dark, with a negative contrast) phase-contrast rim on the voxels within ``rim_width`` of the
   pore (not at contact faces between particles).
5. **Blur** (optional): each task renders its chunk grown by the kernel radius
   ``int(truncate * sigma + 0.5)``, mirrors it where it leaves the volume and applies
   :func:`scipy.ndimage.gaussian_filter`: the cropped result equals the filter of the whole
   volume (``mode="reflect"``), bitwise, while memory stays bounded by the chunk.
6. **Noise and quantisation**: additive Gaussian noise, rounding and clipping to the grey dtype
   (uint8 by default, as the paper's 8-bit data; uint16 or float32).
7. **Output** (:func:`make_phantom`): the chunks are computed straight into compressed Zarr v3
   stores, never holding the volume in memory, with the truth table (CSV) and a JSON of all the
   parameters beside them.

Every random number inside the volumes comes from a counter-based hash (splitmix64) of global
voxel or sub-voxel coordinates, particle ids and the seed, never from a sequential random
stream: a phantom is bitwise identical for a seed whatever the chunking or the scheduler.
Voids are drawn by thresholding a fixed per-particle hash field that moves with the particle,
against a probability that grows with damage, so the voids at a lower damage are a subset of
those at a higher damage (exactly so when the drift is a whole number of sub-voxels).

Coordinates are voxel index coordinates (z, y, x) (or (y, x) in 2D): voxel ``i`` is centred
at ``i`` and covers ``[i - 0.5, i + 0.5)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import dask
import dask.array as da
import numba
import numpy as np
import pandas as pd

from ._errors import GrapesInputError

__all__ = [
    "make_particles",
    "make_truth",
    "phantom_arrays",
    "phantom_numpy",
    "make_phantom",
    "rotation_matrices",
    "GreyModel",
    "Phantom",
]

_U64 = np.uint64
_MASK21 = (1 << 21) - 1
_OFF21 = 1 << 20  # lattice coordinates are packed as 21-bit fields offset by 2**20
_STREAM_VOID = 0x5EED_0001
_STREAM_NOISE = 0x5EED_0002
_STREAM_CRACK = 0x5EED_0003
_STREAM_TEXTURE = 0x5EED_0004
_BIG = np.int32(1 << 30)


# --------------------------------------------------------------------------------------------
# counter-based hashing (numba)
# --------------------------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def _mix(x):
    """splitmix64 of a uint64."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


@numba.njit(nogil=True, cache=True)
def _pack(z, y, x):
    """Three signed lattice coordinates (|c| < 2**20) packed into one uint64."""
    m = _U64(_MASK21)
    return (((_U64(z + _OFF21) & m) << _U64(42)) | ((_U64(y + _OFF21) & m) << _U64(21))
            | (_U64(x + _OFF21) & m))


@numba.njit(nogil=True, cache=True)
def _unit(h):
    """uint64 hash -> float in [0, 1)."""
    return float(h >> _U64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(nogil=True, cache=True)
def _salts(seed, stream, keys):
    base = _mix(_mix(_U64(seed)) ^ _U64(stream))
    out = np.empty(keys.shape[0], dtype=np.uint64)
    for i in range(keys.shape[0]):
        out[i] = _mix(base ^ keys[i])
    return out


def _seed64(seed: int) -> int:
    return int(seed) & 0xFFFF_FFFF_FFFF_FFFF


# --------------------------------------------------------------------------------------------
# stage 1: placement (numba)
# --------------------------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def _rho(M, i, uz, uy, ux):
    """Distance from the centre of ellipsoid ``i`` to its surface along the unit vector u."""
    q = (M[i, 0] * uz * uz + M[i, 1] * uy * uy + M[i, 2] * ux * ux
         + 2.0 * (M[i, 3] * uz * uy + M[i, 4] * uz * ux + M[i, 5] * uy * ux))
    return 1.0 / math.sqrt(q)


@numba.njit(nogil=True, cache=True)
def _place(lo, hi, flat, M, rmax, req, min_gap, max_attempts, seed, out):
    """Random sequential addition with snapping; particles in the given order.

    Returns a boolean array: particle placed or not. ``out`` receives the centres.
    """
    np.random.seed(seed)
    n = M.shape[0]
    placed = np.zeros(n, dtype=np.bool_)
    cell = 2.0 * rmax.max() + 1e-9
    ncz = 1 if flat else max(1, int(math.ceil((hi[0] - lo[0]) / cell)))
    ncy = max(1, int(math.ceil((hi[1] - lo[1]) / cell)))
    ncx = max(1, int(math.ceil((hi[2] - lo[2]) / cell)))
    head = -np.ones(ncz * ncy * ncx, dtype=np.int64)
    nxt = -np.ones(n, dtype=np.int64)
    for j in range(n):
        for _ in range(max_attempts):
            pz = 0.0 if flat else lo[0] + np.random.random() * (hi[0] - lo[0])
            py = lo[1] + np.random.random() * (hi[1] - lo[1])
            px = lo[2] + np.random.random() * (hi[2] - lo[2])
            # snap against the neighbour of smallest surface gap
            kz = min(ncz - 1, int((pz - lo[0]) / cell))
            ky = min(ncy - 1, int((py - lo[1]) / cell))
            kx = min(ncx - 1, int((px - lo[2]) / cell))
            best, bi = 1e300, -1
            for cz in range(max(0, kz - 1), min(ncz, kz + 2)):
                for cy in range(max(0, ky - 1), min(ncy, ky + 2)):
                    for cx in range(max(0, kx - 1), min(ncx, kx + 2)):
                        i = head[(cz * ncy + cy) * ncx + cx]
                        while i >= 0:
                            dz, dy, dx = pz - out[i, 0], py - out[i, 1], px - out[i, 2]
                            d = math.sqrt(dz * dz + dy * dy + dx * dx)
                            if d > 1e-9:
                                g = d - _rho(M, i, dz / d, dy / d, dx / d)
                                if g < best:
                                    best, bi = g, i
                            i = nxt[i]
            if bi >= 0:
                dz, dy, dx = pz - out[bi, 0], py - out[bi, 1], px - out[bi, 2]
                d = math.sqrt(dz * dz + dy * dy + dx * dx)
                uz, uy, ux = dz / d, dy / d, dx / d
                f = min_gap + np.random.random() * (1.0 - min_gap)
                dist = f * (_rho(M, bi, uz, uy, ux) + _rho(M, j, uz, uy, ux))
                pz, py, px = out[bi, 0] + dist * uz, out[bi, 1] + dist * uy, out[bi, 2] + dist * ux
                if flat:
                    pz = 0.0
            if not (lo[0] <= pz <= hi[0] and lo[1] <= py < hi[1] and lo[2] <= px < hi[2]):
                continue
            if not flat and pz >= hi[0]:
                continue
            kz = min(ncz - 1, int((pz - lo[0]) / cell))
            ky = min(ncy - 1, int((py - lo[1]) / cell))
            kx = min(ncx - 1, int((px - lo[2]) / cell))
            ok = True
            for cz in range(max(0, kz - 1), min(ncz, kz + 2)):
                for cy in range(max(0, ky - 1), min(ncy, ky + 2)):
                    for cx in range(max(0, kx - 1), min(ncx, kx + 2)):
                        i = head[(cz * ncy + cy) * ncx + cx]
                        while i >= 0 and ok:
                            dz, dy, dx = pz - out[i, 0], py - out[i, 1], px - out[i, 2]
                            d = math.sqrt(dz * dz + dy * dy + dx * dx)
                            if d < 1e-9:
                                ok = False
                                break
                            uz, uy, ux = dz / d, dy / d, dx / d
                            ri = _rho(M, i, uz, uy, ux)
                            rj = _rho(M, j, uz, uy, ux)
                            if d < min_gap * (ri + rj) * (1.0 - 1e-12):
                                ok = False
                            # each centre must stay owned by its particle (power distance)
                            elif req[i] ** 2 * ((d / ri) ** 2 - 1.0) <= -0.8 * req[j] ** 2:
                                ok = False
                            elif req[j] ** 2 * ((d / rj) ** 2 - 1.0) <= -0.8 * req[i] ** 2:
                                ok = False
                            i = nxt[i]
            if ok:
                out[j, 0], out[j, 1], out[j, 2] = pz, py, px
                c = (kz * ncy + ky) * ncx + kx
                nxt[j] = head[c]
                head[c] = j
                placed[j] = True
                break
    return placed


# --------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------


def rotation_matrices(q: np.ndarray) -> np.ndarray:
    """Rotation matrices of unit quaternions.

    Parameters
    ----------
    q : ndarray, shape (n, 4)
        Quaternions ``(q0, q1, q2, q3)`` = ``(w, v_z, v_y, v_x)``: scalar part first, vector part
        in the (z, y, x) frame of the volume (columns ``q0..q3`` of the truth table).

    Returns
    -------
    ndarray, shape (n, 3, 3)
        ``R[n]`` maps body coordinates to (z, y, x) volume coordinates: column ``k`` is the
        direction of semi-axis ``k`` (``a``, ``b``, ``c``).
    """
    q = np.asarray(q, dtype=np.float64).reshape(-1, 4)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T  # (w, v_0, v_1, v_2) with axis 0 = z of the volume
    R = np.empty((len(q), 3, 3))
    R[:, 0, 0] = 1 - 2 * (y * y + z * z)
    R[:, 0, 1] = 2 * (x * y - z * w)
    R[:, 0, 2] = 2 * (x * z + y * w)
    R[:, 1, 0] = 2 * (x * y + z * w)
    R[:, 1, 1] = 1 - 2 * (x * x + z * z)
    R[:, 1, 2] = 2 * (y * z - x * w)
    R[:, 2, 0] = 2 * (x * z - y * w)
    R[:, 2, 1] = 2 * (y * z + x * w)
    R[:, 2, 2] = 1 - 2 * (x * x + y * y)
    return R


def _quad_forms(axes: np.ndarray, R: np.ndarray):
    """Shape matrices M = R diag(1/a^2) R^T, as (n, 6) [zz, yy, xx, zy, zx, yx], and half extents."""
    inv = 1.0 / axes**2
    M = np.einsum("nij,nj,nkj->nik", R, inv, R)
    C = np.einsum("nij,nj,nkj->nik", R, axes**2, R)  # M^-1
    six = np.stack([M[:, 0, 0], M[:, 1, 1], M[:, 2, 2], M[:, 0, 1], M[:, 0, 2], M[:, 1, 2]], axis=1)
    ext = np.sqrt(np.stack([C[:, 0, 0], C[:, 1, 1], C[:, 2, 2]], axis=1))
    return six, ext


def _geometry(df: pd.DataFrame, flat: bool):
    """(axes (n,3) along body axes, R (n,3,3)) of a particle or truth table."""
    if flat:
        a, b = df["a"].to_numpy(float), df["b"].to_numpy(float)
        axes = np.stack([np.sqrt(a * b), a, b], axis=1)  # body z axis: any length (z = 0 plane)
        th = df["angle"].to_numpy(float)
        q = np.stack([np.cos(th / 2), np.sin(th / 2), np.zeros_like(th), np.zeros_like(th)], axis=1)
    else:
        axes = df[["a", "b", "c"]].to_numpy(float)
        q = df[["q0", "q1", "q2", "q3"]].to_numpy(float)
    return axes, rotation_matrices(q)


def _centres(df: pd.DataFrame, flat: bool) -> np.ndarray:
    if flat:
        yx = df[["y", "x"]].to_numpy(float)
        return np.concatenate([np.zeros((len(df), 1)), yx], axis=1)
    return df[["z", "y", "x"]].to_numpy(float)


# --------------------------------------------------------------------------------------------
# parameter checks
# --------------------------------------------------------------------------------------------


def _check_shape(shape) -> tuple:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise GrapesInputError("{shape}: give 2 or 3 positive integers (z y x)", shape=shape) from None
    if len(shape) not in (2, 3) or any(s < 1 for s in shape):
        raise GrapesInputError("{shape}: give 2 or 3 positive integers (z y x), e.g. 256 256 256", shape=shape)
    if max(shape) * 4 >= _OFF21:
        raise GrapesInputError(f"{{shape}}: each side must be below {_OFF21 // 4} voxels", shape=shape)
    return shape


def _check_range(name, value, lo, hi, lo_open=False, hi_open=False, fix=""):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise GrapesInputError(f"{{{name}}} is not a number{': ' + fix if fix else ''}", **{name: value}) from None
    bad = (not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise GrapesInputError(f"{{{name}}} is outside {lb}{lo}, {hi}{rb}{': ' + fix if fix else ''}", **{name: value})
    return v


# --------------------------------------------------------------------------------------------
# stage 1: particles
# --------------------------------------------------------------------------------------------


def _random_rotations(rng, n) -> np.ndarray:
    """Uniformly distributed unit quaternions (Shoemake)."""
    u1, u2, u3 = rng.random((3, n))
    q = np.stack([
        np.sqrt(u1) * np.cos(2 * np.pi * u3),
        np.sqrt(1 - u1) * np.sin(2 * np.pi * u2),
        np.sqrt(1 - u1) * np.cos(2 * np.pi * u2),
        np.sqrt(u1) * np.sin(2 * np.pi * u3),
    ], axis=1)
    q[q[:, 0] < 0] *= -1
    return q


def make_particles(
    shape: Sequence[int],
    *,
    mean_radius: float = 18.0,
    radius_spread: float = 0.2,
    ellipsoid_fraction: float = 0.3,
    aspect_range: tuple[float, float] = (1.2, 1.8),
    n_particles: int | None = None,
    packing_fraction: float = 0.55,
    min_gap: float = 0.85,
    ids: str = "sequential",
    max_id: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Place packed, touching polydisperse spheres and ellipsoids in a volume.

    Parameters
    ----------
    shape : tuple of int
        Volume shape ``(Z, Y, X)`` (3D: spheres and ellipsoids) or ``(Y, X)`` (2D: discs and
        ellipses), voxels.
    mean_radius : float
        Mean equivalent radius (radius of the sphere or disc of equal volume or area), voxels.
        The default 18 gives the paper's mean particle volume of about 25,000 voxels.
    radius_spread : float
        Relative standard deviation of the equivalent radius (log-normal), clipped to
        0.5-2 times `mean_radius`.
    ellipsoid_fraction : float
        Fraction of the particles that are ellipsoids (prolate or oblate, random orientation);
        the others are spheres.
    aspect_range : (float, float)
        Range of the ratio of the longest to the shortest semi-axis of the ellipsoids (uniform).
    n_particles : int, optional
        Exact number of particles. Raises :class:`GrapesInputError` if they do not all fit.
        Default: as many as `packing_fraction` asks for.
    packing_fraction : float
        Target sum of the particle volumes over the volume (0-0.6), used when `n_particles` is
        not given. Placement stops earlier if the packing jams; the achieved value is in
        ``df.attrs["packing_fraction"]``. The solid voxel fraction is about 0.9 times this,
        since touching particles overlap before the overlaps are split: the default 0.55 gives
        a solid fraction near 0.5 (0.52 at 800^3 with the default radii).
    min_gap : float
        Smallest centre distance, as a fraction of the sum of the two radii along the line of
        centres (0.5-1). New particles are placed against a neighbour at ``min_gap``-1 times
        that sum, so neighbours overlap by up to ``1 - min_gap`` and share flat contact faces.
    ids : {"sequential", "sparse"}
        Label ids ``1..N`` in random order, or random distinct ids in ``1..max_id``.
    max_id : int, optional
        Largest id for ``ids="sparse"`` (default ``2**31 - 1``; up to ``2**64 - 1``).
    seed : int
        Random seed; the same seed gives the same table.

    Returns
    -------
    pandas.DataFrame
        One row per particle, sorted by ``label`` (uint64): centre ``z, y, x`` (voxel index
        coordinates; may be anywhere in ``[-0.5, n - 0.5)``), ``r_eq``, semi-axes ``a, b, c``
        along the body axes with orientation quaternion ``q0..q3`` (see
        :func:`rotation_matrices`) in 3D, or semi-axes ``a, b`` and ``angle`` (radians, in the
        y-x plane, from the y axis) in 2D; ``ellipsoid`` (bool), ``volume`` (nominal volume or
        area before overlaps, voxels), ``susceptibility`` (0-1, scales the damage of
        :func:`make_truth`). ``df.attrs`` holds the parameters and the achieved packing
        fraction.
    """
    shape = _check_shape(shape)
    flat = len(shape) == 2
    mean_radius = _check_range("mean_radius", mean_radius, 2.0, min(shape),
                               fix="give a mean equivalent radius of at least 2 voxels and below the volume side")
    radius_spread = _check_range("radius_spread", radius_spread, 0.0, 1.0, hi_open=True)
    ellipsoid_fraction = _check_range("ellipsoid_fraction", ellipsoid_fraction, 0.0, 1.0)
    try:
        lo_a, hi_a = (float(v) for v in aspect_range)
    except (TypeError, ValueError):
        raise GrapesInputError(f"aspect_range={aspect_range!r}: give two numbers (min, max), e.g. (1.2, 1.8)") from None
    if not 1.0 <= lo_a <= hi_a <= 4.0:
        raise GrapesInputError(f"aspect_range={aspect_range!r}: give 1 <= min <= max <= 4")
    min_gap = _check_range("min_gap", min_gap, 0.5, 1.0)
    packing_fraction = _check_range("packing_fraction", packing_fraction, 0.0, 0.6, lo_open=True,
                                    fix="random packings jam near 0.55; use at most 0.6")
    if ids not in ("sequential", "sparse"):
        raise GrapesInputError(f"ids={ids!r}: choose 'sequential' (1..N) or 'sparse' (random ids up to max_id)")
    seed = int(seed)
    rng = np.random.default_rng(seed)
    dim = 2 if flat else 3
    space = float(np.prod(shape))
    unit = math.pi if flat else 4.0 / 3.0 * math.pi
    mean_vol = unit * mean_radius**dim
    if n_particles is not None:
        if int(n_particles) != n_particles or n_particles < 1:
            raise GrapesInputError(f"n_particles={n_particles!r}: give a positive integer")
        n_particles = int(n_particles)
        if n_particles * mean_vol > 0.6 * space:
            raise GrapesInputError(
                f"n_particles={n_particles} of mean radius {mean_radius} would fill "
                f"{n_particles * mean_vol / space:.2f} of a volume of shape {shape} (at most 0.6 fits): "
                "lower n_particles or mean_radius, or enlarge the volume"
            )
        n_draw = n_particles
    else:
        n_draw = max(1, int(packing_fraction * space / mean_vol * 1.3) + 8)
    sig = math.sqrt(math.log1p(radius_spread**2))
    r = rng.lognormal(math.log(mean_radius) - sig**2 / 2, sig, n_draw) if sig > 0 else np.full(n_draw, mean_radius)
    r = np.clip(r, 0.5 * mean_radius, 2.0 * mean_radius)
    if n_particles is None:  # keep the first radii that reach the target volume
        n_keep = int(np.searchsorted(np.cumsum(unit * r**dim), packing_fraction * space)) + 1
        r = r[: min(n_keep, n_draw)]
    n = len(r)
    is_ell = rng.random(n) < ellipsoid_fraction
    k = rng.uniform(lo_a, hi_a, n)
    prolate = rng.random(n) < 0.5
    if flat:
        axes = np.stack([r * np.where(is_ell, np.sqrt(k), 1.0), r * np.where(is_ell, 1 / np.sqrt(k), 1.0)], axis=1)
        angle = rng.uniform(0, np.pi, n) * is_ell
        full_axes = np.stack([r, axes[:, 0], axes[:, 1]], axis=1)
        qs = np.stack([np.cos(angle / 2), np.sin(angle / 2), np.zeros(n), np.zeros(n)], axis=1)
    else:
        long_ = np.where(prolate, k ** (2 / 3), k ** (1 / 3))
        mid = np.where(prolate, k ** (-1 / 3), k ** (1 / 3))
        short = np.where(prolate, k ** (-1 / 3), k ** (-2 / 3))
        ell_axes = np.stack([long_, mid, short], axis=1) * r[:, None]
        full_axes = np.where(is_ell[:, None], ell_axes, r[:, None])
        qs = _random_rotations(rng, n)
        qs[~is_ell] = (1.0, 0.0, 0.0, 0.0)
    R = rotation_matrices(qs)
    six, _ = _quad_forms(full_axes, R)
    order = np.argsort(-r, kind="stable")  # largest first
    lo = np.array([-0.5 if not flat else 0.0, -0.5, -0.5])
    hi = np.array([(shape[0] - 0.5) if not flat else 0.0, shape[-2] - 0.5, shape[-1] - 0.5])
    cen = np.zeros((n, 3))
    attempts = 200 if n_particles is not None else 60
    placed = _place(lo, hi, flat, np.ascontiguousarray(six[order]), full_axes.max(axis=1)[order],
                    r[order].copy(), min_gap, attempts, seed % (2**32), cen)
    keep = order[placed]
    centres = np.empty((n, 3))
    centres[order] = cen
    if n_particles is not None and len(keep) < n_particles:
        raise GrapesInputError(
            f"n_particles={n_particles}: only {len(keep)} particles of mean radius {mean_radius} fit "
            f"in a volume of shape {shape}: lower n_particles or mean_radius, or enlarge the volume"
        )
    keep = np.sort(keep)
    n = len(keep)
    label = _make_ids(rng, n, ids, max_id)
    vol = unit * np.prod(full_axes[keep][:, 1:] if flat else full_axes[keep], axis=1)
    cols: dict = {"label": label}
    if not flat:
        cols.update(z=centres[keep, 0])
    cols.update(y=centres[keep, 1], x=centres[keep, 2], r_eq=r[keep])
    if flat:
        cols.update(a=full_axes[keep, 1], b=full_axes[keep, 2], angle=angle[keep])
    else:
        cols.update(a=full_axes[keep, 0], b=full_axes[keep, 1], c=full_axes[keep, 2])
        cols.update(q0=qs[keep, 0], q1=qs[keep, 1], q2=qs[keep, 2], q3=qs[keep, 3])
    cols.update(ellipsoid=is_ell[keep], volume=vol, susceptibility=rng.random(n)[: n])
    df = pd.DataFrame(cols).sort_values("label", kind="stable").reset_index(drop=True)
    df.attrs = {
        "shape": list(shape), "mean_radius": mean_radius, "radius_spread": radius_spread,
        "ellipsoid_fraction": ellipsoid_fraction, "aspect_range": [lo_a, hi_a],
        "n_particles": n_particles, "packing_fraction_target": packing_fraction, "min_gap": min_gap,
        "ids": ids, "max_id": max_id, "seed": seed,
        "packing_fraction": float(vol.sum() / space),
    }
    return df


def _make_ids(rng, n: int, ids: str, max_id) -> np.ndarray:
    if ids == "sequential":
        if max_id is not None and int(max_id) < n:
            raise GrapesInputError(f"max_id={max_id} is below the number of particles {n}: raise max_id")
        return rng.permutation(np.arange(1, n + 1, dtype=np.uint64))
    top = (2**31 - 1) if max_id is None else int(max_id)
    if not n <= top <= 2**64 - 1:
        raise GrapesInputError(
            f"max_id={max_id}: give an integer from the number of particles ({n}) to 2**64 - 1"
        )
    if top < 4 * n:  # dense: a permutation of 1..top
        return rng.permutation(np.arange(1, top + 1, dtype=np.uint64))[:n]
    out = np.empty(0, dtype=np.uint64)
    while len(out) < n:
        hi_bits = rng.integers(0, 2**32, size=2 * n, dtype=np.uint64, endpoint=False)
        lo_bits = rng.integers(0, 2**32, size=2 * n, dtype=np.uint64, endpoint=False)
        draw = (hi_bits << np.uint64(32)) | lo_bits
        draw = draw % np.uint64(top) + np.uint64(1)
        out = np.unique(np.concatenate([out, draw]))
    return rng.permutation(out)[:n]


# --------------------------------------------------------------------------------------------
# stage 2: states
# --------------------------------------------------------------------------------------------


def _default_levels(n_states: int, damage: float) -> list[float]:
    """Pristine, charge (rising damage), partial healing in the last state."""
    if n_states == 1:
        return [damage]
    if n_states == 2:
        return [0.0, damage]
    ramp = [damage * s / (n_states - 2) for s in range(n_states - 1)]
    return ramp + [0.6 * damage]


def make_truth(
    particles: pd.DataFrame,
    shape: Sequence[int],
    *,
    n_states: int = 1,
    damage: float | Sequence[float] = 0.6,
    damage_gradient: float = 0.0,
    damage_axis: int = 0,
    drift: float | Sequence | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Ground truth of every particle in every operando state.

    Parameters
    ----------
    particles : pandas.DataFrame
        Table of :func:`make_particles`.
    shape : tuple of int
        Volume shape, voxels.
    n_states : int
        Number of states (scans).
    damage : float or sequence of float
        Damage level per state, 0-1. A single number: that level for one state; for several
        states, pristine (0) first, rising linearly to that level, and ``0.6 x`` that level in
        the last state (partial healing on discharge) when there are three states or more.
    damage_gradient : float
        Fraction of the damage lost from one end of `damage_axis` to the other (0-1): particles
        at the high end (far from the current collector) are damaged less.
    damage_axis : int
        Axis of the gradient (0 = z, 1 = y, 2 = x; in 2D 0 = y, 1 = x).
    drift : float or array-like, optional
        Rigid translation of the sample per state, voxels. A number: a random direction of that
        length per state (state 0 not moved); an array of shape ``(n_states, ndim)``: the
        translations themselves. Default: none.
    seed : int
        Random seed for the drift directions.

    Returns
    -------
    pandas.DataFrame
        One row per (state, particle), sorted by state then label: the columns of `particles`
        with centres moved by the drift, plus ``state``, ``damage`` (0-1, susceptibility x level x
        gradient factor), ``drift_z, drift_y, drift_x`` (voxels; no ``drift_z`` in 2D) and ``cut``
        (True if the particle's box crosses the volume border).
    """
    shape = _check_shape(shape)
    flat = len(shape) == 2
    ndim = len(shape)
    if int(n_states) != n_states or n_states < 1:
        raise GrapesInputError("{n_states}: give a positive integer", n_states=n_states)
    n_states = int(n_states)
    if np.ndim(damage) == 0:
        _check_range("damage", damage, 0.0, 1.0)
        levels = _default_levels(n_states, float(damage))
    else:
        levels = [float(v) for v in damage]
        if len(levels) != n_states:
            raise GrapesInputError(
                f"damage has {len(levels)} levels for n_states={n_states}: give one level per state"
            )
        for v in levels:
            _check_range("damage", v, 0.0, 1.0, fix="give damage levels between 0 and 1")
    damage_gradient = _check_range("damage_gradient", damage_gradient, 0.0, 1.0)
    if damage_axis not in range(ndim):
        raise GrapesInputError(f"damage_axis={damage_axis!r}: give an axis 0..{ndim - 1}")
    shifts = _drifts(drift, n_states, ndim, seed)
    axes_names = ["z", "y", "x"][-ndim:]
    missing = [c for c in axes_names + ["label", "r_eq", "susceptibility"] if c not in particles]
    if missing:
        raise GrapesInputError(f"particles lacks columns {missing}: pass the table of make_particles")
    c0 = particles[axes_names].to_numpy(float)
    if len(c0) and (np.any(c0 < -0.5) or np.any(c0 >= np.array(shape) - 0.5)):
        raise GrapesInputError(
            f"particles: some centres lie outside a volume of shape {shape}: pass the shape the particles "
            "were made for"
        )
    pos = particles[axes_names[damage_axis]].to_numpy(float)
    side = shape[damage_axis]
    factor = 1.0 - damage_gradient * np.clip((pos + 0.5) / side, 0, 1)
    sus = particles["susceptibility"].to_numpy(float)
    geo_axes, R = _geometry(particles, flat)
    _, ext = _quad_forms(geo_axes, R)
    ext = ext[:, -ndim:]
    rows = []
    for s in range(n_states):
        t = particles.copy()
        for k, name in enumerate(axes_names):
            t[name] = t[name].to_numpy(float) + shifts[s, k]
        t.insert(0, "state", s)
        t["damage"] = np.clip(levels[s] * sus * factor, 0.0, 1.0)
        for k, name in enumerate(axes_names):
            t["drift_" + name] = shifts[s, k]
        c = t[axes_names].to_numpy(float)
        t["cut"] = np.any((c - ext < -0.5) | (c + ext > np.array(shape) - 0.5), axis=1)
        rows.append(t)
    truth = pd.concat(rows, ignore_index=True)
    truth.attrs = dict(particles.attrs)
    truth.attrs.update(n_states=n_states, damage_levels=levels, damage_gradient=damage_gradient,
                       damage_axis=int(damage_axis), drift=shifts.tolist())
    return truth


def _drifts(drift, n_states: int, ndim: int, seed: int) -> np.ndarray:
    if drift is None:
        return np.zeros((n_states, ndim))
    if np.ndim(drift) == 0:
        mag = _check_range("drift", drift, 0.0, 50.0, fix="give a drift length in voxels (0-50)")
        rng = np.random.default_rng([int(seed), 0xD21F7])
        v = rng.normal(size=(n_states, ndim))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        v *= mag
        v[0] = 0.0
        return v
    arr = np.asarray(drift, dtype=float)
    if arr.shape != (n_states, ndim) or not np.all(np.isfinite(arr)) or np.abs(arr).max() > 1000:
        raise GrapesInputError(
            f"drift of shape {arr.shape}: give one finite translation per state, shape ({n_states}, {ndim}), voxels"
        )
    return arr


# --------------------------------------------------------------------------------------------
# grey model
# --------------------------------------------------------------------------------------------


_DTYPE_SCALE = {"uint8": 1.0, "uint16": 257.0, "float32": 1.0 / 255.0}


@dataclass(frozen=True)
class GreyModel:
    """Parameters of the grey levels (stages 4-6). Levels are in units of the output dtype.

    Attributes
    ----------
    dtype : {"uint8", "uint16", "float32"}
        Grey dtype. Levels left as None take uint8 defaults scaled to the dtype (x257 for
        uint16, /255 for float32).
    particle_level : float, optional
        Grey level of undamaged particle bulk (default 150 for uint8).
    pore_level : float, optional
        Grey level of the pore space between particles (default 40 for uint8).
    void_level : float, optional
        Grey level of a sub-resolution void or crack (default: `pore_level`).
    rim_width : float
        Width of the phase-contrast rim, voxels: a particle voxel at Euclidean distance ``d``
        from the nearest pore voxel gets ``rim_contrast * max(0, 1 - (d - 1) / rim_width)``.
    rim_contrast : float, optional
        Rim contrast (default +30 for uint8; negative for a dark rim; 0 for none).
    noise_sigma : float, optional
        Standard deviation of the additive Gaussian noise (default 6 for uint8).
    blur_sigma : float
        Standard deviation of the Gaussian blur, voxels (0: none), applied before the noise.
    blur_truncate : float
        Blur kernel radius in standard deviations (as :func:`scipy.ndimage.gaussian_filter`).
    supersample : int
        Sub-voxels per axis on which voids and cracks are drawn (1-4).
    core_extent : float
        Normalised radius (0-1) reached by the damage at damage 1; at damage ``d`` voids and
        cracks fill the core within ``core_extent * sqrt(d)``.
    void_fraction : float
        Void probability at the very centre of a particle at damage 1. It falls quadratically
        to 0 at the edge of the damaged core and scales with the damage.
    n_cracks : int
        Largest number of planar cracks through the core; crack ``k`` opens at damage about
        ``k / n_cracks``.
    crack_width : float
        Crack aperture, voxels (sub-resolution: < 1).
    air_thickness : int
        Empty space above the sample: the last `air_thickness` voxels along z (along y in 2D)
        hold no particle (label 0; particles are cut by its plane) and the grey level
        `air_level` plus the noise only, a flat field. 0 (default): none.
    air_level : float, optional
        Grey level of the empty space (default 25 for uint8: 4 noise sigmas above 0, so that
        clipping at 0 leaves the noise whole).
    pore_texture : float
        Texture of the pore space (binder, carbon, sub-resolution pores): a smooth random field
        added to `pore_level`, with standard normal values times `pore_texture` (grey levels)
        at the nodes of a lattice of spacing `pore_texture_scale` voxels, interpolated with
        smoothstep weights (its standard deviation is about 0.6 `pore_texture` in 3D). The
        field is fixed across states. 0 (default): a flat pore space.
    pore_texture_scale : float
        Lattice spacing of the texture, voxels (>= 1).
    offset : float
        Grey offset added to every voxel before the noise (a beam drift of one state), grey
        levels. :func:`phantom_numpy` and :func:`make_phantom` set it per state from
        ``beam_offsets``.
    """

    dtype: str = "uint8"
    particle_level: float | None = None
    pore_level: float | None = None
    void_level: float | None = None
    rim_width: float = 1.5
    rim_contrast: float | None = None
    noise_sigma: float | None = None
    blur_sigma: float = 0.0
    blur_truncate: float = 4.0
    supersample: int = 2
    core_extent: float = 0.8
    void_fraction: float = 0.3
    n_cracks: int = 3
    crack_width: float = 0.3
    air_thickness: int = 0
    air_level: float | None = None
    pore_texture: float = 0.0
    pore_texture_scale: float = 4.0
    offset: float = 0.0

    def resolved(self) -> "GreyModel":
        """A copy with the defaults filled in for the dtype, after checking every value."""
        if self.dtype not in _DTYPE_SCALE:
            raise GrapesInputError(f"dtype={self.dtype!r}: choose the grey dtype among {sorted(_DTYPE_SCALE)}")
        sc = _DTYPE_SCALE[self.dtype]
        top = {"uint8": 255.0, "uint16": 65535.0, "float32": 1e30}[self.dtype]

        def level(name, v, default):
            v = default * sc if v is None else v
            return _check_range(name, v, -top, top)

        pl = level("particle_level", self.particle_level, 150.0)
        po = level("pore_level", self.pore_level, 40.0)
        vl = po if self.void_level is None else level("void_level", self.void_level, 0.0)
        rc = level("rim_contrast", self.rim_contrast, 30.0)
        ns = _check_range("noise_sigma", 6.0 * sc if self.noise_sigma is None else self.noise_sigma, 0.0, top)
        bs = _check_range("blur_sigma", self.blur_sigma, 0.0, 20.0)
        bt = _check_range("blur_truncate", self.blur_truncate, 0.5, 10.0)
        rw = _check_range("rim_width", self.rim_width, 0.0, 8.0)
        if int(self.supersample) != self.supersample or not 1 <= self.supersample <= 4:
            raise GrapesInputError(f"supersample={self.supersample!r}: give 1, 2, 3 or 4 sub-voxels per axis")
        if int(self.n_cracks) != self.n_cracks or not 0 <= self.n_cracks <= 16:
            raise GrapesInputError(f"n_cracks={self.n_cracks!r}: give an integer 0-16")
        ce = _check_range("core_extent", self.core_extent, 0.0, 1.0)
        vf = _check_range("void_fraction", self.void_fraction, 0.0, 1.0)
        cw = _check_range("crack_width", self.crack_width, 0.0, 4.0)
        if isinstance(self.air_thickness, bool) or int(self.air_thickness) != self.air_thickness \
                or self.air_thickness < 0:
            raise GrapesInputError(f"air_thickness={self.air_thickness!r}: give a whole number of voxels >= 0")
        al = level("air_level", self.air_level, 25.0)
        pt = _check_range("pore_texture", self.pore_texture, 0.0, top)
        pts = _check_range("pore_texture_scale", self.pore_texture_scale, 1.0, 1e6)
        off = _check_range("offset", self.offset, -top, top)
        return dataclasses.replace(
            self, particle_level=pl, pore_level=po, void_level=vl, rim_contrast=rc, noise_sigma=ns,
            blur_sigma=bs, blur_truncate=bt, rim_width=rw, supersample=int(self.supersample),
            n_cracks=int(self.n_cracks), core_extent=ce, void_fraction=vf, crack_width=cw,
            air_thickness=int(self.air_thickness), air_level=al, pore_texture=pt, pore_texture_scale=pts,
            offset=off,
        )

    @property
    def rim_halo(self) -> int:
        """Label halo (voxels) that the rim needs around a chunk."""
        if self.rim_contrast == 0 or self.rim_width == 0:
            return 0
        return int(math.ceil(1.0 + self.rim_width))

    @property
    def blur_radius(self) -> int:
        """Kernel radius of the blur, as scipy computes it: ``int(truncate * sigma + 0.5)``."""
        return int(self.blur_truncate * self.blur_sigma + 0.5) if self.blur_sigma > 0 else 0


_GREY_FIELDS = {f.name for f in dataclasses.fields(GreyModel)}


def _grey_model(grey_dtype, options: dict) -> GreyModel:
    unknown = sorted(set(options) - _GREY_FIELDS)
    if unknown:
        raise GrapesInputError(
            f"unknown option(s) {unknown}: grey options are {sorted(_GREY_FIELDS - {'dtype'})} and grey_dtype"
        )
    try:
        name = np.dtype(grey_dtype).name
    except TypeError:
        name = str(grey_dtype)
    return GreyModel(dtype=name, **options).resolved()


# --------------------------------------------------------------------------------------------
# stages 3-4: chunk rendering kernels (numba, nogil)
# --------------------------------------------------------------------------------------------

# columns of the per-particle parameter array P
_CZ, _CY, _CX, _MZZ, _MYY, _MXX, _MZY, _MZX, _MYX, _R2, _EZ, _EY, _EX = range(13)
_DMG, _RHOD, _PCORE, _INVA, _NACT, _RANK = range(13, 19)
_NP = 19


@numba.njit(nogil=True, cache=True)
def _owner(oz, oy, ox, nz, ny, nx, P):
    """Index (into P) of the particle owning each voxel of a box; -1 for pore."""
    idx = -np.ones((nz, ny, nx), dtype=np.int32)
    best = np.zeros((nz, ny, nx), dtype=np.float64)
    for i in range(P.shape[0]):
        cz, cy, cx = P[i, _CZ], P[i, _CY], P[i, _CX]
        A = P[i, _MXX]
        z0 = max(oz, int(math.ceil(cz - P[i, _EZ] - 1.0)))
        z1 = min(oz + nz - 1, int(math.floor(cz + P[i, _EZ] + 1.0)))
        y0 = max(oy, int(math.ceil(cy - P[i, _EY] - 1.0)))
        y1 = min(oy + ny - 1, int(math.floor(cy + P[i, _EY] + 1.0)))
        r2 = P[i, _R2]
        rank = P[i, _RANK]
        for z in range(z0, z1 + 1):
            dz = z - cz
            for y in range(y0, y1 + 1):
                dy = y - cy
                B = 2.0 * (P[i, _MZX] * dz + P[i, _MYX] * dy)
                C = P[i, _MZZ] * dz * dz + 2.0 * P[i, _MZY] * dz * dy + P[i, _MYY] * dy * dy
                disc = B * B - 4.0 * A * (C - 1.0)
                if disc < 0.0:
                    continue
                sq = math.sqrt(disc)
                x0 = max(ox, int(math.floor(cx + (-B - sq) / (2.0 * A))) - 1)
                x1 = min(ox + nx - 1, int(math.ceil(cx + (-B + sq) / (2.0 * A))) + 1)
                for x in range(x0, x1 + 1):
                    dx = x - cx
                    s2 = A * dx * dx + B * dx + C
                    if s2 <= 1.0:
                        w = r2 * (s2 - 1.0)
                        v = idx[z - oz, y - oy, x - ox]
                        if v < 0 or w < best[z - oz, y - oy, x - ox] or (
                                w == best[z - oz, y - oy, x - ox] and rank < P[v, _RANK]):
                            idx[z - oz, y - oy, x - ox] = i
                            best[z - oz, y - oy, x - ox] = w
    return idx


@numba.njit(nogil=True, cache=True)
def _labels_of(idx, ids, out):
    nz, ny, nx = idx.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                i = idx[z, y, x]
                out[z, y, x] = 0 if i < 0 else ids[i]
    return out


@numba.njit(nogil=True, cache=True)
def _pore_dist2(idx, hz, hy, hx, R, Rz):
    """Squared distance from each core voxel to the nearest pore voxel, exact up to R, else BIG."""
    ez, ey, ex = idx.shape
    nz, ny, nx = ez - 2 * hz, ey - 2 * hy, ex - 2 * hx
    big = _BIG
    f1 = np.empty((ez, ey, nx), dtype=np.int32)
    for z in range(ez):
        for y in range(ey):
            last = -(1 << 20)
            for x in range(ex):  # forward: distance to the pore voxel on the left
                if idx[z, y, x] < 0:
                    last = x
                if hx <= x < hx + nx:
                    d = x - last
                    f1[z, y, x - hx] = d * d if d <= R else big
            last = 1 << 20
            for x in range(ex - 1, -1, -1):
                if idx[z, y, x] < 0:
                    last = x
                if hx <= x < hx + nx:
                    d = last - x
                    if d <= R and d * d < f1[z, y, x - hx]:
                        f1[z, y, x - hx] = d * d
    # windowed minima along y then z (row-wise, so that numba vectorises the inner loop);
    # BIG + k*k stays below 2**31, so "far" values need no special case
    f2 = np.empty((ez, ny, nx), dtype=np.int32)
    for z in range(ez):
        for y in range(ny):
            row = f2[z, y]
            row[:] = big
            for k in range(-R, R + 1):
                src = f1[z, y + hy + k]
                kk = k * k
                for x in range(nx):
                    v = src[x] + kk
                    if v < row[x]:
                        row[x] = v
    f3 = np.empty((nz, ny, nx), dtype=np.int32)
    for z in range(nz):
        for y in range(ny):
            row = f3[z, y]
            row[:] = big
            for k in range(-Rz, Rz + 1):
                src = f2[z + hz + k, y]
                kk = k * k
                for x in range(nx):
                    v = src[x] + kk
                    if v < row[x]:
                        row[x] = v
    return f3


@numba.njit(nogil=True, cache=True)
def _grey_kernel(idx, hz, hy, hx, oz, oy, ox, P, salts, normals, cfg, ss, ssz, shift, d2):
    """Clean grey (before blur and noise) of the core block, float32."""
    pl, po, vl, rim_w, rim_c, half_w = cfg[0], cfg[1], cfg[2], cfg[3], cfg[4], cfg[5]
    use_rim = d2.shape[0] > 0
    ez, ey, ex = idx.shape
    nz, ny, nx = ez - 2 * hz, ey - 2 * hy, ex - 2 * hx
    out = np.empty((nz, ny, nx), dtype=np.float32)
    nsub = ss * ss * ssz
    inv_ss = 1.0 / ss
    for z in range(nz):
        Z = oz + z
        for y in range(ny):
            Y = oy + y
            for x in range(nx):
                X = ox + x
                i = idx[z + hz, y + hy, x + hx]
                if i < 0:
                    out[z, y, x] = po
                    continue
                g = pl
                if P[i, _DMG] > 0.0:
                    cz, cy, cx = P[i, _CZ], P[i, _CY], P[i, _CX]
                    rd = P[i, _RHOD]
                    dz, dy, dx = Z - cz, Y - cy, X - cx
                    s2 = (P[i, _MZZ] * dz * dz + P[i, _MYY] * dy * dy + P[i, _MXX] * dx * dx
                          + 2.0 * (P[i, _MZY] * dz * dy + P[i, _MZX] * dz * dx + P[i, _MYX] * dy * dx))
                    lim = rd + 0.8661 * P[i, _INVA]
                    if s2 < lim * lim:
                        rd2 = rd * rd
                        nact = int(P[i, _NACT])
                        pc = P[i, _PCORE]
                        salt = salts[i]
                        nvoid = 0
                        for kz in range(ssz):
                            qz = dz + ((kz + 0.5) / ssz - 0.5 if ssz > 1 else 0.0)
                            lz = Z * ssz + kz - shift[0]
                            for ky in range(ss):
                                qy = dy + (ky + 0.5) * inv_ss - 0.5
                                ly = Y * ss + ky - shift[1]
                                for kx in range(ss):
                                    qx = dx + (kx + 0.5) * inv_ss - 0.5
                                    q2 = (P[i, _MZZ] * qz * qz + P[i, _MYY] * qy * qy + P[i, _MXX] * qx * qx
                                          + 2.0 * (P[i, _MZY] * qz * qy + P[i, _MZX] * qz * qx
                                                   + P[i, _MYX] * qy * qx))
                                    if q2 >= rd2:
                                        continue
                                    void = False
                                    for k in range(nact):
                                        if abs(normals[i, k, 0] * qz + normals[i, k, 1] * qy
                                               + normals[i, k, 2] * qx) < half_w:
                                            void = True
                                            break
                                    if not void:
                                        t = 1.0 - math.sqrt(q2) / rd
                                        p = pc * t * t
                                        lx = X * ss + kx - shift[2]
                                        void = _unit(_mix(_pack(lz, ly, lx) ^ salt)) < p
                                    if void:
                                        nvoid += 1
                        if nvoid > 0:
                            phi = nvoid / nsub
                            g = pl + (vl - pl) * phi
                if use_rim:
                    e = d2[z, y, x]
                    if e < _BIG:
                        w = 1.0 - (math.sqrt(e) - 1.0) / rim_w
                        if w > 0.0:
                            g += rim_c * w
                out[z, y, x] = g
    return out


_NORMAL_TABLE: list = []


def _normal_table() -> np.ndarray:
    """Standard normal quantiles at the 2**16 mid-points ``(k + 0.5) / 2**16``: a Gaussian
    deviate is one table look-up by the top 16 bits of a hash (tails to +-4.3 sigma)."""
    if not _NORMAL_TABLE:
        from scipy.special import ndtri

        _NORMAL_TABLE.append(ndtri((np.arange(1 << 16) + 0.5) / (1 << 16)))
    return _NORMAL_TABLE[0]


@numba.njit(nogil=True, cache=True)
def _noise_quantize(g, oz, oy, ox, salt, sigma, lo, hi, rounding, table, out):
    nz, ny, nx = g.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                v = np.float64(g[z, y, x])
                if sigma > 0.0:
                    h = _mix(_pack(oz + z, oy + y, ox + x) ^ salt)
                    v += sigma * table[h >> _U64(48)]
                if rounding:
                    v = np.rint(v)
                    v = min(max(v, lo), hi)
                out[z, y, x] = v
    return out


@numba.njit(nogil=True, cache=True)
def _crack_normals(salts, n_cracks, thresholds_out, normals_out):
    """Per-particle crack plane normals and opening thresholds from the particle's hash salt."""
    for i in range(salts.shape[0]):
        for k in range(n_cracks):
            h = _mix(salts[i] ^ _U64(0xC7AC << 8 | k))
            thresholds_out[i, k] = (k + _unit(h)) / n_cracks
            nn = 0.0
            for j in range(3):
                h = _mix(h)
                u1 = (float(h >> _U64(40)) + 0.5) * (1.0 / 16777216.0)
                u2 = float((h >> _U64(16)) & _U64(0xFFFFFF)) * (1.0 / 16777216.0)
                v = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
                normals_out[i, k, j] = v
                nn += v * v
            nn = math.sqrt(nn)
            for j in range(3):
                normals_out[i, k, j] /= nn


# --------------------------------------------------------------------------------------------
# stages 3-6: lazy arrays
# --------------------------------------------------------------------------------------------


def _cut_air(idx, origin, air):
    """No particle in the empty space: index -1 (pore) where the global coordinate along the
    air axis is at or beyond its start. `air` is None or ``(axis, start, level, texture,
    scale, salt)``."""
    if air is None:
        return idx
    ax, start = air[0], air[1]
    k = start - int(origin[ax])
    if k < idx.shape[ax]:
        sl = [slice(None)] * 3
        sl[ax] = slice(max(k, 0), None)
        idx[tuple(sl)] = -1
    return idx


def _render_labels(P, ids, origin, shape, label_dtype, air=None):
    idx = _owner(origin[0], origin[1], origin[2], shape[0], shape[1], shape[2], P)
    idx = _cut_air(idx, origin, air)
    return _labels_of(idx, ids, np.empty(shape, dtype=label_dtype))


@numba.njit(nogil=True, cache=True)
def _texture_add(out, pore, oz, oy, ox, amp, scale, salt, table, flat):
    """Add a smooth random field to the pore voxels of `out`: standard normal node values
    (hashed from the global lattice node and `salt`) times `amp` on a lattice of spacing
    `scale` voxels, interpolated with smoothstep weights. A pure function of global
    coordinates, so the same whatever the chunking."""
    nz, ny, nx = out.shape
    inv = 1.0 / scale
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                if not pore[z, y, x]:
                    continue
                uz = 0.0 if flat else (oz + z) * inv
                uy = (oy + y) * inv
                ux = (ox + x) * inv
                iz, iy, ix = math.floor(uz), math.floor(uy), math.floor(ux)
                fz, fy, fx = uz - iz, uy - iy, ux - ix
                wz = fz * fz * (3.0 - 2.0 * fz)
                wy = fy * fy * (3.0 - 2.0 * fy)
                wx = fx * fx * (3.0 - 2.0 * fx)
                v = 0.0
                for dz in range(2):
                    cz = wz if dz else 1.0 - wz
                    if cz == 0.0:
                        continue
                    for dy in range(2):
                        cy = wy if dy else 1.0 - wy
                        for dx in range(2):
                            cx = wx if dx else 1.0 - wx
                            h = _mix(_pack(np.int64(iz + dz), np.int64(iy + dy), np.int64(ix + dx)) ^ salt)
                            v += cz * cy * cx * table[h >> _U64(48)]
                out[z, y, x] += np.float32(amp * v)
    return out


def _clean_grey(P, salts, normals, origin, shape, halo, cfg, ss, ssz, shift, rim, flat, air=None):
    """Grey before blur and noise (float32) of the box `origin`, `shape`."""
    h = np.array(halo)
    eo = np.asarray(origin) - h
    es = np.asarray(shape) + 2 * h
    idx = _owner(eo[0], eo[1], eo[2], es[0], es[1], es[2], P)
    idx = _cut_air(idx, eo, air)
    if rim:
        R = int(halo[1])
        d2 = _pore_dist2(idx, halo[0], halo[1], halo[2], R, 0 if flat else R)
    else:
        d2 = np.empty((0, 0, 0), dtype=np.int32)
    out = _grey_kernel(idx, halo[0], halo[1], halo[2], origin[0], origin[1], origin[2], P, salts, normals,
                       cfg, ss, ssz, shift, d2)
    if air is None:
        return out
    ax, start, level, texture, scale, salt = air
    core = idx[halo[0]:halo[0] + shape[0], halo[1]:halo[1] + shape[1], halo[2]:halo[2] + shape[2]]
    pore = core < 0
    zz = np.arange(shape[ax]) + int(origin[ax])
    in_air = (zz >= start).reshape([-1 if a == ax else 1 for a in range(3)])
    if texture > 0:
        _texture_add(out, pore & ~in_air, int(origin[0]), int(origin[1]), int(origin[2]), float(texture),
                     float(scale), salt, _normal_table(), bool(flat))
    if start < int(origin[ax]) + shape[ax]:
        out[np.broadcast_to(in_air, out.shape)] = np.float32(level)
    return out


def _render_grey(P, salts, normals, origin, shape, halo, cfg, ss, ssz, shift, rim, noise, flat, blur, shape3,
                 air=None, offset=0.0):
    """Grey of one chunk: a pure function of its particles, origin and parameters.

    With a blur, the chunk grown by the kernel radius is rendered, mirrored where it leaves the
    volume (as scipy's ``mode="reflect"``), filtered and cropped: this equals the filter of the
    whole volume, with memory bounded by the chunk.
    """
    if blur is None:
        g = _clean_grey(P, salts, normals, origin, shape, halo, cfg, ss, ssz, shift, rim, flat, air)
    else:
        from scipy import ndimage

        radius, sigma, truncate = blur
        o, n, full = np.asarray(origin), np.asarray(shape), np.asarray(shape3)
        lo = np.maximum(o - radius, 0)
        hi = np.minimum(o + n + radius, full)
        g = _clean_grey(P, salts, normals, tuple(lo), tuple(hi - lo), halo, cfg, ss, ssz, shift, rim, flat, air)
        pad = [(int(a), int(b)) for a, b in zip(lo - (o - radius), (o + n + radius) - hi)]
        if any(a or b for a, b in pad):
            g = np.pad(g, pad, mode="symmetric")  # = scipy's "reflect" at the volume faces
        g = ndimage.gaussian_filter(g, sigma, mode="reflect", truncate=truncate)
        g = np.ascontiguousarray(g[tuple(slice(r, r + k) for r, k in zip(radius, shape))])
    if offset:
        g = g + np.float32(offset)
    salt, sigma, lo_, hi_, dtype = noise
    return _noise_quantize(g, origin[0], origin[1], origin[2], salt, sigma, lo_, hi_, dtype != "float32",
                           _normal_table(), np.empty(shape, dtype=dtype))


def _smallest_label_dtype(max_id: int) -> str:
    for t in ("uint16", "uint32", "uint64"):
        if max_id <= np.iinfo(t).max:
            return t
    raise GrapesInputError(f"label id {max_id} does not fit in 64 bits")


def _check_label_dtype(label_dtype, max_id: int) -> str:
    if label_dtype is None:
        return _smallest_label_dtype(max_id)
    try:
        name = np.dtype(label_dtype).name
    except TypeError:
        name = str(label_dtype)
    if name not in ("uint16", "uint32", "uint64"):
        raise GrapesInputError(f"label_dtype={label_dtype!r}: choose uint16, uint32 or uint64")
    if max_id > np.iinfo(name).max:
        raise GrapesInputError(
            f"label_dtype={name}: the largest label id {max_id} does not fit (max {np.iinfo(name).max}); "
            f"choose {_smallest_label_dtype(max_id)} or fewer/smaller ids"
        )
    return name


def _chunks3(chunks, shape3: tuple, flat: bool) -> tuple:
    if np.isscalar(chunks):
        c = (int(chunks),) * (2 if flat else 3)
    else:
        c = tuple(int(v) for v in chunks)
    if len(c) != (2 if flat else 3) or any(v < 1 for v in c):
        raise GrapesInputError(f"chunks={chunks!r}: give one positive chunk side or one per axis")
    c = ((1,) + c) if flat else c
    return tuple(min(v, n) for v, n in zip(c, shape3))


def _state_rows(truth: pd.DataFrame, state: int) -> pd.DataFrame:
    if "state" in truth:
        rows = truth[truth["state"] == state]
        if rows.empty:
            raise GrapesInputError(
                f"state={state}: the truth table holds states {sorted(truth['state'].unique().tolist())}"
            )
        return rows
    if state != 0:
        raise GrapesInputError(f"state={state}: a particle table without a 'state' column has only state 0")
    return truth


def phantom_arrays(
    shape: Sequence[int],
    particles: pd.DataFrame,
    *,
    state: int = 0,
    chunks=128,
    seed: int = 0,
    label_dtype=None,
    grey_dtype="uint8",
    **grey_options,
) -> tuple[da.Array, da.Array]:
    """Lazy grey and label volumes of one state of a phantom.

    Parameters
    ----------
    shape : tuple of int
        Volume shape ``(Z, Y, X)`` or ``(Y, X)``, voxels.
    particles : pandas.DataFrame
        Truth table of :func:`make_truth` (the rows of `state` are used), or a particle table of
        :func:`make_particles` (damage from its ``damage`` column if any, else 0).
    state : int
        State to render.
    chunks : int or tuple of int
        Chunk shape of the dask arrays, voxels.
    seed : int
        Seed of the hash fields (voids, cracks, noise).
    label_dtype : {None, "uint16", "uint32", "uint64"}
        Label dtype; None: the smallest that holds the largest id.
    grey_dtype : {"uint8", "uint16", "float32"}
        Grey dtype.
    **grey_options
        Fields of :class:`GreyModel` (levels, rim, noise, blur, voids and cracks).

    Returns
    -------
    grey, labels : dask.array.Array
        Arrays of shape `shape` and chunks `chunks`; each chunk is computed independently from
        the particles whose boxes meet it. The grey tasks render the labels they need
        themselves (with a halo for the rim), so the two arrays can be computed or stored one
        after the other.
    """
    shape = _check_shape(shape)
    flat = len(shape) == 2
    shape3 = ((1,) + shape) if flat else shape
    model = _grey_model(grey_dtype, grey_options)
    rows = _state_rows(particles, int(state))
    c3 = _chunks3(chunks, shape3, flat)
    max_id = int(rows["label"].max()) if len(rows) else 1
    ldt = _check_label_dtype(label_dtype, max_id)
    ids = rows["label"].to_numpy().astype(np.uint64)
    if len(np.unique(ids)) != len(ids) or (len(ids) and ids.min() == 0):
        raise GrapesInputError("particles: label ids must be unique and >= 1")
    if model.blur_radius > min(shape):
        raise GrapesInputError(
            f"blur_sigma={model.blur_sigma}: the blur radius {model.blur_radius} exceeds the volume side; "
            "use a smaller blur"
        )
    n = len(rows)
    axes, R = _geometry(rows, flat)
    six, ext = _quad_forms(axes, R)
    cen = _centres(rows, flat)
    dmg = rows["damage"].to_numpy(float) if "damage" in rows else np.zeros(n)
    salts = _salts(_seed64(seed), _STREAM_VOID, ids)
    ncr = model.n_cracks
    thr = np.zeros((n, max(ncr, 1)))
    normals = np.zeros((n, max(ncr, 1), 3))
    if ncr:
        _crack_normals(_salts(_seed64(seed), _STREAM_CRACK, ids), ncr, thr, normals)
    if flat:  # cracks are lines in the y-x plane
        normals[:, :, 0] = 0.0
        nn = np.linalg.norm(normals, axis=2, keepdims=True)
        normals = np.divide(normals, nn, out=np.zeros_like(normals), where=nn > 0)
    P = np.zeros((n, _NP))
    P[:, _CZ:_CX + 1] = cen
    P[:, _MZZ:_MYX + 1] = six
    P[:, _R2] = rows["r_eq"].to_numpy(float) ** 2
    P[:, _EZ:_EX + 1] = ext
    if flat:
        P[:, _EZ] = 0.0
    P[:, _DMG] = dmg
    P[:, _RHOD] = model.core_extent * np.sqrt(dmg)
    P[:, _PCORE] = model.void_fraction * dmg
    P[:, _INVA] = 1.0 / (axes[:, 1:] if flat else axes).min(axis=1)
    P[:, _NACT] = (thr[:, :ncr] <= dmg[:, None]).sum(axis=1) if ncr else 0
    P[:, _RANK] = np.arange(n)
    order = np.argsort(thr[:, :ncr], axis=1) if ncr else None
    if ncr:  # active cracks first
        normals = np.take_along_axis(normals, order[:, :, None], axis=1)
    ss = model.supersample
    ssz = 1 if flat else ss
    drift = np.array([rows[f"drift_{a}"].iloc[0] if f"drift_{a}" in rows and n else 0.0
                      for a in ("z", "y", "x")])
    shift = np.rint(drift * np.array([ssz, ss, ss])).astype(np.int64)
    rim = model.rim_halo > 0
    hz = 0 if flat or not rim else model.rim_halo
    hy = model.rim_halo if rim else 0
    halo = (hz, hy, hy)
    cfg = np.array([model.particle_level, model.pore_level, model.void_level, max(model.rim_width, 1e-9),
                    model.rim_contrast, model.crack_width / 2.0])
    lo, hi = ((0.0, 255.0) if model.dtype == "uint8" else (0.0, 65535.0) if model.dtype == "uint16"
              else (-np.inf, np.inf))
    noise_salt = np.uint64(_salts(_seed64(seed), _STREAM_NOISE, np.array([int(state)], dtype=np.uint64))[0])
    noise = (noise_salt, float(model.noise_sigma), lo, hi, model.dtype)
    air = None
    if model.air_thickness > 0 or model.pore_texture > 0:
        ax = 1 if flat else 0
        if model.air_thickness >= shape3[ax]:
            raise GrapesInputError(f"air_thickness={model.air_thickness}: the volume has {shape3[ax]} voxels along "
                                   f"{'y' if flat else 'z'}; give a thinner empty space")
        tex_salt = np.uint64(_salts(_seed64(seed), _STREAM_TEXTURE, np.array([0], dtype=np.uint64))[0])
        air = (ax, int(shape3[ax] - model.air_thickness), float(model.air_level), float(model.pore_texture),
               float(model.pore_texture_scale), tex_salt)

    blur = None
    if model.blur_sigma > 0:
        r = model.blur_radius
        blur = (np.array([0 if flat else r, r, r]),
                (0.0, model.blur_sigma, model.blur_sigma) if flat else model.blur_sigma, model.blur_truncate)

    # spatial index: chunk -> particles whose boxes (grown by the halo) meet the chunk
    grid = [range(0, s, c) for s, c in zip(shape3, c3)]
    nb = [len(g) for g in grid]
    pad = np.array(halo, dtype=float) + 1.0 + (0 if blur is None else blur[0])
    lo_b = np.floor(cen - ext - pad).astype(np.int64)
    hi_b = np.ceil(cen + ext + pad).astype(np.int64)
    c3a = np.array(c3)
    b0 = np.clip(lo_b // c3a, 0, np.array(nb) - 1)
    b1 = np.clip(hi_b // c3a, 0, np.array(nb) - 1)
    inside = np.all((hi_b >= 0) & (lo_b < np.array(shape3)), axis=1)
    members: dict = {}
    for i in np.flatnonzero(inside):
        for bz in range(b0[i, 0], b1[i, 0] + 1):
            for by in range(b0[i, 1], b1[i, 1] + 1):
                for bx in range(b0[i, 2], b1[i, 2] + 1):
                    members.setdefault((bz, by, bx), []).append(i)
    lab_blocks = np.empty(nb, dtype=object)
    grey_blocks = np.empty(nb, dtype=object)
    ids_l = ids.astype(ldt)
    render_l = dask.delayed(_render_labels, pure=True)
    render_g = dask.delayed(_render_grey, pure=True)
    for bz, z0 in enumerate(grid[0]):
        for by, y0 in enumerate(grid[1]):
            for bx, x0 in enumerate(grid[2]):
                sel = np.array(members.get((bz, by, bx), []), dtype=np.int64)
                origin = (z0, y0, x0)
                bshape = tuple(min(c, s - o) for c, s, o in zip(c3, shape3, origin))
                Ps = np.ascontiguousarray(P[sel])
                Ps[:, _RANK] = sel  # global rank: ties broken the same way in every chunk
                lab = render_l(Ps, ids_l[sel], origin, bshape, ldt, air)
                lab_blocks[bz, by, bx] = da.from_delayed(lab, bshape, dtype=ldt)
                grey = render_g(Ps, salts[sel], np.ascontiguousarray(normals[sel]), origin, bshape, halo, cfg,
                                ss, ssz, shift, rim, noise, flat, blur, shape3, air, float(model.offset))
                grey_blocks[bz, by, bx] = da.from_delayed(grey, bshape, dtype=model.dtype)
    labels = da.block(lab_blocks.tolist())
    grey = da.block(grey_blocks.tolist())
    if flat:
        grey, labels = grey[0], labels[0]
    return grey, labels


# --------------------------------------------------------------------------------------------
# convenience and output
# --------------------------------------------------------------------------------------------

_PARTICLE_OPTS = set(inspect.signature(make_particles).parameters) - {"shape", "seed"}
_TRUTH_OPTS = set(inspect.signature(make_truth).parameters) - {"particles", "shape", "seed", "n_states"}


def _split_options(options: dict):
    p = {k: v for k, v in options.items() if k in _PARTICLE_OPTS}
    t = {k: v for k, v in options.items() if k in _TRUTH_OPTS}
    g = {k: v for k, v in options.items() if k not in _PARTICLE_OPTS and k not in _TRUTH_OPTS}
    unknown = sorted(set(g) - _GREY_FIELDS)
    if unknown:
        raise GrapesInputError(
            f"unknown option(s) {unknown}: valid options are particle options {sorted(_PARTICLE_OPTS)}, "
            f"state options {sorted(_TRUTH_OPTS)} and grey options {sorted(_GREY_FIELDS - {'dtype'})}"
        )
    return p, t, g


def _beam_offsets(beam_offsets, n_states: int) -> list:
    """One grey offset per state (grey levels), checked."""
    if beam_offsets is None:
        return [0.0] * n_states
    try:
        arr = np.asarray(beam_offsets, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.size != n_states or not np.all(np.isfinite(arr)):
        raise GrapesInputError(f"beam_offsets={beam_offsets!r}: give one finite grey offset per state ({n_states})")
    return [float(v) for v in arr]


def _placement_shape(shape: tuple, g_opts: dict) -> tuple:
    """The box particles are placed in: the volume less its empty space (air_thickness)."""
    t = g_opts.get("air_thickness", 0) or 0
    if isinstance(t, bool) or int(t) != t or t < 0:
        raise GrapesInputError(f"air_thickness={t!r}: give a whole number of voxels >= 0")
    if t <= 0:
        return shape
    if t >= shape[0]:
        raise GrapesInputError(f"air_thickness={t}: the volume has {shape[0]} voxels along its first axis; give a "
                               "thinner empty space")
    return (shape[0] - int(t),) + tuple(shape[1:])


def _truth_extras(truth: pd.DataFrame, model: "GreyModel", shape: tuple, offsets: list) -> None:
    """Record the true noise, the empty-space box and the beam offsets in ``truth.attrs``."""
    t = model.air_thickness
    box = None if t == 0 else [[int(shape[0] - t), int(shape[0])]] + [[0, int(n)] for n in shape[1:]]
    truth.attrs["noise_sigma"] = float(model.noise_sigma)
    truth.attrs["air_box"] = box
    truth.attrs["air_level"] = float(model.air_level) if t else None
    truth.attrs["pore_texture"] = float(model.pore_texture)
    truth.attrs["beam_offsets"] = list(offsets)


def phantom_numpy(
    shape: Sequence[int] = (64, 64, 64),
    *,
    n_states: int = 1,
    seed: int = 0,
    chunks=64,
    label_dtype=None,
    grey_dtype="uint8",
    beam_offsets=None,
    **options,
):
    """Small phantom in memory (tests, examples).

    Parameters
    ----------
    shape, n_states, seed, chunks, label_dtype, grey_dtype, beam_offsets
        As for :func:`make_phantom`.
    **options
        Options of :func:`make_particles`, :func:`make_truth` and :class:`GreyModel`.

    Returns
    -------
    grey, labels : numpy.ndarray
        Shape `shape` for one state, ``(n_states, *shape)`` for several.
    truth : pandas.DataFrame
        Table of :func:`make_truth`; ``attrs`` also hold ``noise_sigma`` (the true noise, grey
        levels, before rounding), ``air_box`` (the empty space, ``[start, stop]`` per axis, or
        None), ``air_level``, ``pore_texture`` and ``beam_offsets``.
    """
    shape = _check_shape(shape)
    p_opts, t_opts, g_opts = _split_options(options)
    offsets = _beam_offsets(beam_offsets, int(n_states))
    model = _grey_model(grey_dtype, {**g_opts, "offset": 0.0})
    particles = make_particles(_placement_shape(shape, g_opts), seed=seed, **p_opts)
    truth = make_truth(particles, shape, n_states=n_states, seed=seed, **t_opts)
    pairs = [phantom_arrays(shape, truth, state=s, chunks=chunks, seed=seed, label_dtype=label_dtype,
                            grey_dtype=grey_dtype, **{**g_opts, **({"offset": offsets[s]} if offsets[s] else {})})
             for s in range(n_states)]
    _truth_extras(truth, model, shape, offsets)
    out = dask.compute(*[a for pair in pairs for a in pair])
    grey, labels = out[0::2], out[1::2]
    if n_states == 1:
        return grey[0], labels[0], truth
    return np.stack(grey), np.stack(labels), truth


@dataclass
class Phantom:
    """A phantom written by :func:`make_phantom`.

    Attributes
    ----------
    out_dir : pathlib.Path
        Output folder.
    grey, labels : list of pathlib.Path
        Zarr stores, one per state.
    truth : pandas.DataFrame
        Ground truth (see :func:`make_truth`), also in `truth_path`.
    truth_path, params_path : pathlib.Path
        ``truth.csv`` and ``phantom.json``.
    parameters : dict
        Every parameter and the seed, as stored in ``phantom.json``.
    """

    out_dir: Path
    grey: list[Path]
    labels: list[Path]
    truth: pd.DataFrame
    truth_path: Path
    params_path: Path
    parameters: dict = field(default_factory=dict)

    def paths(self) -> list[Path]:
        """Every file and store written, grey and labels by state, then truth and parameters."""
        out = []
        for g, lab in zip(self.grey, self.labels):
            out += [g, lab]
        return out + [self.truth_path, self.params_path]

    def open(self, state: int = 0) -> tuple[da.Array, da.Array]:
        """(grey, labels) of `state` as dask arrays read from the Zarr stores."""
        from .io import open_volume

        return open_volume(self.grey[state]), open_volume(self.labels[state])


def _output_names(n_states: int) -> tuple[list[str], list[str]]:
    if n_states == 1:
        return ["grey.zarr"], ["labels.zarr"]
    return [f"grey_s{s}.zarr" for s in range(n_states)], [f"labels_s{s}.zarr" for s in range(n_states)]


def make_phantom(
    out_dir: str | os.PathLike,
    *,
    shape: Sequence[int] = (256, 256, 256),
    n_states: int = 1,
    seed: int = 0,
    chunks=128,
    label_dtype=None,
    grey_dtype="uint8",
    spacing: Sequence[float] | None = None,
    unit: str = "voxel",
    particles: pd.DataFrame | None = None,
    overwrite: bool = False,
    progress: bool = False,
    scheduler=None,
    beam_offsets=None,
    **options,
) -> Phantom:
    """Generate a phantom chunk by chunk into Zarr stores, with its ground truth.

    Parameters
    ----------
    out_dir : path
        Output folder (created if missing). Written there: ``grey.zarr`` and ``labels.zarr``
        for one state, ``grey_s0.zarr``, ``labels_s0.zarr``, ``grey_s1.zarr``, ... for several;
        ``truth.csv`` (see :func:`make_truth`) and ``phantom.json`` (all parameters, seed,
        provenance).
    shape : tuple of int
        Volume shape ``(Z, Y, X)`` or ``(Y, X)``, voxels.
    n_states : int
        Number of operando states.
    seed : int
        Seed: the same seed and parameters give bitwise identical outputs, whatever `chunks`.
    chunks : int or tuple of int
        Zarr chunk shape, voxels (also the unit of work; memory is a few chunks per thread).
    label_dtype : {None, "uint16", "uint32", "uint64"}
        Label dtype; None: the smallest that holds the largest id.
    grey_dtype : {"uint8", "uint16", "float32"}
        Grey dtype.
    spacing : sequence of float, optional
        Voxel size per axis, stored in the Zarr attributes (default 1 per axis).
    unit : str
        Unit of `spacing`.
    particles : pandas.DataFrame, optional
        Particle table of :func:`make_particles` to use instead of placing new particles.
    overwrite : bool
        Replace existing outputs (and remove the grey and label stores of a previous phantom
        with another number of states); otherwise existing outputs raise
        :class:`GrapesInputError` before anything is computed.
    progress : bool
        Show a progress bar per store.
    scheduler : optional
        Dask scheduler (default: the current one, threads).
    beam_offsets : sequence of float, optional
        One grey offset per state, grey levels, added to every voxel before the noise (a beam
        drift; :class:`GreyModel` ``offset``). Default: none.
    **options
        Options of :func:`make_particles` (``mean_radius``, ``radius_spread``,
        ``ellipsoid_fraction``, ``aspect_range``, ``n_particles``, ``packing_fraction``,
        ``min_gap``, ``ids``, ``max_id``), of :func:`make_truth` (``damage``,
        ``damage_gradient``, ``damage_axis``, ``drift``) and of :class:`GreyModel`.

    Returns
    -------
    Phantom
    """
    from .io import atomic_output, provenance, write_zarr

    shape = _check_shape(shape)
    if int(n_states) != n_states or n_states < 1:
        raise GrapesInputError("{n_states}: give a positive integer", n_states=n_states)
    n_states = int(n_states)
    p_opts, t_opts, g_opts = _split_options(options)
    model = _grey_model(grey_dtype, g_opts)
    offsets = _beam_offsets(beam_offsets, n_states)
    _chunks3(chunks, ((1,) + shape) if len(shape) == 2 else shape, len(shape) == 2)
    if spacing is None:
        spacing = (1.0,) * len(shape)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != len(shape) or any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise GrapesInputError(f"spacing={spacing}: give {len(shape)} positive voxel sizes (z y x)")
    out_dir = Path(out_dir)
    grey_names, label_names = _output_names(n_states)
    names = grey_names + label_names + ["truth.csv", "phantom.json"]
    if out_dir.exists() and not out_dir.is_dir():
        raise GrapesInputError(f"out_dir={str(out_dir)!r} is a file: give a folder")
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not overwrite:
        raise GrapesInputError(
            f"{str(out_dir)!r} already holds {existing}: choose another folder or pass {{overwrite}}", overwrite=True
        )
    if particles is None:
        particles = make_particles(_placement_shape(shape, g_opts), seed=seed, **p_opts)
    elif p_opts:
        raise GrapesInputError(f"options {sorted(p_opts)} place particles: drop them when passing particles=")
    truth = make_truth(particles, shape, n_states=n_states, seed=seed, **t_opts)
    max_id = int(truth["label"].max())
    ldt = _check_label_dtype(label_dtype, max_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {
        "shape": list(shape), "n_states": n_states, "seed": int(seed), "chunks": chunks,
        "label_dtype": ldt, "grey_dtype": model.dtype, "spacing": list(spacing), "unit": unit,
        "particles": _jsonable(particles.attrs), "states": _jsonable(
            {k: truth.attrs[k] for k in ("damage_levels", "damage_gradient", "damage_axis", "drift")}),
        "grey": _jsonable(dataclasses.asdict(model)),
        "n_particles": int(len(particles)),
    }
    _truth_extras(truth, model, shape, offsets)
    if model.air_thickness or model.pore_texture or any(offsets):
        params["background"] = _jsonable({k: truth.attrs[k] for k in ("noise_sigma", "air_box", "air_level",
                                                                        "pore_texture", "beam_offsets")})
    grey_paths, label_paths = [], []
    for s in range(n_states):
        grey, labels = phantom_arrays(shape, truth, state=s, chunks=chunks, seed=seed, label_dtype=ldt,
                                      grey_dtype=model.dtype,
                                      **{**g_opts, **({"offset": offsets[s]} if offsets[s] else {})})
        for arr, name, kind, paths in ((labels, label_names[s], "labels", label_paths),
                                       (grey, grey_names[s], "grey", grey_paths)):
            attrs = {"spacing": list(spacing), "unit": unit,
                     "grapes_dask": provenance(command="synthetic", kind=kind, state=s, seed=int(seed),
                                               parameters=params)}
            paths.append(write_zarr(arr, out_dir / name, attrs=attrs, overwrite=overwrite,
                                    progress=progress, scheduler=scheduler))
    truth_path = out_dir / "truth.csv"
    with atomic_output(truth_path, overwrite=overwrite) as tmp:
        truth.to_csv(tmp, index=False)
    if overwrite:  # a previous phantom with another number of states leaves no stale stores
        import shutil

        for stale in ("grey", "labels"):
            for path in [out_dir / f"{stale}.zarr", *out_dir.glob(f"{stale}_s*.zarr")]:
                if path.name not in names and path.is_dir() and (path / "zarr.json").exists():
                    shutil.rmtree(path)
    params_path = out_dir / "phantom.json"
    record = provenance(command="synthetic", parameters=params, seed=int(seed),
                        outputs={"grey": grey_names, "labels": label_names, "truth": "truth.csv"})
    with atomic_output(params_path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return Phantom(out_dir, grey_paths, label_paths, truth, truth_path, params_path, params)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
