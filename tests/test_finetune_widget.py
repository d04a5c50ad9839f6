"""The UNet++ Fine-tune widget in a real napari viewer (under Xvfb): edit tracking, a real fine-tuning run that hands
the new version to the Segment widget, stopping, and the one-sentence errors."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unetpp.model.registry import list_models, load_model

pytestmark = pytest.mark.gui

MASK = "ISBI 2012 EM [UNet++ mask]"
# runs of seconds: epochs of two steps on small patches (the widget passes these over its budget; what the tests check
# of a run, its saving, naming, plot and hand-over, does not depend on how long it trains)
QUICK = {"steps_per_epoch": 2, "patch_size": 64, "batch_size": 2}


@pytest.fixture
def both(make_napari_viewer):
    viewer = make_napari_viewer()
    img, ref = viewer.open_sample("napari-unetpp", "em")
    _, seg = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    seg._image.value = img
    seg._model.value = "em-membranes@v1"
    viewer.dims.set_current_step(0, 0)
    seg._depth_slider.value = 1  # segments slice 0 at L1 (fast): creates the mask layer the user corrects
    _, ft = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Fine-tune")
    return viewer, seg, ft, img, ref


def correct(mask, ref, z: int) -> None:
    """What a user does with the paint tools, through napari's own edit path (undo history + paint event)."""
    want = (np.asarray(ref.data[z]) == 1).astype(mask.data.dtype)
    yy, xx = np.nonzero(np.asarray(mask.data[z]) != want)
    mask.data_setitem((np.full(yy.shape, z), yy, xx), want[yy, xx])


def test_defaults_follow_the_segment_widget(both):
    viewer, seg, ft, img, _ = both
    assert ft._image.value is img and ft._labels.value.name == MASK
    assert ft._base.value == "em-membranes@v1"
    assert "em-membranes-finetuned" in ft._name.tooltip
    assert ft._classes.native.placeholderText() == "membrane"  # empty keeps the base's class name
    assert ft._edited.value.startswith("none yet")


def test_paint_events_mark_edited_slices(both):
    viewer, seg, ft, img, ref = both
    mask = viewer.layers[MASK]
    mask.brush_size = 5
    mask.paint((3, 100, 100), 1)  # the brush
    correct(mask, ref, 1)  # a larger correction
    assert ft.edited_slices() == [(1,), (3,)]
    assert ft._edited.value.startswith("2 slice(s): 1, 3")
    focus = ft.edits.edits(mask).focus
    zs = np.concatenate([c[0] for c in focus])
    assert set(zs.tolist()) == {1, 3}
    # an untouched labels layer has no edits
    other = viewer.add_labels(np.zeros(mask.data.shape, np.uint8), name="other")
    assert ft.edited_slices(other) == []


def test_undone_edits_do_not_count(both):
    """napari's undo sends no paint event; a slice painted and undone back to its original is no ground truth."""
    viewer, seg, ft, img, ref = both
    mask = viewer.layers[MASK]
    mask.brush_size = 7
    mask.paint((3, 100, 100), 1)
    mask.paint((3, 120, 100), 0)
    correct(mask, ref, 1)  # data_setitem: the other kind of history atom
    assert ft.edited_slices() == [(1,), (3,)]
    mask.undo()  # the correction of slice 1
    assert ft.edited_slices(recheck=True) == [(3,)]
    mask.undo()
    mask.undo()  # both brush strokes on slice 3
    assert ft.edited_slices(recheck=True) == []
    mask.redo()
    assert ft.edited_slices(recheck=True) == [(3,)]
    # a mouse drag is staged: napari writes every dab first and sends one paint event at the end of the stroke
    mask._begin_stroke()
    for x in range(60, 140, 4):
        mask.paint((2, 80, x), 1)
    mask._commit_stroke()
    assert ft.edited_slices(recheck=True) == [(2,), (3,)]
    mask.undo()
    assert ft.edited_slices(recheck=True) == [(3,)]


def test_fine_tune_hands_the_new_version_to_segment(both):
    """Correct two slices, fine-tune for one epoch on CPU: the new version is saved as a child of the base, selected
    in the Segment widget at its recommended depth, and the current slice is re-segmented into a new layer (the
    corrected mask is kept)."""
    viewer, seg, ft, img, ref = both
    mask = viewer.layers[MASK]
    for z in (1, 3):
        correct(mask, ref, z)
    corrected = np.array(mask.data, copy=True)
    ft._budget_kind.value = "epochs"
    ft._budget.value = 1
    ft._device.value = "cpu"
    ft._classes.value = "cell border"
    ft.run_options = QUICK
    ft.start()
    res = ft.result
    assert res is not None and res.path is not None, ft._status.value
    assert res.model.card.parent == "em-membranes@v1" and res.model.card.id == "em-membranes-finetuned@v1"
    assert res.model.card.classes == ["cell border"]
    assert res.data["pairs"][0]["known_slices"] == [[1], [3]]
    assert "Saved em-membranes-finetuned@v1" in ft._status.value and "recommended L" in ft._status.value
    assert ft._bar.value == 1000 and ft.plot.loss and len(ft.plot.val) >= 2
    assert ft._base.value == "em-membranes-finetuned@v1"  # the next round continues from here
    # the Segment widget now shows the new version at its recommended depth, on the slice in view
    assert seg._model.value == "em-membranes-finetuned@v1"
    assert seg._depth_slider.value == res.recommended_depth
    new = viewer.layers["ISBI 2012 EM [UNet++ mask 2]"]
    assert new.data[0].any() and new.data[0].mean() < 0.6
    np.testing.assert_array_equal(mask.data, corrected)  # the user's corrections are untouched
    assert load_model("em-membranes-finetuned").card.recommended_depth == res.recommended_depth


