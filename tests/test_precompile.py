"""The helper that compiles pass 2's kernels while pass 1 runs (grapes_dask._precompile).

The helper runs a tiny region through the pass-2 task; it is only useful if that compiles exactly
the kernel versions (argument types) the analysis then calls. Each case below runs an analysis's
pass 1 and plan, then the helper's warm-up in this process, then pass 2, and checks that pass 2
added no compiled version to any kernel. A last test runs the helper as the analysis would, in a
process of its own on an empty Numba cache, and checks that it fills the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dask
import numba
import numpy as np
import pytest

from grapes_dask import _precompile, synthetic, table
from grapes_dask.kernels import _accum, distance, layers, reduce


def _versions() -> dict:
    mods = (_accum, distance, layers, reduce)
    return {f"{m.__name__}.{n}": len(d.overloads) for m in mods for n, d in vars(m).items()
            if isinstance(d, numba.core.dispatcher.Dispatcher)}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    out = {}
    for name, kw in {"u16_u8": {}, "u32_u16": dict(label_dtype="uint32", grey_dtype="uint16"),
                     "u16_f32": dict(grey_dtype="float32")}.items():
        d = tmp_path_factory.mktemp(name)
        synthetic.make_phantom(d, shape=(28, 28, 28), chunks=14, seed=3, mean_radius=4.0, **kw)
        out[name] = (str(d / "grey.zarr"), str(d / "labels.zarr"))
    return out


CASES = {
    "fused (uint16 labels, uint8 grey)": ("u16_u8", {}),
    "anisotropic, uint32 labels, uint16 grey": ("u32_u16", dict(spacing=(1.0, 0.8, 0.8))),
    "float grey": ("u16_f32", {}),
    "centre layers with an edge ROI": ("u16_u8", dict(start_at="center", exclude_outer_layers=1)),
    "hole filling, excluded labels": ("u16_u8", dict(fill_holes=True, exclude_labels=[2])),
    "in-memory inputs": ("numpy", dict(region_size=14)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_warm_up_compiles_what_pass_2_calls(case, stores, monkeypatch):
    store, params = CASES[case]
    if store == "numpy":
        grey, labels, _ = synthetic.phantom_numpy((28, 28, 28), seed=3, mean_radius=4.0)
    else:
        grey, labels = stores[store]
    specs = []
    monkeypatch.setattr(_precompile, "start", lambda spec, client=None: specs.append(spec) or False)
    with dask.config.set(scheduler="sync"):
        *_, combined_layers, _params, _t = table._run(grey, labels, **params)
        (spec,) = specs
        assert json.loads(json.dumps(spec)) == spec
        assert spec["grey_views"] == (store == "numpy")
        _precompile.warm_pass2(spec)
        before = _versions()
        table._compute(combined_layers)
    after = _versions()
    assert after == before, {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}


def test_no_helper_once_the_kernels_are_compiled(stores):
    spec = _precompile.pass2_spec("uint16", "uint8", 3, (1.0, 1.0, 1.0), layer_width=1.0, center=False,
                                  edge_roi=False, exclude=False, fill_holes=False, black_border=True)
    _precompile.warm_pass2(spec)
    assert not any(_precompile._never_compiled(d) for d in _precompile._route_kernels(spec))
    assert _precompile.start(spec) is False


def test_the_helper_fills_an_empty_cache(tmp_path):
    spec = _precompile.pass2_spec(">u2", "uint8", 3, (1.0, 1.0, 1.0), layer_width=1.0, center=False,
                                  edge_roi=False, exclude=False, fill_holes=False, black_border=True)
    assert spec["label_dtype"] == "<u2"  # the tasks read in native order
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    check = ("import json, sys; from grapes_dask import _precompile as p; spec = json.loads(sys.argv[1]); "
             "print(any(p._never_compiled(d) for d in p._route_kernels(spec)))")

    def cold():
        r = subprocess.run([sys.executable, "-c", check, json.dumps(spec)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip() == "True"

    assert cold()
    r = subprocess.run([sys.executable, "-m", "grapes_dask._precompile", json.dumps(spec)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert any(p.name.startswith("layers._fused_iso_kernel") for p in tmp_path.rglob("*.nbi"))
    assert not cold()
