"""The UNet++ Segment widget in a real napari viewer (under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unetpp import predict
from napari_unetpp.inference.predict import normalization_stats

from .widget_models import register_tiny_em

pytestmark = pytest.mark.gui


@pytest.fixture
def docked(make_napari_viewer):
    """The EM sample with the Segment widget on a tiny network (the wiring is what these tests check; the sample
    would select its shipped model, which the tests that need a trained one use)."""
    tiny = register_tiny_em()
    viewer = make_napari_viewer()
    img = viewer.open_sample("napari-unetpp", "em")[0]
    img.metadata.pop("unetpp_model", None)
    _, widget = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    widget._image.value = img
    with widget._depth_slider.changed.blocked():  # (the new model's depth must not segment yet: tests do that)
        widget._model.value = tiny
    viewer.dims.set_current_step(0, 0)  # napari opens a stack at its middle slice; tests start at slice 0
    return viewer, widget, img


def _paced(gen, seconds):
    """``yield from gen``, waiting ``seconds`` before each step (in the worker thread)."""
    import time

    while True:
        time.sleep(seconds)
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        yield p


def _core(img, model, k, plane=None, **kw):
    stats = normalization_stats(img.data, model)
    data = img.data if plane is None else img.data[plane]
    return predict(data, model, depth=k, levels="all", stats=stats, **kw)


def test_widget_defaults_from_the_card(make_napari_viewer, em_model):
    """The sample selects its shipped model, whose card sets the slider and the card line."""
    viewer = make_napari_viewer()
    img = viewer.open_sample("napari-unetpp", "em")[0]
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    assert w._model.value == "em-membranes@v1"
    assert w._depth_slider.max == 4 and w._depth_slider.value == em_model.card.recommended_depth
    assert "ISBI" in w._card.value and "L1" in w._card.tooltip and "Cardona" in w._card.tooltip
    assert w._image.value is img and ("CPU" in w._detected.value or "CUDA" in w._detected.value)


def test_slider_segments_current_slice_at_every_level(docked, monkeypatch):
    viewer, w, img = docked
    lm = w.model  # the tiny network
    viewer.dims.set_current_step(0, 2)
    w._all_levels.value = True
    calls = []
    from napari_unetpp.napari.segment import jobs

    real = jobs.predict_iter
    monkeypatch.setattr(jobs, "predict_iter", lambda *a, **k: (calls.append(k["depth"]), real(*a, **k))[1])
    for k in (1, 2, 3, 4):
        w._depth_slider.value = k
        mask = viewer.layers["ISBI 2012 EM [UNet++ mask]"]
        ref = _core(img, lm, k, plane=2)
        np.testing.assert_array_equal(mask.data[2], ref.mask)
        assert not mask.data[[0, 1, 3, 4]].any()  # only the slice on screen was computed
        for lv in range(1, k + 1):
            layer = viewer.layers[f"ISBI 2012 EM [UNet++ L{lv}]"]
            np.testing.assert_allclose(
                layer.data[2].astype(np.float32), ref.probabilities[lv].astype(np.float32), atol=2e-3
            )
            assert tuple(layer.scale) == (50.0, 4.0, 4.0)
        assert f"L{k}" in w._timing.value
    n_layers = len(viewer.layers)
    w._depth_slider.value = 2  # cached: no new computation, same layers updated in place
    assert calls == [1, 2, 3, 4] and len(viewer.layers) == n_layers
    np.testing.assert_array_equal(viewer.layers["ISBI 2012 EM [UNet++ mask]"].data[2], _core(img, lm, 2, 2).mask)
    w._threshold.value = 0.9  # threshold re-renders from cached probabilities
    assert calls == [1, 2, 3, 4]
    assert viewer.layers["ISBI 2012 EM [UNet++ mask]"].data[2].sum() < _core(img, lm, 2, 2).mask.sum()


def test_ensemble_disagreement_and_instances(docked):
    viewer, w, img = docked
    lm = w.model  # the tiny network
    w._all_levels.value = True
    w._disagreement.value = True
    w._mode.value = "ensemble"
    w._depth_slider.value = 3
    ref = _core(img, lm, 3, plane=0, mode="ensemble")
    np.testing.assert_array_equal(viewer.layers["ISBI 2012 EM [UNet++ mask]"].data[0], ref.mask)
    assert "ISBI 2012 EM [UNet++ ensemble]" in viewer.layers
    dis = viewer.layers["ISBI 2012 EM [UNet++ disagreement]"].data[0].astype(np.float32)
    assert dis.max() > 0.05 and dis.min() >= 0
    w._mode.value = "pruned"
    w._instances.value = "components"
    labels = viewer.layers["ISBI 2012 EM [UNet++ mask]"].data[0]
    assert labels.max() > 5  # separate membrane pieces


def test_whole_stack_run_matches_core(docked):
    viewer, w, img = docked
    lm = w.model  # the tiny network
    w._depth_slider.value = 1
    w.run_stack()
    ref = _core(img, lm, 1)
    got = viewer.layers["ISBI 2012 EM [UNet++ mask]"].data
    decided = np.abs(ref.probabilities[1].astype(np.float32) - 0.5) > 1e-3  # the stack keeps float16 probabilities
    np.testing.assert_array_equal(got[decided], ref.mask[decided])
    assert "whole stack L1" in w._timing.value and w._run_btn.enabled and not w._cancel_btn.enabled
    viewer.dims.set_current_step(0, 4)  # every slice is cached now
    w._depth_slider.value = 1
    np.testing.assert_array_equal(got[4][decided[4]], ref.mask[4][decided[4]])


def test_user_edits_are_never_overwritten(docked):
    viewer, w, img = docked
    w._depth_slider.value = 1
    mask = viewer.layers["ISBI 2012 EM [UNet++ mask]"]
    mask.paint((0, 100, 100), 7, refresh=True)
    edited = mask.data.copy()
    w._depth_slider.value = 2
    np.testing.assert_array_equal(mask.data, edited)  # the user's layer is untouched
    new = viewer.layers["ISBI 2012 EM [UNet++ mask 2]"]
    assert new.data[0].any() and new is not mask


def test_bad_input_is_one_notification_and_widget_stays_usable(docked, monkeypatch):
    viewer, w, img = docked
    from napari_unetpp.napari.segment import controls

    errors = []
    monkeypatch.setattr(controls, "show_error", errors.append)
    bad = viewer.add_image(np.zeros((2, 2, 2, 32, 32), np.float32), name="five-d")
    w._image.value = bad
    w.preview()
    assert len(errors) == 1 and "dimensions" in errors[0] and "\n" not in errors[0]
    nan = viewer.add_image(np.full((40, 40), np.nan, np.float32), name="nans")
    w._image.value = nan
    w.preview()
    assert len(errors) == 2 and "NaN" in errors[1]
    w._image.value = img
    w._depth_slider.value = 1
    assert viewer.layers["ISBI 2012 EM [UNet++ mask]"].data[0].any()


def test_background_preview_and_cancelled_stack_run(docked, monkeypatch, qtbot):
    from napari_unetpp.napari.segment import jobs

    monkeypatch.delenv("NAPARI_UNETPP_SYNC")
    viewer, w, img = docked
    lm = w.model  # the tiny network
    real = jobs.predict_iter

    def slow(*a, **k):  # tile by tile, each as long as a real network's: the run is still going when it is cancelled
        return (yield from _paced(real(*a, **{**k, "batch_size": 1}), 0.05))

    monkeypatch.setattr(jobs, "predict_iter", slow)
    big = viewer.add_image(np.concatenate([img.data] * 6), name="tall", scale=img.scale)
    w._image.value = big
    w._depth_slider.value = 1
    qtbot.waitUntil(lambda: w.jobs.preview is None and "L1" in w._timing.value, timeout=30000)
    w._depth_slider.value = 4
    w.run_stack()
    mask = viewer.layers["tall [UNet++ mask]"]
    qtbot.waitUntil(lambda: mask.data[1:].reshape(29, -1).any(axis=1).sum() >= 2, timeout=60000)
    w.cancel()
    qtbot.waitUntil(lambda: w.jobs.stack is None, timeout=30000)
    done = mask.data.reshape(30, -1).any(axis=1)
    assert 2 <= done.sum() < 30 and w._run_btn.enabled and "cancelled" in w._timing.value
    last = int(np.flatnonzero(done)[-1])
    ref = _core(big, lm, 4, plane=last)
    decided = np.abs(ref.probabilities[4].astype(np.float32) - 0.5) > 1e-3  # the stack keeps float16 probabilities
    np.testing.assert_array_equal(mask.data[last][decided], ref.mask[decided])  # completed slices are final
    qtbot.waitUntil(lambda: w.jobs.preview is None, timeout=30000)  # (the L4 preview must not outlive the test)


def test_model_from_a_file_and_a_corrupt_one(docked, tmp_path, monkeypatch):
    import shutil

    from napari_unetpp.napari.segment import controls
    from napari_unetpp.paths import shipped_weights_dir

    viewer, w, img = docked
    for ext in (".json", ".safetensors"):
        shutil.copy(shipped_weights_dir() / f"em-membranes{ext}", tmp_path / f"copy{ext}")
    w._model_file.value = tmp_path / "copy.safetensors"
    assert w._model.value == str(tmp_path / "copy.safetensors") and w.model.card.name == "em-membranes"
    w._depth_slider.value = 1
    assert viewer.layers["ISBI 2012 EM [UNet++ mask]"].data[0].any()
    errors = []
    monkeypatch.setattr(controls, "show_error", errors.append)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not weights")
    (tmp_path / "bad.json").write_text((tmp_path / "copy.json").read_text())
    w._model_file.value = bad
    assert len(errors) == 1 and "bad.safetensors" in errors[0] and w._model.value == str(tmp_path / "copy.safetensors")


def test_time_series_segments_the_plane_on_screen(make_napari_viewer, em_crop):
    viewer = make_napari_viewer()
    data = np.stack([em_crop[:2], em_crop[1:]])  # T=2, Z=2, Y, X
    img = viewer.add_image(data, name="movie")
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    w._image.value = img
    viewer.dims.set_current_step(0, 1)
    viewer.dims.set_current_step(1, 0)
    w._depth_slider.value = 1
    mask = viewer.layers["movie [UNet++ mask]"].data
    assert mask.shape == data.shape and mask[1, 0].any()
    assert not mask[0].any() and not mask[1, 1].any()


def test_3d_model_segments_the_whole_volume(make_napari_viewer):
    import torch

    from napari_unetpp import UNetPlusPlus
    from napari_unetpp.model.card import ModelCard
    from napari_unetpp.model.registry import save_model

    torch.manual_seed(0)
    net = UNetPlusPlus(features=(4, 8, 8), spatial_dims=3, norm="group")
    save_model(net, ModelCard(name="tiny3d", architecture={}, recommended_depth=2))
    viewer = make_napari_viewer()
    vol = np.random.default_rng(0).random((2, 12, 40, 36)).astype(np.float32)  # T, Z, Y, X
    img = viewer.add_image(vol, name="vol")
    viewer.dims.set_current_step(0, 1)  # (the widget picks the image when docked, so a model change segments)
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    w.refresh_models(select="tiny3d@v1")
    w._image.value = img
    w._threshold.value = 0.05  # an untrained net: make sure something is foreground
    w._depth_slider.value = 1
    mask = viewer.layers["vol [UNet++ mask]"].data
    assert w._depth_slider.max == 2 and mask.shape == vol.shape
    assert mask[1].any() and not mask[0].any()  # the whole volume at the current time point
    ref = predict(
        vol[1],
        w.model,
        axes="ZYX",
        depth=1,
        threshold=0.05,
        stats=normalization_stats(vol, w.model, axes="TZYX"),
        precision="auto",
    )
    assert (mask[1] == ref.mask).mean() > 0.999


def test_results_are_keyed_by_layer_and_weights_not_names(docked):
    """A new layer with the old one's name, or another file with the same name@vN, never shows a stale result."""
    from napari_unetpp.model.loaded import LoadedModel

    viewer, w, img = docked
    lm = w.model  # the tiny network
    w._depth_slider.value = 1
    k1 = w.controller.key(img, w.model, (0,))
    inverted = viewer.add_image(255 - np.asarray(img.data), name=img.name + " copy", scale=img.scale)
    assert w.controller.key(inverted, w.model, (0,)) != k1
    other = LoadedModel(lm.module, type(lm.card)(**{**lm.card.to_dict(), "weights_sha256": "0" * 64}))
    assert other.card.id == w.model.card.id and w.controller.key(img, other, (0,)) != k1
    viewer.layers.remove(img)
    assert not any(k.layer == img.unique_id for k in w.controller.cache.keys())  # forgotten with its layer


