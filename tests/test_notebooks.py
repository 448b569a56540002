"""The case-study notebooks (``notebooks/``) run from start to end and tell the story they claim.

Each notebook is executed with nbclient in a fresh IPython kernel of *this* interpreter, in a
temporary working directory, with the grapes_dask that this test process imports. Any cell
error fails the test. Then a few printed results are checked (the z-test rejects, the damage
order is recovered...), and a cell appended to the executed copy reads the notebook's variables
back as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import site
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

import grapes_dask

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT = 300  # s


def _kernel_env() -> dict:
    """Environment of the kernel: ours, with this process's grapes_dask first on its path."""
    env = dict(os.environ)
    pkg_parent = str(Path(grapes_dask.__file__).resolve().parents[1])
    installed = {str(Path(p).resolve()) for p in site.getsitepackages() + [site.getusersitepackages()]}
    if pkg_parent not in installed:  # a source tree (PYTHONPATH or editable): make the kernel import it too
        env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return env


def _kernel_manager() -> KernelManager:
    """A manager for the ipykernel of this interpreter (``sys.executable``).

    With no kernel directory to search, the spec manager falls back to ipykernel's own native
    spec, whose command is this interpreter: a ``python3`` kernel spec installed elsewhere (user
    or system, possibly for another Python) cannot be picked up, and no
    ``python -m ipykernel install`` is needed.
    """
    ksm = KernelSpecManager(kernel_dirs=[])
    spec = ksm.get_kernel_spec("python3")
    assert spec.argv[0] == sys.executable, spec.argv
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def _run(name: str, workdir: Path, extra: str) -> tuple[nbformat.NotebookNode, float, dict]:
    """Execute notebook `name` with the cell `extra` appended; (notebook, seconds, JSON of extra)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    n_cells = len(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell(extra))
    km = _kernel_manager()
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    t0 = time.perf_counter()
    try:
        client.execute(env=_kernel_env())
    finally:  # a kernel manager given to nbclient is not shut down by it
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    seconds = time.perf_counter() - t0
    out = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout")
    checks = json.loads(out.strip().splitlines()[-1])
    del nb.cells[n_cells:]
    return nb, seconds, checks


def _stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def _n_images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"no line matching {pattern!r} in the notebook's output:\n{text}"
    return float(m.group(1))


COMMON_CHECK = """
import json, sys
import grapes_dask as _gd
_checks = {"executable": sys.executable, "package": _gd.__file__}
"""


@pytest.mark.slow
def test_case_study_1_ex_situ(tmp_path):
    extra = COMMON_CHECK + """
_checks.update(
    n_tables={k: len(v) for k, v in tables.items()},
    n_clean={k: len(v) for k, v in clean.items()},
    clean_touch_border=int(sum(v["touches_border"].sum() for v in clean.values())),
    n_largest={k: len(v) for k, v in largest.items()},
    largest_min_volume={k: float(v["volume"].min()) for k, v in largest.items()},
    q3_edge={k: float(g.edges[3]) for k, g in groups.items()},
    core_difference=float(cmp_["difference"][cmp_.index >= 4].mean()),
    rho=float(rho),
    files=sorted(p.name for p in __import__("pathlib").Path("case1_data").iterdir()),
)
print(json.dumps(_checks))
"""
    nb, seconds, checks = _run("case_study_1_ex_situ.ipynb", tmp_path, extra)
    print(f"case study 1 ran in {seconds:.1f} s")
    text = _stdout(nb)
    # the kernel ran this interpreter and this grapes_dask, in the temporary folder
    assert checks["executable"] == sys.executable
    assert Path(checks["package"]).resolve() == Path(grapes_dask.__file__).resolve()
    assert checks["files"] == ["charged", "pristine"]
    assert (tmp_path / "case1_data" / "charged" / "grey.zarr").is_dir()
    # cleaning removed exactly the border particles; the largest quartile is a quarter of the rest
    assert checks["clean_touch_border"] == 0
    for k, n in checks["n_clean"].items():
        assert 0 < n < checks["n_tables"][k]
        assert abs(checks["n_largest"][k] - n / 4) <= 2
        # group 4 holds the ranks floor(3n/4) .. n-1 (stats.quantile_labels), all at or above numpy's 0.75 quantile
        assert checks["largest_min_volume"][k] >= checks["q3_edge"][k]
    # fig. 6: charged cores darker than pristine, by several standard errors
    darker = _number(r"charged darker than pristine by ([\d.]+) grey levels on average", text)
    in_se = _number(r"largest difference ([\d.]+) SE", text)
    assert darker == pytest.approx(-checks["core_difference"], abs=0.06)
    assert darker > 3 and in_se > 3
    assert checks["rho"] < -0.6
    assert "notebook ran in" in text
    assert _n_images(nb) == 6  # slices, distributions, fig. 6 (grey, / ROI mean), property maps, particle


@pytest.mark.slow
def test_case_study_2_operando(tmp_path):
    extra = COMMON_CHECK + """
