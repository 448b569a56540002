"""Bigger than RAM: a phantom generated chunk by chunk into Zarr, then ``grapes-dask analyze``.

    python benchmarks/out_of_core.py                          # 2048^3 (~43 GB uncompressed), issue 10
    python benchmarks/out_of_core.py --size 2048 --compare-800  # + the 800^3 phantom in the same run
    python benchmarks/out_of_core.py --size 384               # a small check
    python benchmarks/out_of_core.py --size 2048 --skip-generate --keep   # analyse the kept volume again

Steps (each a fresh subprocess, the RSS of its whole process tree sampled every 50 ms):

1. warm-up (not counted): a small phantom of the same kind is generated and analysed, which
   loads the Numba kernels (compiling them on a cold cache) and measures the compressed bytes per
   voxel and the table bytes per particle of this kind of volume;
2. the free space of the target folder (``shutil.disk_usage``) is checked against an estimate of
   what the run writes: voxels x the larger of the measured and the documented bytes per voxel
   (0.95, the 800^3 phantom in ``benchmarks/README.md``) x 1.5, plus the table and the partial
   results (2 x table bytes per particle x the expected particles); the run refuses, naming both
   figures, when it does not fit;
3. generation: ``grapes_dask.synthetic.make_phantom`` (the generator of ``grapes-dask synth``)
   writes uint8 grey and uint32 labels (chunks of 128^3, the paper's packing and mean radius 18)
   task by task into Zarr;
4. the reference for voxels/s: with ``--compare-800`` the 800^3 phantom of ``benchmarks/engine.py``
   (``benchmarks/_data/phantom_800``, uint16 labels, or ``--reference-data DIR``), otherwise a
   ``--reference-size`` volume of the same kind made in this run; analysed as in step 5;
5. the analysis: ``python -m grapes_dask analyze GREY LABELS --out T.parquet --quiet`` (the
   real command on its embedded cluster), timed from process start to exit; the size of its
   partial results folder (``T.parquet.partials``) is sampled every second.

Reports generation and analysis wall times, voxels/s against the reference, peak RSS of each
process tree against 4 GiB (PASS/FAIL), disk used by the stores, the output and the partials,
particles; then one JSON line (``{"benchmark": "out_of_core", ...}``) and a summary line.
By default the generated volume and the tables are removed at the end (``--keep`` keeps them;
a volume reused with ``--skip-generate`` is never removed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _measure  # noqa: E402

#: Compressed bytes per voxel (grey uint8 + labels) of the paper-scale phantom:
#: 462 MiB for 800^3 (benchmarks/README.md, "Synthetic phantom generation", blosc lz4hc).
README_BYTES_PER_VOXEL = 462 * 2**20 / 800**3
#: Particles of the 800^3 phantom at the default packing and mean radius 18 (benchmarks/README.md).
PARTICLES_800 = 10_232
#: Table bytes per particle assumed at least (particle + layers + contacts Parquet files).
MIN_TABLE_BYTES_PER_PARTICLE = 4096
MARGIN = 1.5
RSS_LIMIT = 4 * _measure.GiB
DEFAULT_CHUNKS = 128


class NotEnoughDisk(RuntimeError):
    """The target folder has less free space than the run needs."""


# --------------------------------------------------------------------------------------------
# disk
# --------------------------------------------------------------------------------------------


def expected_particles(size: int, mean_radius: float = 18.0) -> int:
    """Particles of a ``size``^3 phantom at the default packing: the 800^3 count scaled by volume
    (and by ``(18 / mean_radius)**3`` for another radius)."""
    return int(round(PARTICLES_800 * (size / 800) ** 3 * (18.0 / mean_radius) ** 3))


def estimate_bytes(size: int, *, bytes_per_voxel: float | None = None, table_bytes_per_particle: float | None = None,
                   generate: bool = True, mean_radius: float = 18.0, margin: float = MARGIN) -> dict:
    """What a run writes, bytes, with a safety `margin`.

    Parameters
    ----------
    size : int
        Side of the cubic volume, voxels.
    bytes_per_voxel : float, optional
        Compressed bytes per voxel measured on a small volume; the larger of it and
        :data:`README_BYTES_PER_VOXEL` is used.
    table_bytes_per_particle : float, optional
        Measured bytes per particle of the output tables; at least
        :data:`MIN_TABLE_BYTES_PER_PARTICLE`.
    generate : bool
        Whether the stores are written (False with ``--skip-generate``).

    Returns
    -------
    dict
        ``stores, output, total`` (bytes, margin included) and the figures used.
    """
    bpv = max(README_BYTES_PER_VOXEL, bytes_per_voxel or 0.0)
    bpp = max(MIN_TABLE_BYTES_PER_PARTICLE, table_bytes_per_particle or 0.0)
    n = expected_particles(size, mean_radius)
    stores = int(margin * bpv * size**3) if generate else 0
    output = int(margin * 2 * bpp * n)  # the tables, and the partial results while the run lasts
    return {"stores": stores, "output": output, "total": stores + output, "bytes_per_voxel": bpv,
            "table_bytes_per_particle": bpp, "expected_particles": n, "margin": margin}


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def fmt_bytes(n: float) -> str:
    """``12.34 GiB`` (or MiB, KiB, bytes for smaller sizes)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} bytes"