def test_whole_stack_objects_have_unique_ids_and_only_shown_levels_are_kept(docked):
    viewer, w, img = docked
    w._depth_slider.value = 1
    w._instances.value = "components"
    w.run_stack()
    lab = viewer.layers["ISBI 2012 EM [UNet++ mask]"].data
    ids = [set(np.unique(lab[z])) - {0} for z in range(lab.shape[0])]
    assert all(ids) and all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1 :])  # no id in two slices
    assert all(set(e.probs) == {1} for _, e in w.controller.cache.items())  # head k only: no level layers shown


def test_multiscale_image_uses_the_finest_level(make_napari_viewer):
    tiny = register_tiny_em()
    viewer = make_napari_viewer()
    from napari_unetpp.napari.samples import em_sample

    data = np.asarray(em_sample()[0][0][0])
    img = viewer.add_image([data, data[::2, ::2]], multiscale=True, name="pyramid")
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    w._image.value = img
    w._model.value = tiny
    w._depth_slider.value = 1
    mask = viewer.layers["pyramid [UNet++ mask]"].data
    assert mask.shape == data.shape
    np.testing.assert_array_equal(mask, predict(data, w.model, depth=1).mask)


def test_a_closed_widget_is_collected(make_napari_viewer):
    import gc
    import weakref

    viewer = make_napari_viewer()
    img = viewer.open_sample("napari-unetpp", "em")[0]
    dock, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    w._image.value = img
    w._depth_slider.value = 1  # creates the mask layer, whose paint event the widget listens to
    ref = weakref.ref(w)
    viewer.window.remove_dock_widget(dock)
    del w, dock
    gc.collect()
    assert ref() is None
    viewer.layers["ISBI 2012 EM [UNet++ mask]"].paint((0, 10, 10), 1)  # a hook of the dead widget does nothing


