"""The widgets keep what they know per layer, by layer identity, and forget it when the layer goes or its data
changes (issue 28, items 6-10 and the thread notes). Real napari viewers under Xvfb, the small ISBI crop."""

from __future__ import annotations

import types

import numpy as np
import pytest

from napari_unetpp import predict
from napari_unetpp.inference.predict import normalization_stats

from .widget_models import register_tiny_em

pytestmark = pytest.mark.gui


@pytest.fixture
def seg(make_napari_viewer, em_crop):
    """The ISBI crop with the Segment widget on a tiny network (what is checked is what the widget keeps, not how
    well a network segments)."""
    tiny = register_tiny_em()
    viewer = make_napari_viewer()
    img = viewer.add_image(em_crop, name="a.tif")
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    w._image.value = img
    with w._depth_slider.changed.blocked():  # (the new model's depth must not segment yet: tests do that)
        w._model.value = tiny
    w._device.value = "cpu"
    viewer.dims.set_current_step(0, 0)
    return viewer, w, img


@pytest.fixture
def calls(monkeypatch):
    """The depths the widget computed (every call of the core's predict_iter)."""
    from napari_unetpp.napari.segment import jobs

    seen: list[int] = []
    real = jobs.predict_iter
    monkeypatch.setattr(jobs, "predict_iter", lambda *a, **k: (seen.append(k["depth"]), real(*a, **k))[1])
    return seen


def _core(data, model, k, plane=None, stats_of=None, **kw):
    stats = normalization_stats(data if stats_of is None else stats_of, model)
    return predict(data if plane is None else data[plane], model, depth=k, levels="all", stats=stats, **kw)


# ----------------------------------------------------------------- item 6: the cache
def test_an_unrelated_layer_keeps_the_cached_results(seg, calls):
    """Adding the Labels layer to correct on (or any layer) keeps every cached level: the slider does not
    recompute (the cache read the channel where the fingerprint is and dropped everything)."""
    viewer, w, img = seg
    w._depth_slider.value = 2  # computes L1 and L2 of slice 0
    w._depth_slider.value = 1
    n, before = len(w.controller.cache), list(calls)
    assert n >= 1 and before and before[-1] == 2
    viewer.add_labels(np.zeros(img.data.shape, np.uint8), name="corrections")
    viewer.layers.remove("corrections")
    assert len(w.controller.cache) == n
    w._depth_slider.value = 2
    w._depth_slider.value = 1
    assert calls == before  # from the cache


def test_editing_the_image_data_drops_its_results_and_statistics(seg):
    viewer, w, img = seg
    lm = w.model  # the tiny network
    w._depth_slider.value = 1
    w.preview()
    assert len(w.controller.cache) and w.controller.has_stats()
    inverted = (255 - np.asarray(img.data)).astype(np.uint8)
    img.data = inverted  # same shape: only the data event tells
    w.preview()
    mask = viewer.layers["a.tif [UNet++ mask]"]
    np.testing.assert_array_equal(mask.data[0], _core(inverted, lm, 1, plane=0).mask)
    img.data = np.asarray(img.data)[:, :, ::-1].copy()
    assert not any(k.layer == img.unique_id for k in w.controller.cache.keys()) and not w.controller.has_stats()


def test_image_data_of_another_shape_gets_new_result_layers(seg, em_crop):
    """Data of another shape put in the image layer: the next preview writes new result layers of that shape (it
    wrote into the old ones: a broadcast error), and the old ones, which may hold the user's corrections, are kept
    as they were. Data of the same shape keeps writing into the same layers."""
    from napari_unetpp.inference.postprocess import split_instances

    viewer, w, img = seg
    lm = w.model  # the tiny network
    errors = []
    w._error = errors.append  # (a magicgui Container: plain attribute)
    w._instances.value = "components"  # object ids: the next free id is kept per mask layer
    w._depth_slider.value = 1
    w.preview()
    old = w.result_layer(img)
    kept = old.data.copy()
    small = np.ascontiguousarray(em_crop[:2, :100, :120])
    img.data = small
    w.preview()
    assert not errors, errors
    new = w.result_layer(img)
    assert new is not old and new in viewer.layers and old in viewer.layers and new.data.shape == small.shape
    np.testing.assert_array_equal(old.data, kept)
    objects = split_instances(_core(small, lm, 1, plane=0).mask, "components", 2)
    np.testing.assert_array_equal(new.data[0], objects)  # (its object ids start again at 1)
    img.data = (255 - small).astype(np.uint8)  # the same shape: the same layers
    w.preview()
    assert not errors, errors
    assert w.result_layer(img) is new


