"""CT in a real napari viewer (under Xvfb): a DICOM folder (the shipped CT sample written as a series by pydicom,
see tests/dicom_series.py) opened through the plugin's reader, segmented with a CT model under a chosen Hounsfield
window, the mask saved to NIfTI over the scan's grid; the CT demo teaching a new model the liver."""

from __future__ import annotations

import numpy as np
import pytest

from .dicom_series import write_ct_series

pytestmark = pytest.mark.gui
nib = pytest.importorskip("nibabel")
pytest.importorskip("pydicom")


def test_dicom_folder_segmented_under_a_window_and_saved_as_nifti(make_napari_viewer, tmp_path):
    from napari_unetpp.model.modalities import new_model
    from napari_unetpp.model.registry import save_model

    series = write_ct_series(tmp_path / "dicom")
    lm = new_model("ct", name="ct-gui")
    save_model(lm.module, lm.card)
    viewer = make_napari_viewer()
    [img] = viewer.open(str(series.folder), plugin="napari-unetpp")
    assert img.data.shape == series.hu.shape and tuple(img.scale) == pytest.approx((2.0, 0.9765625, 0.9765625))
    np.testing.assert_array_equal(np.asarray(img.data), series.hu)
    assert tuple(img.contrast_limits) == (-110, 190)  # the file's own window
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    w._image.value = img
    w._model.value = "ct-gui@v1"
    assert not w._window.native.isHidden() and "soft-tissue W400 L40" in w._window_shown.value
    w._all_levels.value = True
    viewer.dims.set_current_step(0, 10)
    w._depth_slider.value = 1
    w.preview()
    soft = viewer.layers[f"{img.name} [UNet++ L1]"].data[10].copy()
    w._window.value = "lung"
    assert "lung W1500 L-600" in w._window_shown.value
    w.preview()
    lung = viewer.layers[f"{img.name} [UNet++ L1]"].data[10]
    assert not np.allclose(soft, lung)  # another window is another input, never a cached result
    w._window.value = "dicom"
    assert "dicom WINDOW1 W300 L40" in w._window_shown.value
    mask = viewer.layers[f"{img.name} [UNet++ mask]"]
    assert mask.metadata["unetpp_geometry"] is img.metadata["unetpp_geometry"]
    [path] = mask.save(str(tmp_path / "mask.nii.gz"), plugin="napari-unetpp")
    out = nib.load(path)
    assert out.shape == series.hu.shape[::-1]
    np.testing.assert_allclose(out.affine, img.metadata["unetpp_geometry"].affine)


def test_ct_demo_teaches_a_new_model_the_liver(tmp_path):
    """``napari-unetpp demo --sample ct`` in its own process, with PyTorch as the runtime as in every test not marked
    ``runtimes`` (see test_napari.test_demo_screenshot): nothing measures ONNX Runtime or OpenVINO, so nothing is
    exported to or remembered in its cache."""
    import os
    import subprocess
    import sys

    from napari_unetpp.model.registry import load_model

    shot, cache = tmp_path / "ct.png", tmp_path / "cache"
    code = (
        "import sys\n"
        "from napari_unetpp.runtimes import selection\n"
        "selection._usable = lambda net, depth: ([], ['only PyTorch runs outside the runtime tests'])\n"
        "from napari_unetpp.cli import main\n"
        f"sys.exit(main(['demo', '--sample', 'ct', '--minutes', '0.15', '--screenshot', {str(shot)!r}]))\n"
    )
    env = dict(os.environ, NAPARI_UNETPP_CACHE=str(cache))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert not cache.exists() or not any(cache.rglob("*")), sorted(cache.rglob("*"))  # no graph, no choice
    card = load_model("ct-liver-demo").card
    assert card.parent is None and card.classes == ["liver"] and card.normalization["name"] == "soft-tissue"
    assert card.training["data_summary"]["pairs"][0]["known_slices"] == [[2], [9], [16]]
    assert card.training["spacing"] == pytest.approx({"Z": 2.0, "Y": 0.9765625, "X": 0.9765625})
    from skimage.io import imread

    assert imread(shot)[..., :3].std() > 10
