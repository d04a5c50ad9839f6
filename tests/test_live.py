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
from napari_unetpp.training.known import blocks
from napari_unetpp.training.live import FITS, LiveTrainer, start_from
from napari_unetpp.training.scribbles import MIN_VAL_PIXELS, LiveData, check_scribbles, from_corrected_mask, to_labels

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
    # a corrected mask: every pixel known; for a 1-class model any value > 0 is foreground (object ids, 255)
    assert from_corrected_mask(np.array([[0, 255, 256, 1]], np.uint32)).tolist() == [[1, 2, 2, 2]]
    assert from_corrected_mask(np.array([[0, 1, 2]]), num_classes=3).tolist() == [[1, 2, 3]]
    with pytest.raises(TrainingDataError, match="integers"):
        to_labels(np.array([[0.5]]))
    with pytest.raises(TrainingDataError, match="hold 3.*1 \\(background\\) and 2 \\(foreground\\)"):
        check_scribbles(np.array([[0, 3]]), num_classes=1)
    with pytest.raises(TrainingDataError, match="hold 4"):
        check_scribbles(np.array([[4]]), num_classes=3)


def test_live_data_trains_only_on_strokes_and_keeps_trained_blocks_out_of_validation(em_crop, em_crop_membrane):
    data = LiveData(em_crop, tiny())
    first = strokes(em_crop_membrane, [40])
    data.update(first, [(0,)])
    ds = data.training_set()
    assert ds is not None and not data.holding_out  # one thin line: nothing scored yet
    assert ds.n_val == 0 and 0 < ds.n_train <= int((first[0] > 0).sum())
    item = ds.items[0]
    assert set(np.unique(item.target[item.train])) == {0, 1}
    assert not item.train[first[0] == 0].any()  # unpainted pixels never enter the loss
    trained_first = item.train.copy()
    more = strokes(em_crop_membrane, range(0, 161, 6), width=2)
    more[0, 40] = first[0, 40]
    data.update(more, [(0,), (1,)])
    ds = data.training_set()
    assert data.holding_out and ds.n_val >= MIN_VAL_PIXELS
    later = ds.items[0]
    assert not (later.val & trained_first).any()  # pixels that trained never move to validation,
    for _, sl in blocks(later.val.shape):  # nor does any block holding one
        assert not (later.val[sl].any() and trained_first[sl].any())
    assert all(not (it.train & it.val).any() for it in ds.items)


def test_held_out_strokes_pile_up_when_handed_over_one_at_a_time(em_crop, em_crop_membrane):
    """The widget hands over a dab at a time: the held-out pixels must accumulate until they can be scored, not
    be trained away one hand-over at a time."""
    data = LiveData(em_crop[:1], tiny())
    painted = np.zeros(em_crop_membrane[:1].shape, np.uint8)
    every = strokes(em_crop_membrane[:1], range(0, 161, 4))
    held = []
    for r in range(0, 161, 4):
        painted[0, r] = every[0, r]
        data.update(painted, [(0,)])
        ds = data.training_set()
        held.append(data.holding_out)
    assert held[-1] and ds.n_val >= MIN_VAL_PIXELS, "validation never started"
    assert not held[0]


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


def test_stop_save_and_a_loadable_version(em_crop, em_crop_membrane, em_model):
    lt = LiveTrainer(em_crop, em_model, threaded=False, snapshot_every_s=0.0, **FAST)
    lt.update(strokes(em_crop_membrane, range(0, 161, 5), width=2), planes=[0, 1, 2])
    lt.step(3)
    assert lt.start["from"] == "base" and lt.history, "held-out strokes are scored"
    snap = lt.model
    assert "spacing" not in snap.card.training and "object_diameter" not in snap.card.training  # em_model has both
    res = lt.save("live-test")
    assert res.saved and res.stopped == "live" and res.steps == 3 and lt.finished.is_set()
    again = load_model(str(res.path))
    live = again.card.training["data_summary"]["live"]
    assert live["steps"] == 3 and live["kept"] == lt.kept and live["kept_step"] == lt.kept_step <= 3
    assert live["start"]["from"] == "base" and "L1" in live["start"]["base_scores"]
    assert "spacing" not in again.card.training and "object_diameter" not in again.card.training  # as the snapshots
    assert "live" in again.card.training["recipe"] and "minutes" not in again.card.training["hyperparameters"]
    assert again.card.training["baseline_scores"], "the base's score on the strokes is its baseline"
    for k, v in again.module.state_dict().items():
        assert torch.equal(v, lt.model.module.state_dict()[k])
    threaded = LiveTrainer(em_crop, tiny())
    with pytest.raises(RuntimeError, match="threaded=False"):
        threaded.step()
    threaded.close()
    assert threaded.finished.is_set() and not threaded.running