def check_disk(folder, need: int, free: int | None = None) -> int:
    """Refuse (:class:`NotEnoughDisk`) when `folder` (or its nearest existing parent) has less
    than `need` bytes free; `free` overrides the measured free space (tests). Returns the free bytes."""
    if free is None:
        free = shutil.disk_usage(_existing(folder)).free
    if free < need:
        raise NotEnoughDisk(
            f"not enough disk space in {str(folder)!r}: this run needs about {fmt_bytes(need)} "
            f"(stores, tables and partial results, with a {MARGIN}x margin) but only {fmt_bytes(free)} "
            "are free. Free some space, point --dir to another disk, or use a smaller --size.")
    return int(free)


# --------------------------------------------------------------------------------------------
# the steps (subprocesses)
# --------------------------------------------------------------------------------------------


def _generate_child(out: str, size: int, seed: int, chunks: int, mean_radius: float, label_dtype: str) -> dict:
    from grapes_dask import synthetic

    t0 = time.perf_counter()
    particles = synthetic.make_particles((size,) * 3, mean_radius=mean_radius, seed=seed)
    placed = time.perf_counter() - t0
    ph = synthetic.make_phantom(out, shape=(size,) * 3, seed=seed, chunks=chunks, label_dtype=label_dtype,
                                particles=particles)
    return {"particles": int(len(ph.truth)), "place_seconds": placed, "seconds": time.perf_counter() - t0}


def generate(out: Path, size: int, *, seed=0, chunks=DEFAULT_CHUNKS, mean_radius=18.0, label_dtype="uint32") -> dict:
    """Generate a phantom into `out` in a subprocess; wall time, peak RSS, disk of the stores."""
    r = _measure.run_measured([sys.executable, str(Path(__file__).resolve()), "--child-generate", str(out),
                               "--size", str(size), "--seed", str(seed), "--chunks", str(chunks),
                               "--mean-radius", str(mean_radius), "--label-dtype", label_dtype])
    if r["returncode"] != 0:
        raise RuntimeError(f"generating {size}^3 into {out} failed:\n{r['stderr'][-3000:]}")
    child = json.loads(r["stdout"].strip().splitlines()[-1])
    return {"seconds": r["seconds"], "generator_seconds": child["seconds"], "place_seconds": child["place_seconds"],
            "particles": child["particles"], "peak_rss": r["peak_rss"], "load": [r["load_before"], r["load_after"]],
            "stores_bytes": _measure.du(out / "grey.zarr") + _measure.du(out / "labels.zarr")}


_CLOSING = re.compile(r"(\d+) particles, .* in ([0-9.]+) s")