_counts = tr.counts().set_index("reason")["n"]
_rows = tr.particles.drop_duplicates("label").set_index("label")
_checks.update(
    counts={k: int(v) for k, v in _counts.items()},
    lost_reason=_rows.loc[lost, "reason"],
    taker_reason=_rows.loc[taker, "reason"],
    z=float(z40.z), reject=bool(z40.reject),
    paper_z=float(paper.z),
    rho={k: float(v) for k, v in rho.items()},
    by_change=by_change, by_level=by_level,
    measured_order=[int(g) for g in measured_order],
    n_maps=len(maps),
    control_darker=float(f0["darker"]), control_brighter=float(f0["brighter"]),
    control_plain=float(f0["plain_darker"]), control_n=int(f0["n"]),
    recall_strong=float((strong["class"] == "darker").mean()), n_strong=len(strong),
    darker_44=float(cls.fractions.loc["4.4 V", "darker"]), plain_44=float(cls.fractions.loc["4.4 V", "plain_darker"]),
    core=float(sc.loc[2, "delta_mean"]), shell=float(sc.loc[1, "delta_mean"]), cms=float(cms), cms_se=float(cms_se),
    n_sampled=int(len(traj.sample)),
    slope_lo={s: float(trd.fit(s).ci_low) for s in trd.states},
)
print(json.dumps(_checks))
"""
    nb, seconds, checks = _run("case_study_2_operando.ipynb", tmp_path, extra)
    print(f"case study 2 ran in {seconds:.1f} s")
    text = _stdout(nb)
    assert checks["executable"] == sys.executable
    assert Path(checks["package"]).resolve() == Path(grapes_dask.__file__).resolve()
    # the injected segmentation error: the lost label, and its swallower among the neighbours
    assert checks["counts"]["inconsistent"] == 1
    assert checks["counts"]["neighbour"] >= 1
    assert checks["lost_reason"] == "inconsistent"
    assert "neighbour" in checks["taker_reason"].split(";")
    # eq. 6: the paper's numbers and ours
    assert _number(r"paper's numbers: z = (-?[\d.]+)", text) == pytest.approx(-5.39, abs=0.005)
    assert checks["paper_z"] == pytest.approx(-5.39, abs=0.005)
    z = _number(r"z-test pristine -> 4\.0 V \(eq\. 6\): z = (-?[\d.]+)", text)
    assert z == pytest.approx(checks["z"], abs=0.006) and z < -5
    assert checks["reject"] and "reject H0, a significant darkening" in text
    # the ground truth: damage order by state and by x quartile, per-particle ranks
    assert "damage order by state recovered: True" in text
    assert checks["by_change"] == checks["by_level"] == ["4.0 V", "2.5 V", "4.4 V"]
    assert "x-quartile order recovered at 4.4 V: True" in text
    assert checks["measured_order"] == [1, 2, 3, 4]
    assert checks["rho"]["4.4 V"] < -0.7
    assert checks["n_maps"] == 3
    # after the paper: the noise-only control scores about the normal tail, the plain share about 50%
    assert checks["control_n"] > 150
    assert checks["control_darker"] <= 0.02 and checks["control_brighter"] <= 0.02
    assert abs(checks["control_plain"] - 0.5) < 4 * 0.5 / checks["control_n"] ** 0.5
    assert "control: the paper's plain share of decreases" in text
    # damaged particles are found; the classified share is below the plain one
    assert checks["n_strong"] >= 30 and checks["recall_strong"] >= 0.9
    assert checks["darker_44"] < checks["plain_44"]
    # the core darkens more than the shell, by many paired standard errors; damage falls along x
    assert checks["core"] < checks["shell"] < 0
    assert checks["cms"] < -5 * checks["cms_se"]
    assert checks["n_sampled"] == 30
    assert all(v > 0 for v in checks["slope_lo"].values())
    assert _n_images(nb) == 10  # slices, fig. 7, 8, 9, 10, 12 (each once), classification, layers, trajectories, trend


def _build_module():
    spec = importlib.util.spec_from_file_location("_nb_build", NOTEBOOKS / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name, cells", [("case_study_1_ex_situ.ipynb", "CASE1"),
                                         ("case_study_2_operando.ipynb", "CASE2")])
def test_notebooks_committed_without_outputs_and_as_built(tmp_path, name, cells):
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(committed)
    for cell in committed.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: commit it without outputs"
    # the committed file is what notebooks/_build.py writes (regenerate with `python notebooks/_build.py`)
    out = tmp_path / name
    build = _build_module()
    build.build(getattr(build, cells), out)
    assert out.read_text() == (NOTEBOOKS / name).read_text(), f"{name} differs from notebooks/_build.py: rebuild it"
