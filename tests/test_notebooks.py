"""Every notebook in notebooks/ runs top to bottom (tiny shapes, CPU) and saves its figures.

Each notebook is executed with nbclient in a kernel that runs *this* interpreter (a kernelspec
written to a temp dir, so a user-level "python3" kernel pointing at another Python cannot be
picked up). JAXVID_NOTEBOOK_SCALE=test keeps shapes tiny (smaller than a user's default "small"
where a notebook has a heavy part: fewer frames and steps, same cells and checks); JAXVID_FIG_DIR sends the PNGs to a
temp dir so the run never rewrites docs/. The kernel's TMPDIR is a folder of its own that must be
empty once the kernel has exited: a notebook leaves nothing behind in the temp folder. One test
per notebook, so pytest-xdist spreads them.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300
KERNEL_NAME = "jaxvid-test-python"


def _kernel_spec_manager(tmp_path: Path):
    from jupyter_client.kernelspec import KernelSpecManager

    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxvid test kernel", "language": "python",
    }))
    ksm = KernelSpecManager()
    ksm.kernel_dirs = [str(tmp_path / "kernels")]
    ksm.ensure_native_kernel = False
    return ksm


def test_notebooks_exist_and_are_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_radial_masks.ipynb", "02_bsa_explorer.ipynb",
                                           "03_sparse_vs_dense.ipynb", "04_kernel_benchmark.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        dirty = [i for i, c in enumerate(nb.cells)
                 if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
        assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"


# 03 runs two tiny pipelines end to end: the slowest test of the suite.
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem.startswith("03") else p
                                  for p in NOTEBOOKS], ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from jupyter_client.manager import KernelManager

    fig_dir = tmp_path / "figures"
    kernel_tmp = tmp_path / "kernel_tmp"
    kernel_tmp.mkdir()
    # The kernel process inherits this environment.
    monkeypatch.setenv("JAXVID_NOTEBOOK_SCALE", "test")
    monkeypatch.setenv("JAXVID_FIG_DIR", str(fig_dir))
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TMPDIR", str(kernel_tmp))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    # With pytest-xdist each worker runs one kernel; keep XLA from oversubscribing the cores. The
    # kernel inherits conftest's unoptimised-compile XLA_FLAGS (the notebooks' own checks still run).
    monkeypatch.setenv("XLA_FLAGS", " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_cpu_multi_thread_eigen=false"]))

    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=_kernel_spec_manager(tmp_path))
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}")
    left = sorted(p.name for p in kernel_tmp.iterdir())
    assert not left, f"{path.name} left {left} in its temp folder"
    pngs = sorted(p.name for p in fig_dir.glob("*.png"))
    assert pngs, f"{path.name} saved no figures under JAXVID_FIG_DIR"
    for png in fig_dir.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