# ----------------------------------------------------------------- item 8: the DICOM window per image
def test_the_dicom_window_is_each_images_own(make_napari_viewer, em_crop, monkeypatch):
    from napari_unetpp.data.windows import Window
    from napari_unetpp.model.modalities import new_model
    from napari_unetpp.model.registry import save_model

    lm = new_model("ct", name="ct-two")
    save_model(lm.module, lm.card)
    viewer = make_napari_viewer()
    hu = em_crop.astype(np.int16) * 4 - 500
    a = viewer.add_image(hu, name="a", metadata={"unetpp_windows": [Window("AWIN", 400, 40)]})
    b = viewer.add_image(hu, name="b", metadata={"unetpp_windows": [Window("BWIN", 1500, -600)]})
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    w._model.value = "ct-two@v1"
    w._image.value = a
    w._window.value = "dicom"
    assert "AWIN" in w.model.normalization.describe() and "AWIN" in w._window_shown.value
    w._image.value = b
    assert "BWIN" in w.model.normalization.describe() and "BWIN" in w._window_shown.value
    w._image.value = a
    assert "AWIN" in w.model.normalization.describe()
    viewer.layers.remove(b)
    assert not [k for k in w.controller.windowed_models() if "BWIN" in repr(k)]  # forgotten with its layer
    # the Fine-tune widget trains under the chosen image's own window too (the same reading of the file's windows)
    from napari_unetpp.napari.finetune import widget as ftw

    _, f = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Fine-tune")
    f._image.value, f._base.value, f._window.value = a, "ct-two@v1", "dicom"
    bases = []

    def no_pair(image, labels, base, *args):
        bases.append(base)
        raise ValueError("stop here")

    monkeypatch.setattr(ftw, "training_pair", no_pair)
    f.start()
    assert f._worker is None and "AWIN" in bases[0].normalization.describe()


def test_images_with_the_same_dicom_window_share_one_windowed_model(make_napari_viewer, em_crop):
    """The windowed model (its own folded copy, ONNX session, OpenVINO compile) is made once per window, not once
    per image: the slices of one series opened as several layers share it; another window gets its own."""
    from napari_unetpp.data.windows import Window
    from napari_unetpp.model.modalities import new_model
    from napari_unetpp.model.registry import save_model

    lm = new_model("ct", name="ct-two")
    save_model(lm.module, lm.card)
    viewer = make_napari_viewer()
    hu = em_crop.astype(np.int16) * 4 - 500
    a = viewer.add_image(hu, name="a", metadata={"unetpp_windows": [Window("AWIN", 400, 40)]})
    a2 = viewer.add_image(hu[:2], name="a2", metadata={"unetpp_windows": [Window("AWIN", 400, 40)]})
    b = viewer.add_image(hu, name="b", metadata={"unetpp_windows": [Window("BWIN", 1500, -600)]})
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    w._model.value = "ct-two@v1"
    w._image.value = a
    w._window.value = "dicom"
    first = w.model
    w._image.value = a2
    assert w.model is first
    w._image.value = b
    assert w.model is not first and "BWIN" in w.model.normalization.describe()
    viewer.layers.remove(a)
    w._image.value = a2
    assert w.model is first  # a2 still uses that window