def test_whole_stack_in_real_thread_workers(docked, qtbot, monkeypatch):
    """The path users get: napari thread workers, not the synchronous test mode."""
    monkeypatch.setenv("NAPARI_UNETPP_SYNC", "0")
    viewer, w, img = docked
    lm = w.model  # the tiny network
    with monkeypatch.context() as m:
        m.setenv("NAPARI_UNETPP_SYNC", "1")
        w._depth_slider.value = 1
    w.run_stack()
    assert w.jobs.stack is not None
    qtbot.waitUntil(lambda: w.jobs.stack is None, timeout=120_000)
    mask = viewer.layers["ISBI 2012 EM [UNet++ mask]"].data
    ref = _core(img, lm, 1).mask
    # the same result; a few threshold pixels move with the float summation order torch picks in another thread
    assert mask[:].any(axis=(1, 2)).all() and (mask != ref).mean() < 1e-4
    assert "whole stack L1" in w._timing.value


def _same_objects(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images split the same pixels into the same objects (IDs may differ)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


def test_learned_objects_with_a_cue_model(make_napari_viewer):
    """The nuclei sample selects the shipped model with a learned cue; its objects are the learned split of the
    core, per slice and in a whole-stack run (IDs unique across slices); a model without a cue falls back to the
    watershed."""
    from napari_unetpp import load_model

    viewer = make_napari_viewer()
    img, _ = viewer.open_sample("napari-unetpp", "nuclei")
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    lm = w.model
    assert lm.module.config.has_cue
    viewer.dims.set_current_step(0, 1)
    w._instances.value = "watershed"
    w._model.value = "em-membranes@v1"
    w._model.value = lm.card.id  # a cue model turns the watershed into its learned split
    assert w._instances.value == "learned"
    w._depth_slider.value = 2
    w.preview()
    ref = _core(img, lm, 2, plane=1, objects="learned")
    assert ref.objects_method == "learned"
    got = viewer.layers[f"{img.name} [UNet++ mask]"].data[1]
    assert _same_objects(got, ref.objects)
    w.run_stack()
    stack = viewer.layers[f"{img.name} [UNet++ mask]"].data
    ids = [set(np.unique(s)) - {0} for s in stack]
    assert all(ids) and all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1 :])
    whole = _core(img, lm, 2, objects="learned")
    decided = np.abs(whole.probabilities[2].astype(np.float32) - 0.5) > 1e-3
    np.testing.assert_array_equal((stack > 0)[decided], (whole.objects > 0)[decided])  # (tiny specks dropped)
    w._model.value = "em-membranes@v1"
    assert w._instances.value == "watershed" and not load_model("em-membranes").module.config.has_cue


