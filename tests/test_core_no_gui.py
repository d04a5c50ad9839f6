"""The core never imports Qt, napari or magicgui (run in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# every module of the package but the napari side (napari_unetpp.napari) and the ``python -m`` entry point
CORE = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "napari_unetpp").rglob("*.py")
    if "napari" not in p.relative_to(ROOT / "napari_unetpp").parts and p.name != "__main__.py"
)
# the napari side's modules that hold its logic without Qt, so they are tested without a viewer
QT_FREE = [
    "napari_unetpp.napari.segment.controller",
    "napari_unetpp.napari.segment.shown",
    "napari_unetpp.napari.finetune.edits",
    "napari_unetpp.napari.finetune.pair",
    "napari_unetpp.napari.cache",
    "napari_unetpp.napari.events",
    "napari_unetpp.napari.pixel_size",
]


def test_core_imports_no_gui():
    """The core, and the Qt-free modules of the napari side, in one fresh interpreter."""
    code = (
        "import sys, importlib\n"
        f"for m in {CORE + QT_FREE!r}: importlib.import_module(m)\n"
        "import napari_unetpp as p; p.predict; p.load_model; p.UNetPlusPlus; p.fine_tune\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', "
        "'napari', 'magicgui', 'vispy')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_package_import_is_light():
    r = subprocess.run(
        [sys.executable, "-c", "import sys, napari_unetpp; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.strip() == "False", r.stderr


def test_core_list_is_the_whole_core():
    """CORE is every module Python finds in the package but the napari side and the ``-m`` entry point, so a module
    added anywhere else is checked without being listed; QT_FREE names modules of the napari side that exist."""
    import pkgutil

    import napari_unetpp

    found = {m.name for m in pkgutil.walk_packages(napari_unetpp.__path__, "napari_unetpp.")} | {"napari_unetpp"}
    napari_side = {m for m in found if m == "napari_unetpp.napari" or m.startswith("napari_unetpp.napari.")}
    assert set(CORE) == found - napari_side - {"napari_unetpp.cli.__main__"}
    for package in ("model", "data", "io", "inference", "runtimes", "training", "batch", "cli", "export"):
        assert f"napari_unetpp.{package}" in CORE, package  # the design card's packages are all core
    assert set(QT_FREE) <= napari_side


def test_the_top_level_manifest_is_the_one_npe2_loads():
    """napari.yaml stands at the top (the design card) and inside the package (where npe2 loads it): two plain
    files, since a symlink breaks Windows checkouts; they must not drift apart."""
    top, loaded = (ROOT / "napari.yaml").read_text(), (ROOT / "napari_unetpp" / "napari.yaml").read_text()
    assert top == loaded, "napari.yaml differs from napari_unetpp/napari.yaml: copy the package's file to the top"


def test_readme_test_command_is_what_ci_runs():
    root = ROOT
    ci = [ln for ln in (root / ".ci/run").read_text().splitlines() if ln.startswith("bash scripts/setup.sh")]
    assert len(ci) == 1 and ci[0] in (root / "README.md").read_text()
