"""Benchmark volumes other than the paper-scale phantom.

``lattice``: a jittered lattice of equal spheres, the geometry on which the engine's cost per
voxel is flat while ``edt.edt`` gets cheaper (more background): ``n`` spheres per axis on a
regular grid of pitch ``size / n``, each centre moved by up to ``jitter`` voxels per axis
(uniform, seeded), radius ``radius``; labels uint32 numbered in C order of the grid, grey uint8
(particles 160, background 40, Gaussian noise of sd 6, clipped). Written chunk by chunk into
Zarr with :func:`grapes_dask.io.write_zarr`; the whole volume is never in memory.

    python benchmarks/geometries.py lattice OUT --size 640 --per-axis 16 --radius 18
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import dask.array as da
import numpy as np


def _lattice_block(block_id, *, size, n, radius, centres, chunk, seed, what):
    z0, y0, x0 = (b * chunk for b in block_id)
    z1, y1, x1 = (min(o + chunk, size) for o in (z0, y0, x0))
    zz, yy, xx = np.ogrid[z0:z1, y0:y1, x0:x1]
    pitch = size / n
    lab = np.zeros((z1 - z0, y1 - y0, x1 - x0), np.uint32)
    best = np.full(lab.shape, np.inf)
    # the spheres whose cell is this block's or a neighbour's
    cz = range(max(0, int(z0 // pitch) - 1), min(n, int((z1 - 1) // pitch) + 2))
    cy = range(max(0, int(y0 // pitch) - 1), min(n, int((y1 - 1) // pitch) + 2))
    cx = range(max(0, int(x0 // pitch) - 1), min(n, int((x1 - 1) // pitch) + 2))
    for i in cz:
        for j in cy:
            for k in cx:
                c = centres[i, j, k]
                d2 = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2
                inside = (d2 <= radius * radius) & (d2 < best)
                lab[inside] = 1 + (i * n + j) * n + k
                best = np.where(inside, d2, best)
    if what == "labels":
        return lab
    rng = np.random.default_rng([seed, *block_id])
    g = np.where(lab > 0, 160.0, 40.0) + rng.normal(0.0, 6.0, lab.shape)
    return np.clip(np.rint(g), 0, 255).astype(np.uint8)


def make_lattice(out: Path, *, size=640, per_axis=16, radius=18.0, jitter=1.5, seed=0, chunk=128) -> dict:
    """Write ``out/grey.zarr`` and ``out/labels.zarr``; return a summary (particles, solid fraction)."""
    from grapes_dask.io import write_zarr

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pitch = size / per_axis
    grid = (np.arange(per_axis) + 0.5) * pitch
    centres = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), axis=-1)
    centres = centres + rng.uniform(-jitter, jitter, centres.shape)
    nb = -(-size // chunk)
    chunks = tuple(tuple(min(chunk, size - i * chunk) for i in range(nb)) for _ in range(3))
    for what, dtype in (("labels", np.uint32), ("grey", np.uint8)):
        arr = da.map_blocks(
            lambda block_id=None, what=what: _lattice_block(block_id, size=size, n=per_axis, radius=radius,
                                                            centres=centres, chunk=chunk, seed=seed, what=what),
            dtype=dtype, chunks=chunks, meta=np.empty((0, 0, 0), dtype),
        )
        write_zarr(arr, out / f"{what}.zarr", overwrite=True)
    solid = 4 / 3 * np.pi * radius ** 3 * per_axis ** 3 / size ** 3
    return {"particles": per_axis ** 3, "solid_fraction_approx": round(float(solid), 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["lattice"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--per-axis", type=int, default=16)
    ap.add_argument("--radius", type=float, default=18.0)
    ap.add_argument("--jitter", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    info = make_lattice(a.out, size=a.size, per_axis=a.per_axis, radius=a.radius, jitter=a.jitter, seed=a.seed)
    print(f"{a.kind} {a.size}^3: {info} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