def test_stop_keeps_the_best_state(both, monkeypatch):
    """Stop saves the best validated state: the saved weights are those the best validation scored (not the last
    state), and the card's scores are that validation's."""
    import torch

    from napari_unetpp.training import engine as loop

    viewer, seg, ft, img, ref = both
    correct(viewer.layers[MASK], ref, 2)
    ft._budget.value = 30  # minutes: only Stop ends it
    ft._device.value = "cpu"
    validated = []  # (scores, the weights they scored), for every validation the run made
    real_validate = loop.validate

    def validate(module, *a, **kw):
        scores = real_validate(module, *a, **kw)
        validated.append((dict(scores), {k: v.detach().clone() for k, v in module.state_dict().items()}))
        return scores

    monkeypatch.setattr(loop, "validate", validate)
    real = ft._on_yield

    def on_yield(p):
        real(p)
        if p.phase == "train" and p.step == 2:
            ft.stop()

    ft._on_yield = on_yield  # (not monkeypatch: its undo would delete the attribute from the Container)
    ft.run_options = QUICK
    ft.start()
    res = ft.result
    assert res is not None and res.stopped == "stopped by user" and res.steps == 2
    assert [m.id for m in list_models() if not m.shipped] == ["em-membranes-finetuned@v1"]
    assert ft._start_btn.enabled and not ft._stop_btn.enabled
    assert len(validated) >= 2  # the base model's, and the one at the stop
    saved = load_model(res.path).module.state_dict()
    same = [s for s, w in validated if all(torch.equal(saved[k].to(v.dtype), v) for k, v in w.items())]
    assert same and same[-1] == res.scores  # the weights on disk are those these scores are of

    def mean(s):
        return sum(s.values()) / len(s)

    assert mean(res.scores) == max(mean(s) for s, _ in validated)  # and no validated state was better
    assert load_model(res.path).card.scores == {f"L{k}": {"dice": v} for k, v in res.scores.items()}


@pytest.mark.parametrize(
    "case, match",
    [
        ("no edits", "No edited slices"),
        ("shape", "choose the labels drawn on this image"),
        ("background", "all background"),
        ("listed empty", "List the corrected slices"),
    ],
)
def test_errors_are_one_sentence_and_save_nothing(both, monkeypatch, case, match):
    viewer, seg, ft, img, ref = both
    shown = []
    monkeypatch.setattr("napari_unetpp.napari.finetune.widget.show_error", shown.append)
    if case == "shape":
        ft._labels.value = viewer.add_labels(np.zeros((5, 100, 100), np.uint8), name="small")
        ft._truth.value = "all slices"
    elif case == "background":
        ft._labels.value = viewer.add_labels(np.zeros(img.data.shape, np.uint8), name="empty")
        ft._truth.value = "all slices"
    elif case == "listed empty":
        ft._truth.value = "listed slices"
    ft._device.value = "cpu"
    ft.start()
    assert len(shown) == 1 and match in shown[0] and "\n" not in shown[0], shown
    assert ft._status.value == shown[0]
    assert all(m.shipped for m in list_models())
    assert ft._start_btn.enabled


def test_new_model_choice_trains_a_fresh_network(both):
    """'new model (em)' in *start from*: a fresh network with the EM normalisation trains from scratch on the
    corrections, is saved under the given name with no parent, and goes to the Segment widget."""
    viewer, seg, ft, img, ref = both
    assert "new model (ct)" in ft._base.choices and "new model (em)" in ft._base.choices
    mask = viewer.layers[MASK]
    for z in (1, 3):
        correct(mask, ref, z)
    ft._base.value = "new model (em)"
    assert ft._name.native.placeholderText() == "em-new"
    ft._budget_kind.value = "epochs"
    ft._budget.value = 2
    ft._device.value = "cpu"
    ft._name.value = "my-em"
    ft._classes.value = "membrane"
    ft.run_options = QUICK
    ft.start()
    res = ft.result
    assert res is not None and res.path is not None, ft._status.value
    card = res.model.card
    assert card.id == "my-em@v1" and card.parent is None and card.classes == ["membrane"]
    assert card.training["decision"]["name"] == "scratch" and card.training["modality"] == "em"
    assert seg._model.value == "my-em@v1"