def analyze(data: Path, out: Path, *, memory_limit: str | None = None, extra=()) -> dict:
    """``python -m grapes_dask analyze data/grey.zarr data/labels.zarr --out out --quiet`` measured."""
    import pyarrow.parquet as pq

    cmd = [sys.executable, "-m", "grapes_dask", "analyze", str(data / "grey.zarr"), str(data / "labels.zarr"),
           "--out", str(out), "--quiet", *extra]
    if memory_limit:
        cmd += ["--memory-limit", memory_limit]
    partials = Path(str(out) + ".partials")
    r = _measure.run_measured(cmd, watch=partials)
    if r["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r['returncode']}):\n{r['stderr'][-3000:]}")
    m = _CLOSING.search(r["stdout"])
    from grapes_dask.output import companion_path

    files = [out, companion_path(out, "layers"), companion_path(out, "contacts")]
    shape = _shape(data / "labels.zarr")
    return {"seconds": r["seconds"], "command_seconds": float(m.group(2)) if m else None,
            "particles": pq.ParquetFile(out).metadata.num_rows, "voxels": int(shape[0] * shape[1] * shape[2]),
            "peak_rss": r["peak_rss"], "partials_peak_bytes": r["watch_peak"],
            "output_bytes": sum(_measure.du(f) for f in files), "load": [r["load_before"], r["load_after"]],
            "command": " ".join(cmd)}


def _shape(store: Path) -> tuple:
    meta = json.loads((store / "zarr.json").read_text())
    return tuple(meta["shape"])