def test_stop_keeps_an_earlier_state_the_held_out_strokes_prefer(em_crop, em_crop_membrane):
    lt = LiveTrainer(em_crop, tiny(), threaded=False, snapshot_every_s=0.0, **FAST)
    lt.update(strokes(em_crop_membrane, range(0, 161, 5), width=2), planes=[0, 1, 2])
    lt.step(3)  # validated at every step (validate_every_s 0): the best is one of these
    tr = lt._trainer
    tr.schedule.validate_every_s = 1e9  # no validation at the next step
    lt.step(1)
    best = {k: v.clone() for k, v in tr.best.state.items()}
    with torch.no_grad():
        for head in tr.module.heads.values():
            head.bias.fill_(-50.0)  # the latest state predicts nothing
    lt.stop()
    assert lt.kept.startswith("an earlier state") and lt.kept_step < lt.steps == 4
    for k, v in lt.model.module.state_dict().items():
        assert torch.equal(v, best[k])


def test_a_failing_step_ends_the_session_with_one_sentence_and_releases_the_cores(
    em_crop, em_crop_membrane, monkeypatch
):
    from napari_unetpp.runtimes.cores import watch_cores

    def broken(self):
        raise RuntimeError("disk on fire")
        yield

    monkeypatch.setattr(Trainer, "step", broken)
    lt = LiveTrainer(em_crop, tiny(), **FAST)
    lt.update(strokes(em_crop_membrane, [50, 100]), planes=[0])
    assert lt.finished.wait(60), "the session did not end"
    assert lt.error.startswith("Live training stopped (disk on fire)") and not lt.running
    with watch_cores() as w:
        pass
    assert not w.disturbed  # the trainer's hold on the cores went with it
    lt.close()


def test_save_before_any_training_says_what_to_do(em_crop):
    lt = LiveTrainer(em_crop, tiny(), threaded=False)
    with pytest.raises(TrainingDataError, match="paint background"):
        lt.save()


def test_bad_scribbles_get_one_sentence_and_nothing_is_taken(em_crop):
    lt = LiveTrainer(em_crop, tiny(), threaded=False)
    with pytest.raises(TrainingDataError, match="shape"):
        lt.update(np.zeros((2, 5, 5), np.uint8))
    with pytest.raises(TrainingDataError, match="outside"):
        lt.update(np.zeros(em_crop.shape, np.uint8), planes=[7])
    wrapped = np.zeros(em_crop.shape, np.uint16)
    wrapped[0, 5, 5] = 257  # would be 1 (background) as uint8
    with pytest.raises(TrainingDataError, match="hold 257"):
        lt.update(wrapped, planes=[0])
    assert lt.step(1) == 0 and lt.model is None
    lt.close()


# ------------------------------------------------------------------------------------------ where it starts
def test_start_rule():
    assert start_from({1: FITS, 2: 0.1})[0] == "base"
    assert start_from({1: FITS - 0.01})[0] == "fresh"


def test_base_that_fits_is_adapted_and_one_that_does_not_gives_way_to_fresh(em_crop, em_crop_membrane, em_model):
    fits = LiveTrainer(em_crop[:1], em_model, threaded=False, **FAST)
    fits.update(strokes(em_crop_membrane[:1], range(20, 161, 20), width=2))
    fits.step(0)
    assert fits.start["from"] == "base" and fits.start["base_scores"][4] >= FITS, fits.start
    fits.close()
    inverted = (em_crop_membrane[:1] == 0).astype(np.uint8)  # "background" is what the base calls membrane
    wrong = LiveTrainer(em_crop[:1], em_model, threaded=False, **FAST)
    wrong.update(strokes(inverted, range(20, 161, 20), width=2))
    wrong.step(0)
    assert wrong.start["from"] == "fresh" and "fresh" in wrong.start["why"], wrong.start
    assert wrong._trainer is not None and wrong._trainer.base.card.training.get("untrained")
    assert wrong._trainer.base.card.normalization == em_model.card.normalization  # the base's recipe
    wrong.close()