# ----------------------------------------------------------------- item 9: result layers by layer identity
def test_results_of_a_closed_image_are_kept_when_another_of_its_name_opens(seg, em_crop):
    """Close a.tif keeping its results, open another a.tif (same shape, then another shape): the old layers are
    never written to, and each new image gets its own result layers (no broadcast error)."""
    viewer, w, img = seg
    lm = w.model  # the tiny network
    w._all_levels.value = True
    w._depth_slider.value = 1
    w.preview()
    old_mask, old_l1 = viewer.layers["a.tif [UNet++ mask]"], viewer.layers["a.tif [UNet++ L1]"]
    kept = old_mask.data.copy(), np.array(old_l1.data, copy=True)
    viewer.layers.remove(img)
    errors = []
    w._error = errors.append  # (a magicgui Container: plain attribute)
    other = (255 - em_crop).astype(np.uint8)
    for n, data in ((2, other), (3, other[:2, :100, :120])):
        new = viewer.add_image(data, name="a.tif")
        w._image.value = new
        w.preview()
        assert not errors, errors
        np.testing.assert_array_equal(old_mask.data, kept[0])
        np.testing.assert_array_equal(old_l1.data, kept[1])
        mask = [ly for ly in viewer.layers if "[UNet++ mask" in ly.name][-1]  # the newest
        assert mask is not old_mask and mask.data.shape == data.shape and mask.name == f"a.tif [UNet++ mask {n}]"
        np.testing.assert_array_equal(mask.data[0], _core(data, lm, 1, plane=0).mask)
        assert w.result_layer(new) is mask
        assert w.result_layer(new, "L1") is not old_l1
        viewer.layers.remove(new)


# ----------------------------------------------------------------- threads
class _Signal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def disconnect(self, *_):
        self.slots.clear()

    def emit(self):
        for slot in list(self.slots):
            slot()


def _capture_stack_run(monkeypatch, w):
    """Start nothing for the next whole-stack run: keep its generator and handlers, to drive by hand (``finish()``
    then ends it as a worker's ``finished`` signal would)."""
    from napari_unetpp.napari.segment import jobs

    real = jobs.run_generator
    got: dict = {}
    worker = types.SimpleNamespace(
        yielded=_Signal(), returned=_Signal(), errored=_Signal(), finished=_Signal(), quit=lambda: None
    )

    def run_generator(gen_factory, on_yield, on_return, on_error=None, on_finish=None):
        if got:
            return real(gen_factory, on_yield, on_return, on_error, on_finish)
        got.update(gen=gen_factory, on_yield=on_yield, on_return=on_return)
        got["finish"] = lambda: (on_finish(), worker.finished.emit())
        return worker

    monkeypatch.setattr(jobs, "run_generator", run_generator)
    return got


def test_workers_use_the_values_set_when_they_started(seg, monkeypatch):
    """The worker reads no widget: a device chosen after the start does not reach a run already going."""
    from napari_unetpp.napari.segment import jobs

    viewer, w, img = seg
    w._depth_slider.value = 1
    devices = []
    real = jobs.predict_iter
    monkeypatch.setattr(jobs, "predict_iter", lambda *a, **k: (devices.append(k["device"]), real(*a, **k))[1])
    got = _capture_stack_run(monkeypatch, w)
    w._device.value = "cpu"
    w.run_stack()
    w._device.value = "auto"  # while the run is going
    gen = got["gen"]()
    next(gen)
    gen.close()
    got["finish"]()
    assert devices == ["cpu"] and w.jobs.stack is None and not w.jobs.workers