def test_rgb_image_is_segmented_as_grey(make_napari_viewer):
    """An RGB layer with a 1-channel model: its luminance is segmented (before, the widget refused it)."""
    from napari_unetpp.napari.samples import em_sample

    tiny = register_tiny_em()
    viewer = make_napari_viewer()
    grey = np.asarray(em_sample()[0][0][0])
    img = viewer.add_image(np.stack([grey] * 3, axis=-1), rgb=True, name="rgb")
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    w._image.value = img
    w._model.value = tiny
    w._depth_slider.value = 1
    w.preview()
    mask = viewer.layers["rgb [UNet++ mask]"].data
    assert mask.shape == grey.shape
    ref = predict(np.stack([grey] * 3, axis=-1), w.model, axes="YXC", depth=1)
    assert ref.channels == "RGB as grey (luminance)"
    np.testing.assert_array_equal(mask, ref.mask)


def test_export_for_bioimageio_uses_the_slice_on_screen(docked, tmp_path, monkeypatch):
    """The button exports the chosen model at the slider's depth; the package's test input is the current slice
    (cropped to the pooling grid); a cancelled file dialog does nothing."""
    pytest.importorskip("bioimageio.spec")
    pytest.importorskip("onnx")
    import zipfile

    viewer, w, img = docked
    monkeypatch.setattr(
        type(w), "_ask_export_path", lambda self, default: ""
    )  # (a magicgui Container: patch the class)
    w.export_model()  # the user cancels the dialog
    assert not list(tmp_path.iterdir())
    viewer.dims.set_current_step(0, 3)
    w._depth_slider.value = 1
    out = tmp_path / "em-L1.zip"
    monkeypatch.setattr(
        type(w), "_ask_export_path", lambda self, default: str(out) if default == "tiny-em-L1.zip" else ""
    )
    w.export_model()
    assert out.is_file() and "Exported tiny-em@v1 at L1" in w._timing.value and w._export_btn.enabled
    with zipfile.ZipFile(out) as z:
        with z.open("test_input.npy") as f:
            x = np.load(f)
    plane = np.asarray(img.data[3], np.float32)
    a, b = (plane.shape[0] - x.shape[2]) // 2, (plane.shape[1] - x.shape[3]) // 2
    np.testing.assert_array_equal(x[0, 0], plane[a : a + x.shape[2], b : b + x.shape[3]])