def _remove_tables(out: Path) -> None:
    from grapes_dask.output import companion_path

    for f in (out, companion_path(out, "layers"), companion_path(out, "contacts")):
        if f.exists():
            f.unlink()
    shutil.rmtree(str(out) + ".partials", ignore_errors=True)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def run(size: int = 2048, *, folder: Path | None = None, keep: bool = False, skip_generate: bool = False,
        compare_800: bool = False, reference_data: Path | None = None, reference_size: int = 256,
        warmup_size: int = 128, seed: int = 0, memory_limit: str | None = None, free_limit: int | None = None,
        log=print) -> dict:
    """The whole benchmark; returns the result dict (the JSON line).

    Parameters
    ----------
    size : int
        Side of the cubic volume, voxels.
    folder : path, optional
        Where the volume (``folder/volume``), the warm-up and reference volumes and the tables
        go (default ``benchmarks/_data/out_of_core_SIZE``).
    keep : bool
        Keep the generated volume and the tables.
    skip_generate : bool
        Reuse ``folder/volume`` (grey.zarr, labels.zarr) instead of generating it.
    compare_800, reference_data : bool, path
        Reference voxels/s from ``reference_data`` (default ``benchmarks/_data/phantom_800``).
    reference_size : int
        Otherwise the side of a same-kind reference volume made in this run (0: none).
    warmup_size : int
        Side of the warm-up volume (kernels, bytes per voxel, table bytes per particle).
    memory_limit : str, optional
        ``--memory-limit`` of the analysis (default: the command's own, the machine's memory).
    free_limit : int, optional
        Pretend that only this many bytes are free (to test the refusal).
    """
    folder = Path(folder) if folder else HERE / "_data" / f"out_of_core_{size}"
    vol = folder / "volume"
    res = {"benchmark": "out_of_core", "size": size, "shape": [size] * 3, "voxels": size**3, "chunks": DEFAULT_CHUNKS,
           "grey_dtype": "uint8", "label_dtype": "uint32", "mean_radius": 18.0, "folder": str(folder),
           "cpu_count": os.cpu_count(), "load_start": _measure.load()}
    if skip_generate and not (vol / "labels.zarr").exists():
        raise FileNotFoundError(f"--skip-generate: no volume at {vol} (grey.zarr, labels.zarr); run without it first")
    if not skip_generate and vol.exists() and any(vol.iterdir()):
        raise FileExistsError(f"{vol} already holds a volume: pass --skip-generate to reuse it, or remove it")
    # the disk check before anything of size is written
    est = estimate_bytes(size, generate=not skip_generate)
    check_disk(folder, est["total"], free_limit)
    made = []
    tables = []
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # 1. warm-up: kernels, compressed bytes per voxel, table bytes per particle (0: none)
        bpv = bpp = None
        if warmup_size:
            warm = folder / "warmup"
            shutil.rmtree(warm, ignore_errors=True)
            made.append(warm)
            g = generate(warm, warmup_size, seed=seed + 1)
            a = analyze(warm, warm / "t.parquet", memory_limit=memory_limit)
            bpv = g["stores_bytes"] / warmup_size**3
            # a few particles weigh the tables' fixed overhead: per particle only from 100 on
            bpp = a["output_bytes"] / a["particles"] if a["particles"] >= 100 else None
            res["warmup"] = {"size": warmup_size, "bytes_per_voxel": bpv, "table_bytes_per_particle": bpp,
                             "particles": a["particles"], "generate_seconds": g["seconds"],
                             "analyze_seconds": a["seconds"]}
            shutil.rmtree(warm, ignore_errors=True)
            made.remove(warm)
        # 2. the disk check with the measured figures
        est = estimate_bytes(size, bytes_per_voxel=bpv, table_bytes_per_particle=bpp, generate=not skip_generate)
        free = check_disk(folder, est["total"], free_limit)
        res["disk_estimate"] = {**est, "free": free}
        log(f"disk: about {fmt_bytes(est['total'])} needed ({est['bytes_per_voxel']:.3f} bytes/voxel x "
            f"{MARGIN}), {fmt_bytes(free)} free in {_existing(folder)}")
        # 3. generation
        if skip_generate:
            res["generate"] = None
            res["stores_bytes"] = _measure.du(vol / "grey.zarr") + _measure.du(vol / "labels.zarr")
        else:
            made.append(vol)
            log(f"generating {size}^3 into {vol} ...")
            gen = generate(vol, size, seed=seed)
            res["generate"] = gen
            res["stores_bytes"] = gen["stores_bytes"]
            log(f"generated {gen['particles']} particles in {gen['seconds']:.1f} s, peak RSS "
                f"{gen['peak_rss'] / 2**30:.2f} GiB, {gen['stores_bytes'] / 2**30:.2f} GiB on disk")
        # 4. the reference
        ref = None
        if compare_800 or reference_data:
            ref_dir = Path(reference_data) if reference_data else HERE / "_data" / "phantom_800"
            if not (ref_dir / "labels.zarr").exists():
                raise FileNotFoundError(f"no reference volume at {ref_dir}: run benchmarks/engine.py once "
                                        "(it makes benchmarks/_data/phantom_800) or give --reference-data DIR")
            ref_kind = f"existing volume {ref_dir}"
        elif reference_size:
            ref_dir = folder / f"reference_{reference_size}"
            shutil.rmtree(ref_dir, ignore_errors=True)
            made.append(ref_dir)
            generate(ref_dir, reference_size, seed=seed + 2)
            ref_kind = f"{reference_size}^3 volume of the same kind made in this run"
        else:
            ref_dir = None
        if ref_dir is not None:
            t = folder / "reference_table.parquet"
            _remove_tables(t)
            tables.append(t)
            ref = analyze(ref_dir, t, memory_limit=memory_limit)
            ref["what"] = ref_kind
            ref["voxels_per_second"] = ref["voxels"] / ref["seconds"]
            _remove_tables(t)
            if ref_dir.parent == folder and ref_dir.name.startswith("reference_"):
                shutil.rmtree(ref_dir, ignore_errors=True)
                made.remove(ref_dir)
            log(f"reference ({ref_kind}): {ref['seconds']:.1f} s, {ref['voxels_per_second'] / 1e6:.1f} Mvoxels/s")
        res["reference"] = ref
        # 5. the analysis
        out = folder / "table.parquet"
        _remove_tables(out)
        tables.append(out)
        log(f"analysing {size}^3 ...")
        an = analyze(vol, out, memory_limit=memory_limit)
        an["voxels_per_second"] = an["voxels"] / an["seconds"]
        res["analyze"] = an
        res["particles"] = an["particles"]
        res["output_bytes"] = an["output_bytes"]
        res["vs_reference"] = an["voxels_per_second"] / ref["voxels_per_second"] if ref else None
        # the same from the command's own closing line (cluster start to table), without the
        # ~2 s of interpreter start, imports and input checks that weigh on small volumes
        if ref and an["command_seconds"] and ref["command_seconds"]:
            res["vs_reference_command"] = (an["voxels"] / an["command_seconds"]) / (ref["voxels"] / ref["command_seconds"])
        else:
            res["vs_reference_command"] = None
        peaks = {"generate": (res["generate"] or {}).get("peak_rss", 0), "analyze": an["peak_rss"]}
        res["peak_rss_gib"] = {k: v / 2**30 for k, v in peaks.items()}
        res["rss_limit_gib"] = RSS_LIMIT / 2**30
        res["rss_pass"] = all(v <= RSS_LIMIT for v in peaks.values())
        res["load_end"] = _measure.load()
    finally:
        if not keep:
            for t in tables:
                _remove_tables(t)
            for d in made:
                shutil.rmtree(d, ignore_errors=True)
            if created and folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
    res["kept"] = bool(keep)
    return res