def test_a_slider_preview_during_a_whole_stack_run(seg, em_crop, monkeypatch, calls):
    """A whole-stack run at L1 driven by hand: after its first slice, the user previews slice 2 at L2, goes back to
    L1 and changes the threshold; then the run finishes. Each slice shows what it should, nothing is written across
    slices or levels, and nothing is computed twice."""
    from napari_unetpp.napari.segment import jobs

    viewer, w, img = seg
    lm = w.model  # the tiny network
    w._depth_slider.value = 1  # (computes slice 0 at L1)
    got = _capture_stack_run(monkeypatch, w)
    traced = jobs.predict_iter  # (the calls fixture's)
    monkeypatch.setattr(jobs, "predict_iter", lambda *a, **k: traced(*a, **{**k, "batch_size": 1}))  # tile by tile
    w.run_stack()
    gen = got["gen"]()
    seen: set = set()
    while (0,) not in seen:
        item = next(gen)
        seen |= {p for p, *_ in item[1]}
        got["on_yield"](item)
    assert seen == {(0,)}, "the crop's first slice must finish before the others for this test"
    viewer.dims.set_current_step(0, 2)
    w._depth_slider.value = 2  # a preview of slice 2 while the run goes on
    mask = viewer.layers["a.tif [UNet++ mask]"]
    l2 = _core(em_crop, lm, 2, plane=2)
    np.testing.assert_array_equal(mask.data[2], l2.mask)
    w._depth_slider.value = 1  # slice 2's L1 came with the L2 preview
    w._threshold.value = 0.7
    try:
        while True:
            got["on_yield"](next(gen))
    except StopIteration as stop:
        got["on_return"](stop.value)
    got["finish"]()
    assert w.jobs.stack is None and not w.jobs.workers and calls.count(2) == 1
    whole = _core(em_crop, lm, 1)
    prob = whole.probabilities[1].astype(np.float32)
    for z, thr in ((0, 0.5), (1, 0.7), (2, 0.7)):  # slice 0 was shown before the threshold moved
        decided = np.abs(prob[z] - thr) > 2e-3  # (the stack keeps float16 probabilities)
        np.testing.assert_array_equal(mask.data[z][decided], (prob[z] >= thr)[decided])
    entries = {k.plane: e for k, e in w.controller.cache.items()}
    assert set(entries[(0,)].probs) == set(entries[(1,)].probs) == {1} and set(entries[(2,)].probs) == {1, 2}
    np.testing.assert_allclose(entries[(2,)].probs[2], l2.probabilities[2], atol=1e-3)  # (core: float16)
    n = len(calls)
    w._depth_slider.value = 2  # slice 2 at L2: still the preview's
    np.testing.assert_array_equal(mask.data[2], _core(em_crop, lm, 2, plane=2, threshold=0.7).mask)
    assert len(calls) == n


# ----------------------------------------------------------------- Fine-tune widget
@pytest.fixture
def ft(make_napari_viewer, em_crop):
    viewer = make_napari_viewer()
    img = viewer.add_image(em_crop, name="crop")
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Fine-tune")
    return viewer, w, img


def test_a_removed_labels_layer_leaves_nothing_behind(ft, monkeypatch):
    """Edits are tracked by the layer's unique id and forgotten with it: a new layer that Python happens to place
    at the removed one's address (simulated: ``id`` reports the same number) neither inherits its edited slices nor
    goes without a paint handler."""
    from napari.layers import Labels

    from napari_unetpp.napari.finetune import edits

    viewer, w, img = ft
    a = viewer.add_labels(np.zeros(img.data.shape, np.uint8), name="a")
    a.paint((1, 50, 50), 1)
    assert w.edited_slices(a) == [(1,)]
    a_id = id(a)
    viewer.layers.remove(a)
    b = Labels(np.zeros(img.data.shape, np.uint8), name="b")
    real_id = id
    monkeypatch.setattr(edits, "id", lambda o: a_id if o is b else real_id(o), raising=False)
    viewer.add_layer(b)
    assert w.edited_slices(b) == []
    b.paint((2, 60, 60), 1)
    assert w.edited_slices(b) == [(2,)]
    present = {ly.unique_id for ly in viewer.layers}
    assert w.edits.tracked() <= present and a.unique_id not in w.edits.tracked()


def test_fine_tune_keeps_the_pixel_size_unit_and_resegmenting_does_not_zoom(
    make_napari_viewer, em_crop, em_crop_membrane
):
    """A layer in mm (as our CT and OME-Zarr readers make them): the new version's card records the unit, so the
    next Segment run on the same layer resamples nothing (before: the card had mm numbers without a unit, read as
    um, a zoom of x1000)."""
    from napari_unetpp.model.registry import load_model

    viewer = make_napari_viewer()
    mm = (5e-5, 4e-6, 4e-6)  # the crop's 50 nm sections of 4 nm pixels, in mm
    img = viewer.add_image(em_crop, name="crop", scale=mm, units="mm")
    lab = viewer.add_labels(em_crop_membrane.astype(np.uint8), name="truth", scale=mm, units="mm")
    _, f = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Fine-tune")
    f._image.value, f._labels.value = img, lab
    f._base.value = "em-membranes@v1"
    f._truth.value = "listed slices"
    f._slices.value = "0"
    f._device.value = "cpu"
    real = f._on_yield

    def on_yield(p):  # no training is needed: the card is what is tested (a step takes 15 s on a CI CPU)
        real(p)
        if p.phase == "baseline":
            f.stop()

    f._on_yield = on_yield  # (not monkeypatch: its undo would delete the attribute from the Container)
    f.start()
    assert f.result is not None and f.result.path is not None, f._status.value
    card = load_model(f.result.model.card.id).card
    assert card.training["spacing_unit"] == "mm"
    assert card.training["spacing"] == pytest.approx({"Z": 5e-5, "Y": 4e-6, "X": 4e-6})
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    w._image.value = img
    w._model.value = card.id
    assert w.controller.zoom(img, w.model)[0] is None and w._scale_note.value == "used as it is"
    viewer.dims.set_current_step(0, 0)
    w._depth_slider.value = 1
    w.preview()
    assert w.result_layer(img, "mask").data.shape == em_crop.shape


