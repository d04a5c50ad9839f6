"""The core never imports Qt, napari or magicgui (run in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "napari_unetpp",
    "napari_unetpp.network",
    "napari_unetpp.tiling",
    "napari_unetpp.prediction",
    "napari_unetpp.registry",
    "napari_unetpp.io",
    "napari_unetpp.cli",
    "napari_unetpp.losses",
    "napari_unetpp.runtime",
    "napari_unetpp.normalization",
    "napari_unetpp.postprocess",
    "napari_unetpp.finetune",
    "napari_unetpp.finetune.recipe",
    "napari_unetpp.modalities",
    "napari_unetpp.ct",
    "napari_unetpp._napari_io",
    "napari_unetpp.metrics",
    "napari_unetpp.backends",
    "napari_unetpp.quantize",
]


def test_core_imports_no_gui():
    code = (
        "import sys, importlib\n"
        f"for m in {CORE!r}: importlib.import_module(m)\n"
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


def test_readme_test_command_is_what_ci_runs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ci = [ln for ln in (root / ".ci/run").read_text().splitlines() if ln.startswith("bash scripts/setup.sh")]
    assert len(ci) == 1 and ci[0] in (root / "README.md").read_text()