def summary(res: dict) -> str:
    an, gen, ref = res["analyze"], res.get("generate"), res.get("reference")
    gib = 2**30
    parts = [f"{res['size']}^3 ({res['voxels'] / 1e9:.2f} Gvoxels, {res['particles']} particles)"]
    if gen:
        parts.append(f"generated in {gen['seconds']:.1f} s")
    parts.append(f"analysed in {an['seconds']:.1f} s = {an['voxels_per_second'] / 1e6:.1f} Mvoxels/s")
    if ref:
        parts.append(f"{res['vs_reference']:.2f} x the reference's {ref['voxels_per_second'] / 1e6:.1f} Mvoxels/s "
                     f"({ref['what']})")
    rss = max(res["peak_rss_gib"].values())
    parts.append(f"peak RSS {res['peak_rss_gib']['analyze']:.2f} GiB analysis"
                 + (f", {res['peak_rss_gib']['generate']:.2f} GiB generation" if gen else "")
                 + f": {'PASS' if res['rss_pass'] else 'FAIL'} (<= 4 GiB; max {rss:.2f})")
    parts.append(f"disk {res['stores_bytes'] / gib:.2f} GiB stores, {res['output_bytes'] / 2**20:.1f} MiB tables, "
                 f"{an['partials_peak_bytes'] / 2**20:.1f} MiB partials at most")
    parts.append(f"load {res['load_start']}-{res['load_end']}")
    return "; ".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048, help="side of the cubic volume, voxels (default 2048)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="folder for the volume and tables (default benchmarks/_data/out_of_core_SIZE, git-ignored)")
    ap.add_argument("--keep", action="store_true", help="keep the generated volume and the tables")
    ap.add_argument("--skip-generate", action="store_true", help="reuse the volume in DIR/volume (never removed)")
    ap.add_argument("--compare-800", action="store_true",
                    help="reference voxels/s: the 800^3 phantom benchmarks/_data/phantom_800 (or --reference-data)")
    ap.add_argument("--reference-data", type=Path, default=None, help="reference volume folder (grey.zarr, labels.zarr)")
    ap.add_argument("--reference-size", type=int, default=256,
                    help="without --compare-800: side of a same-kind reference volume made in the run (0: none)")
    ap.add_argument("--warmup-size", type=int, default=128)
    ap.add_argument("--memory-limit", default=None, help="--memory-limit of the analysis (default: the command's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--free-limit", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-generate", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help=argparse.SUPPRESS)
    ap.add_argument("--mean-radius", type=float, default=18.0, help=argparse.SUPPRESS)
    ap.add_argument("--label-dtype", default="uint32", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_generate:
        print(json.dumps(_generate_child(a.child_generate, a.size, a.seed, a.chunks, a.mean_radius, a.label_dtype)))
        return 0
    try:
        res = run(a.size, folder=a.dir, keep=a.keep, skip_generate=a.skip_generate, compare_800=a.compare_800,
                  reference_data=a.reference_data, reference_size=a.reference_size, warmup_size=a.warmup_size,
                  seed=a.seed, memory_limit=a.memory_limit, free_limit=a.free_limit)
    except (NotEnoughDisk, FileNotFoundError, FileExistsError) as exc:
        print(f"out_of_core: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    print(summary(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