def test_a_unitless_training_spacing_never_takes_the_bases_unit_away():
    from napari_unetpp.training.saving import _spacing

    base = types.SimpleNamespace(
        card=types.SimpleNamespace(training={"spacing": {"Y": 0.004, "X": 0.004}, "spacing_unit": "um"})
    )
    kept = _spacing({"pairs": [{"spacing": {"Y": 4.0, "X": 4.0}}]}, base)  # a layer scaled in unknown units
    assert kept["spacing"] == {"Y": 0.004, "X": 0.004} and kept["spacing_unit"] == "um"
    own = _spacing({"pairs": [{"spacing": {"Y": 4e-6, "X": 4e-6}, "spacing_unit": "mm"}]}, base)
    assert own["spacing"] == {"Y": 4e-6, "X": 4e-6} and own["spacing_unit"] == "mm"
    plain = types.SimpleNamespace(card=types.SimpleNamespace(training={}))
    assert _spacing({"pairs": [{"spacing": {"Y": 2.0, "X": 2.0}}]}, plain) == {"spacing": {"Y": 2.0, "X": 2.0}}


def test_a_lazy_image_is_not_loaded_whole_on_the_gui_thread(ft, monkeypatch, em_crop):
    """The training pair keeps the layer's lazy array; the worker reads the slices it trains on."""
    da = pytest.importorskip("dask.array")
    from napari_unetpp.napari.finetune import widget as finetune

    viewer, w, _ = ft
    lazy = da.from_array(em_crop, chunks=(1, *em_crop.shape[1:]))
    img = viewer.add_image(lazy, name="lazy")
    lab = viewer.add_labels(np.zeros(em_crop.shape, np.uint8), name="lab")
    lab.paint((1, 80, 80), 1)
    w._image.value, w._labels.value = img, lab
    w._base.value = "em-membranes@v1"
    pairs = []
    monkeypatch.setattr(finetune, "fine_tune_iter", lambda base, pair, **kw: (pairs.append(pair), iter(()))[1])
    w.start()
    assert len(pairs) == 1 and pairs[0].image is lazy


def test_a_mask_of_one_chosen_channel_trains_on_that_channel(make_napari_viewer, em_crop, monkeypatch):
    """Item 5 in the widgets: a CZYX-like layer segmented on one channel of its first axis gives a mask without that
    axis; the Fine-tune widget takes the Segment widget's channel instead of refusing the mask's shape."""
    from napari_unetpp.napari.finetune import widget as finetune

    viewer = make_napari_viewer()
    stack = np.stack([em_crop, 255 - em_crop])  # (C=2, Z, Y, X)
    # the channel axis has no length: its scale (2, not 1, so a shifted zip cannot pass) and unit are not a Z's
    img = viewer.add_image(stack, name="two channels", scale=(2, 0.05, 0.004, 0.004), units=("", "um", "um", "um"))
    _, seg = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    seg._image.value = img
    seg._model.value = "em-membranes@v1"
    seg._update_channels()
    seg._channel.value = 1
    assert seg.chosen_channel(img) == 1
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Fine-tune")
    lab = viewer.add_labels(np.zeros(em_crop.shape, np.uint8), name="corrections")
    lab.paint((1, 80, 80), 1)
    w._image.value, w._labels.value = img, lab
    w._base.value = "em-membranes@v1"
    pairs = []
    monkeypatch.setattr(finetune, "fine_tune_iter", lambda base, pair, **kw: (pairs.append(pair), iter(()))[1])
    w.start()
    assert len(pairs) == 1, w._status.value
    np.testing.assert_array_equal(np.asarray(pairs[0].image), stack[1])
    assert pairs[0].axes == "ZYX"
    assert pairs[0].spacing == pytest.approx({"Z": 0.05, "Y": 0.004, "X": 0.004}) and pairs[0].spacing_unit == "um"
    assert seg.controller.zoom(img, seg.model, 1)[0] is None  # the same pixel size: 4 nm, the model's own
    other = viewer.add_image(em_crop, name="other")
    seg._image.value = other  # the Segment widget no longer segments a channel of this image
    assert seg.chosen_channel(img) is None
    pairs.clear()
    errors = []
    monkeypatch.setattr(finetune, "show_error", errors.append)
    w._image.value, w._labels.value = img, lab
    w.start()
    assert not pairs and errors and "matches one channel" in errors[0]


