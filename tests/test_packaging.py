"""The wheel carries the manifest, the weights and the samples, and npe2 finds the plugin in a fresh venv."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _sh(*cmd: str | Path, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
    return r


def test_wheel_installs_and_npe2_sees_the_plugin(tmp_path):
    _sh(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp_path / "dist", ROOT, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("napari_unetpp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "napari_unetpp/napari.yaml",
        "napari_unetpp/weights/em-membranes.safetensors",
        "napari_unetpp/weights/em-membranes.json",
        "napari_unetpp/_samples/isbi2012_z25-29.tif",
    ):
        assert needed in names, needed
    manifest = zipfile.ZipFile(wheel).read("napari_unetpp/napari.yaml").decode()
    assert manifest == (ROOT / "napari_unetpp" / "napari.yaml").read_text()  # the one manifest is what ships
    assert not (ROOT / "napari_unetpp" / "napari.yaml").is_symlink()  # Windows checkouts keep it

    # a throwaway venv with only the wheel; the dependencies come from this environment's site-packages
    venv = tmp_path / "venv"
    _sh(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    site = Path(_sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    _sh(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel)
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _sh(
        py,
        "-c",
        "import napari_unetpp, pathlib; print(pathlib.Path(napari_unetpp.__file__).parent)",
        cwd=tmp_path,
        env=env,
    ).stdout.strip()
    assert where.startswith(str(site)), where
    listed = _sh(py, "-m", "npe2", "list", cwd=tmp_path, env=env).stdout
    assert "napari-unetpp" in listed
    assert "valid" in _sh(py, "-m", "npe2", "validate", "napari-unetpp", cwd=tmp_path, env=env).stdout
    models = _sh(venv / "bin" / "napari-unetpp", "models", cwd=tmp_path, env=env).stdout
    assert "em-membranes@v1" in models and "shipped" in models
    _sh(
        py,
        "-c",
        "from napari_unetpp.napari.samples import em_sample; assert em_sample()[0][0].shape == (5, 512, 512)",
        cwd=tmp_path,
        env=env,
    )


def test_the_sdist_ships_the_docs_and_both_manifests():
    """The source distribution holds what its tests and the site build read: the docs, mkdocs.yml, and napari.yaml
    at the top as well as inside the package (a test keeps them equal)."""
    from hatchling.builders.sdist import SdistBuilder

    files = {Path(f.distribution_path).as_posix() for f in SdistBuilder(str(ROOT)).recurse_included_files()}
    for needed in ("README.md", "mkdocs.yml", "napari.yaml", "napari_unetpp/napari.yaml"):  # + pyproject.toml, always
        assert needed in files, needed
    docs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*") if p.is_file()}
    assert "docs/index.md" in docs and docs <= files, sorted(docs - files)
    assert {"scripts/check_layout.py", "tests/conftest.py", "weights/em-membranes.json"} <= files