def test_ome_zarr_with_its_pixel_size_is_resampled_to_the_model(make_napari_viewer, tmp_path):
    """An OME-Zarr of nuclei imaged at 3x the model's pixel size opens through our reader with its scale and unit;
    the widget says it resamples x3 and the mask keeps the layer's shape; a layer in pixels is used as it is."""
    from pathlib import Path

    import tifffile

    from napari_unetpp.data.scale import resize_plane
    from napari_unetpp.io.images import write_image

    samples = Path(__file__).resolve().parents[1] / "napari_unetpp" / "_samples"
    img = tifffile.imread(samples / "cells3d_nuclei_z40-47.tif")[:2]
    small = resize_plane(img.astype(np.float32), (85, 85), 1)
    src = write_image(tmp_path / "small.zarr", small, "ZYX", {"Z": 0.29, "Y": 0.78, "X": 0.78}, units="um")
    viewer = make_napari_viewer()
    layer = viewer.open(str(src), plugin="napari-unetpp")[0]
    assert layer.data.shape == small.shape and [str(u) for u in layer.units][-1] == "micrometer"
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    w._image.value = layer
    w._model.value = "nuclei@v1"
    assert w._scale_note.value == "resampled x3.00 x 3.00" and "0.78" in w._scale_note.tooltip
    viewer.dims.set_current_step(0, 1)
    w.preview()
    mask = w.result_layer(layer)
    assert mask.data.shape == small.shape and mask.data[1].any()
    plain = viewer.add_image(small, name="plain")  # no scale: pixels
    w._image.value = plain
    assert w._scale_note.value == "used as it is"


def test_channel_of_a_multichannel_layer(make_napari_viewer, em_crop):
    """A (C, Z, Y, X) layer not split into channels: the widget offers its channels, segments the chosen one slice
    by slice and as a stack, as the core does on that channel; the mask layer has the layer's shape without C."""
    tiny = register_tiny_em()
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    data = np.stack([em_crop, rng.integers(0, 255, em_crop.shape, dtype=np.uint8)])
    layer = viewer.add_image(data, name="two")
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    w._model.value = tiny
    w._image.value = layer
    w._channel.value = None
    w.preview()  # the whole layer, as 2 x 3 planes: the results of one channel go to a layer of their own
    whole = w.result_layer(layer)
    assert whole.data.shape == data.shape
    assert w.channel_offered and [v for _, v in w.controller.channel_choices(layer, w.model)] == [0, 1]
    w._channel.value = 0
    viewer.dims.set_current_step(1, 2)
    w.preview()
    mask = w.result_layer(layer)
    assert mask.data.shape == em_crop.shape and mask is not whole and whole in viewer.layers
    ref = predict(em_crop, w.model, depth=w._depth_slider.value, levels="all")
    np.testing.assert_array_equal(mask.data[2], ref.mask[2])
    w.run_stack()
    k = w._depth_slider.value
    decided = np.abs(ref.probabilities[k].astype(np.float32) - 0.5) > 1e-3  # the stack keeps float16 probabilities
    np.testing.assert_array_equal(mask.data[decided], ref.mask[decided])
    plain = viewer.add_image(em_crop, name="plain")
    w._image.value = plain
    assert not w.channel_offered and w.chosen_channel(plain) is None
