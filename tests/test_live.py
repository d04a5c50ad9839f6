"""Live training (training.live, training.scribbles): the scribble convention, thin first strokes, the held-out
strokes, thread safety, snapshots, stop/save, and where it starts from."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from napari_unetpp import load_model, predict
from napari_unetpp.errors import TrainingDataError
from napari_unetpp.training.engine import Trainer
from napari_unetpp.training.live import FITS, LiveTrainer, start_from
from napari_unetpp.training.scribbles import MIN_VAL_PIXELS, LiveData, from_corrected_mask, to_labels

from .conftest import tiny_batchnorm as tiny

FAST = {"patch_size": 64, "batch_size": 2, "validate_every_s": 0.0}


def strokes(labels: np.ndarray, rows, width: int = 1) -> np.ndarray:
    """Scribbles as a person paints them along image rows: 2 on the objects the rows cross, 1 on background."""
    out = np.zeros(labels.shape, np.uint8)
    for r in rows:
        band = (slice(None),) * (labels.ndim - 2) + (slice(r, r + width), slice(None))
        out[band] = np.where(labels[band] > 0, 2, 1)
    return out


# ------------------------------------------------------------------------------------------------- scribbles
def test_scribble_convention_zero_unknown_one_background_two_class():
    labels, known = to_labels(np.array([[0, 1, 2, 3]], np.uint8))
    assert known.tolist() == [[False, True, True, True]]
    assert labels[known].tolist() == [0, 1, 2]
    mask = np.array([[[0, 1]], [[1, 0]]])
    s = from_corrected_mask(mask, planes=[1])
    assert s[0].tolist() == [[0, 0]] and s[1].tolist() == [[2, 1]]  # only the edited plane is known
    with pytest.raises(TrainingDataError, match="integers"):
        to_labels(np.array([[0.5]]))


def test_live_data_trains_only_on_strokes_and_keeps_trained_pixels_out_of_validation(em_crop, em_crop_membrane):
    data = LiveData(em_crop, tiny())
    first = strokes(em_crop_membrane, [40])
    data.update(first, [(0,)])
    ds = data.training_set()
    assert ds is not None and not data.holding_out  # one thin line: everything trains, nothing scored
    assert ds.n_val == 0 and ds.n_train == int((first[0] > 0).sum())
    item = ds.items[0]
    assert set(np.unique(item.target[item.train])) == {0, 1}
    assert not item.train[first[0] == 0].any()  # unpainted pixels never enter the loss
    more = strokes(em_crop_membrane, range(0, 161, 6), width=2)
    more[0, 40] = first[0, 40]
    data.update(more, [(0,), (1,)])
    ds = data.training_set()
    assert data.holding_out and ds.n_val >= MIN_VAL_PIXELS
    row40 = ds.items[0]
    assert not row40.val[40].any()  # the first line trained: it never moves to validation
    assert all(not (it.train & it.val).any() for it in ds.items)


def test_one_class_only_waits_for_the_other(em_crop, em_crop_membrane):
    lt = LiveTrainer(em_crop, tiny(), threaded=False, **FAST)
    only_bg = np.where(strokes(em_crop_membrane, [30]) == 1, 1, 0).astype(np.uint8)
    lt.update(only_bg, planes=[0])
    assert lt.step(2) == 0 and lt.model is None
    lt.update(strokes(em_crop_membrane, [30]), planes=[0])
    assert lt.step(2) == 2 and lt.model is not None
    lt.close()


def test_first_thin_strokes_train_and_snapshots_predict_without_zoom(em_crop, em_crop_membrane):
    lt = LiveTrainer(em_crop, tiny(), threaded=False, snapshot_every_s=0.0, **FAST)
    lt.update(strokes(em_crop_membrane, [50, 120]), planes=[0, 1, 2])
    assert lt.step(3) == 3 and lt.steps == 3
    snap = lt.model
    assert snap is not None and snap.card.training["live"]["steps"] == 3
    assert "spacing" not in snap.card.training and "object_diameter" not in snap.card.training
    pred = predict(em_crop[0], snap, runtime="torch", depth=2)
    assert pred.mask.shape == em_crop[0].shape  # the image's own pixel size: no zoom
    lt.step(1)
    assert lt.model is not snap  # each snapshot is a fresh LoadedModel, nothing memoised across them
    lt.close()


def test_update_while_training_in_a_thread_and_predict_on_snapshots(em_crop, em_crop_membrane):
    lt = LiveTrainer(em_crop, tiny(), **FAST, snapshot_every_s=0.2)
    every = strokes(em_crop_membrane, range(10, 161, 10), width=2)
    painted = np.zeros_like(every)
    stop = threading.Event()

    def painter() -> None:  # a person painting a plane at a time, faster than the steps
        z = 0
        while not stop.is_set():
            r = 10 * (1 + z % 16)  # one more line, then the next plane's
            painted[z % 3, r : r + 2] = every[z % 3, r : r + 2]
            lt.update(painted, planes=[z % 3])
            z += 1
            time.sleep(0.01)

    t = threading.Thread(target=painter)
    t.start()
    deadline = time.time() + 60
    while (lt.model is None or lt.steps < 6) and time.time() < deadline and lt.error is None:
        time.sleep(0.1)
    pred = predict(em_crop[1], lt.model, runtime="torch", depth=2)  # while training goes on
    steps_then = lt.steps
    while lt.steps == steps_then and time.time() < deadline:
        time.sleep(0.1)
    stop.set()
    t.join()
    assert lt.error is None and lt.running
    assert lt.steps > steps_then  # predicting did not stop it
    assert pred.mask.shape == em_crop[1].shape
    lt.close()
    assert not lt.running and lt.model is not None
    lt.close()  # idempotent


def test_a_snapshot_never_holds_half_written_weights(em_crop, em_crop_membrane, monkeypatch):
    lt = LiveTrainer(em_crop, tiny(), threaded=False, **FAST)
    lt.update(strokes(em_crop_membrane, [60]), planes=[0])
    lt.step(1)
    tr = lt._trainer
    assert isinstance(tr, Trainer)
    params = list(tr.module.parameters())
    inside = threading.Event()

    def slow_step(batch, lr, rng, clock):  # writes the weights in two halves with a pause between
        with torch.no_grad():
            for p in params[: len(params) // 2]:
                p.fill_(1.0)
            inside.set()
            time.sleep(0.3)
            for p in params[len(params) // 2 :]:
                p.fill_(1.0)
        return 0.5, 0.3

    monkeypatch.setattr(tr.optimiser, "step", slow_step)
    worker = threading.Thread(target=lambda: list(tr.step()))
    worker.start()
    inside.wait(5)
    snap = tr.snapshot()  # asked mid-step: it waits for the step
    worker.join()
    names = [n for n, _ in tr.module.named_parameters()]
    assert all(bool((snap[n] == 1.0).all()) for n in names)
    lt.close()


def test_stop_save_and_a_loadable_version(em_crop, em_crop_membrane):
    lt = LiveTrainer(em_crop, tiny(), threaded=False, snapshot_every_s=0.0, **FAST)
    lt.update(strokes(em_crop_membrane, range(0, 161, 5), width=2), planes=[0, 1, 2])
    lt.step(4)
    assert lt.history, "held-out strokes are scored"
    res = lt.save("live-test")
    assert res.saved and res.stopped == "live" and res.steps == 4
    again = load_model(str(res.path))
    assert again.card.training["data_summary"]["live"]["steps"] == 4
    assert again.card.training["data_summary"]["live"]["kept"] in (lt.kept,)
    for k, v in again.module.state_dict().items():
        assert torch.equal(v, lt.model.module.state_dict()[k])
    with pytest.raises(RuntimeError, match="threaded=False"):
        LiveTrainer(em_crop, tiny()).step()


def test_save_before_any_training_says_what_to_do(em_crop):
    lt = LiveTrainer(em_crop, tiny(), threaded=False)
    with pytest.raises(TrainingDataError, match="paint background"):
        lt.save()


def test_bad_scribbles_get_one_sentence(em_crop):
    lt = LiveTrainer(em_crop, tiny(), threaded=False)
    with pytest.raises(TrainingDataError, match="shape"):
        lt.update(np.zeros((2, 5, 5), np.uint8))
    with pytest.raises(TrainingDataError, match="outside"):
        lt.update(np.zeros(em_crop.shape, np.uint8), planes=[7])


# ------------------------------------------------------------------------------------------ where it starts
def test_start_rule():
    assert start_from({1: FITS, 2: 0.1})[0] == "base"
    assert start_from({1: FITS - 0.01})[0] == "fresh"


def test_base_that_fits_is_adapted_and_one_that_does_not_gives_way_to_fresh(em_crop, em_crop_membrane, em_model):
    fits = LiveTrainer(em_crop[:1], em_model, threaded=False, **FAST)
    fits.update(strokes(em_crop_membrane[:1], range(20, 161, 20), width=2))
    fits.step(0)
    assert fits.start["from"] == "base", fits.start
    fits.close()
    inverted = (em_crop_membrane[:1] == 0).astype(np.uint8)  # "background" is what the base calls membrane
    wrong = LiveTrainer(em_crop[:1], em_model, threaded=False, **FAST)
    wrong.update(strokes(inverted, range(20, 161, 20), width=2))
    wrong.step(0)
    assert wrong.start["from"] == "fresh" and "fresh" in wrong.start["why"], wrong.start
    assert wrong._trainer is not None and wrong._trainer.base.card.training.get("untrained")
    assert wrong._trainer.base.card.normalization == em_model.card.normalization  # the base's recipe
    wrong.close()