def test_a_pixel_size_far_from_the_models_is_said_not_ignored(seg, monkeypatch):
    """A layer scaled in mm given to the 4 nm EM model: the widget segments it as it is and says so once (the core
    refuses a 250,000x zoom; the widget had swallowed such errors without a word)."""
    from napari_unetpp.napari.segment import controls

    viewer, w, img = seg
    warned = []
    monkeypatch.setattr(controls, "show_warning", warned.append)
    img.scale = (2.0, 1.0, 1.0)
    img.units = "mm"
    zoom, why = w.controller.zoom(img, w.model)
    assert zoom is None and why.startswith("not resampled") and "--pixel-size" in why
    w.controller.zoom(img, w.model)
    assert len(warned) == 1 and "a.tif" in warned[0] and "segmented as it is" in warned[0]
    w._show_scale()
    assert "far from the model" in w._scale_note.value
    w._depth_slider.value = 1
    w.preview()
    assert w.result_layer(img, "mask").data.shape == img.data.shape


def test_an_unsaved_fine_tune_says_so_and_keeps_the_result(make_napari_viewer, em_crop, em_crop_membrane, monkeypatch):
    """A read-only models folder: the widget's real run (stopped after the baseline, no training step) says the
    model was not saved and why, never 'Saved', and keeps the trained model in ``result``."""
    import errno

    import napari_unetpp.training.saving as sv
    from napari_unetpp.napari.finetune import widget as finetune
    from napari_unetpp.paths import user_models_dir

    real_save = sv.save_model

    def save(model, card, directory=None, **kw):
        if directory is None:
            raise OSError(errno.EROFS, "Read-only file system", str(user_models_dir() / card.name))
        return real_save(model, card, directory, **kw)

    monkeypatch.setattr(sv, "save_model", save)
    errors = []
    monkeypatch.setattr(finetune, "show_error", errors.append)
    viewer = make_napari_viewer()
    img = viewer.add_image(em_crop, name="crop")
    lab = viewer.add_labels(em_crop_membrane.astype(np.uint8), name="truth")
    _, f = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Fine-tune")
    f._image.value, f._labels.value = img, lab
    f._base.value = "em-membranes@v1"
    f._truth.value = "listed slices"
    f._slices.value = "0"
    f._device.value = "cpu"
    real = f._on_yield

    def on_yield(p):  # (a training step takes 15 s on a CI CPU: the save after the baseline is what is tested)
        real(p)
        if p.phase == "baseline":
            f.stop()

    f._on_yield = on_yield  # (not monkeypatch: its undo would delete the attribute from the Container)
    f.start()
    res = f.result
    assert res is not None and res.path is None and res.model is not None, f._status.value
    assert f._status.value.startswith("Not saved") and "Read-only file system" in f._status.value
    assert str(user_models_dir()) in f._status.value
    assert errors and "could not be saved" in errors[-1] and "Read-only" in errors[-1]
    assert not list(user_models_dir().glob("*/*.json"))
    elsewhere = user_models_dir().parent / "elsewhere"
    assert res.save(elsewhere).is_file() and res.saved  # the trained model, saved where the user can write
