"""napari side: manifest, sample data and result layers in a real viewer (under Xvfb)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def test_manifest_validates_and_every_python_name_imports():
    from npe2 import PluginManifest

    r = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-unetpp"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "valid" in r.stdout, r.stdout + r.stderr
    pm = PluginManifest.from_distribution("napari-unetpp")
    names = [c.python_name for c in pm.contributions.commands or []]
    assert names
    for py in names:
        mod, _, attr = py.partition(":")
        assert callable(getattr(importlib.import_module(mod), attr)), py
    assert [s.key for s in pm.contributions.sample_data] == ["em", "nuclei", "ct"]
    assert [w.display_name for w in pm.contributions.widgets] == ["UNet++ Segment", "UNet++ Fine-tune", "UNet++ Live"]


def test_sample_opens_with_scale_and_labels(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-unetpp", "em")
    img, lab = layers
    assert img.data.shape == (5, 512, 512) and img.data.dtype == np.uint8
    assert tuple(img.scale) == (50.0, 4.0, 4.0)
    assert lab.data.shape == img.data.shape and set(np.unique(lab.data)) == {1, 2}
    assert (lab.data == 1).mean() == pytest.approx(0.22, abs=0.05)  # membranes are about 22 % of the pixels


def test_nuclei_sample_has_instance_labels(make_napari_viewer):
    viewer = make_napari_viewer()
    img, lab = viewer.open_sample("napari-unetpp", "nuclei")
    assert img.data.shape == (8, 256, 256) and img.data.dtype == np.uint16
    assert lab.data.shape == img.data.shape and len(np.unique(lab.data)) > 10  # separate nuclei, not a mask
    assert tuple(img.scale) == pytest.approx((0.29, 0.26, 0.26))


@pytest.mark.parametrize("sample, model", [("em", "em-membranes@v1"), ("nuclei", "nuclei-objects@v1")])
def test_samples_select_their_shipped_model(make_napari_viewer, sample, model):
    """Opening a sample and the Segment widget gives the model made for it, and a good segmentation at once."""
    from napari_unetpp.training import dice_score

    viewer = make_napari_viewer()
    img, ref = viewer.open_sample("napari-unetpp", sample)
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    assert w._image.value is img and w._model.value == model
    viewer.dims.set_current_step(0, 1)
    w.preview()
    mask = viewer.layers[f"{img.name} [UNet++ mask]"].data[1]
    gt = ref.data[1] == 1 if sample == "em" else ref.data[1] > 0
    assert dice_score(mask, gt) > (0.75 if sample == "em" else 0.9)


def test_demo_screenshot(tmp_path):
    """The README's main job, headless: napari opens with the sample segmented at every level by its shipped model
    (the one real-model run of the GUI tests' wiring). Run as the user runs it, through the CLI in its own process
    (a plain napari.Viewer in the test process would meet the app model that the viewer fixture of other tests left
    behind, and register the plugin's reader command twice), with PyTorch as the runtime as in every test not marked
    ``runtimes`` (see conftest.py): measuring ONNX Runtime and OpenVINO against it was 80 % of this test's time."""
    from napari_unetpp.runtimes import selection

    assert callable(selection._usable), "conftest.py and this test keep PyTorch the runtime through it"
    shot = tmp_path / "demo.png"
    code = (
        "import sys\n"
        "from napari_unetpp.runtimes import selection\n"
        "selection._usable = lambda net, depth: ([], ['only PyTorch runs outside the runtime tests'])\n"
        "from napari_unetpp.cli import main\n"
        f"sys.exit(main(['demo', '--screenshot', {str(shot)!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from skimage.io import imread

    png = imread(shot)
    assert png.shape[0] > 400 and png.shape[1] > 600 and png[..., :3].std() > 10
