"""The steppable trainer (training.engine) and its parts: phases in order, data replaced between steps, schedules,
and the small named pieces of a step."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from napari_unetpp.jobs import run_to_end
from napari_unetpp.training import FineTuneConfig, TrainingPair, prepare_data
from napari_unetpp.training.config import make_config
from napari_unetpp.training.engine import PHASES, Trainer
from napari_unetpp.training.recipe import choose_recipe
from napari_unetpp.training.schedule import BudgetSchedule, OpenSchedule
from napari_unetpp.training.source import BatchSource, with_validation_trained
from napari_unetpp.training.steps import (
    BestState,
    is_improvement,
    mean_dice,
    refit_pays,
    state_snapshot,
    steps_per_epoch,
)

from .conftest import tiny_batchnorm as tiny


def small_pair(em_crop, em_crop_membrane, labels=None) -> TrainingPair:
    lab = em_crop_membrane[:2, :96, :96] if labels is None else labels
    return TrainingPair(em_crop[:2, :96, :96], lab, slices="all")


def config(**kw) -> FineTuneConfig:
    return make_config(None, {"batch_size": 2, "patch_size": 32, "small_patch_size": 32, **kw})


def prepared(base, pair, cfg, schedule, **kw) -> Trainer:
    """A trainer through its prepare and baseline phases, in the train phase."""
    trainer = Trainer(base, pair, cfg, schedule, device="cpu", **kw)
    list(trainer.prepare())
    list(trainer.baseline())
    return trainer


# --------------------------------------------------------------------------------------------------- engine
def test_phases_run_in_order_and_refuse_to_run_out_of_order(em_crop, em_crop_membrane):
    cfg = config(epochs=2, steps_per_epoch=3)
    trainer = Trainer(tiny(), small_pair(em_crop, em_crop_membrane), cfg, BudgetSchedule(None, 2), device="cpu")
    seen = [trainer.phase]

    def note() -> None:
        if trainer.phase != seen[-1]:
            seen.append(trainer.phase)

    with pytest.raises(RuntimeError, match="train or refit phase"):
        list(trainer.step())
    assert [p.phase for p in trainer.prepare()] == ["prepared"]
    note()
    with pytest.raises(RuntimeError, match="prepare"):
        list(trainer.prepare())
    assert [p.phase for p in trainer.baseline()][0] == "baseline"
    note()
    while trainer.phase in ("train", "refit"):
        list(trainer.step())
        note()
    res = run_to_end(trainer.finalize(save=False))
    note()
    assert seen[:3] == ["prepare", "baseline", "train"] and seen[-2:] == ["finalize", "done"]
    assert [PHASES.index(p) for p in seen] == sorted(PHASES.index(p) for p in seen)  # in order, none repeated
    assert res.steps == trainer.steps == 6 and res.path is None and res.stopped == "budget"
    assert ("refit" in seen) is res.data["refit"]["used"]


def test_a_step_runs_synchronously(em_crop, em_crop_membrane):
    trainer = prepared(tiny(), small_pair(em_crop, em_crop_membrane), config(minutes=30), BudgetSchedule(30, None))
    progress = trainer.run_steps(3)
    assert [p.phase for p in progress] == ["train"] * 3 and [p.step for p in progress] == [1, 2, 3]
    assert trainer.steps == 3 and trainer.phase == "train"
    trainer.release()


def test_data_replaced_between_steps_is_what_the_next_step_trains_on(em_crop, em_crop_membrane, monkeypatch):
    """A source whose labels change: after set_data (here from another thread), the next batches hold the new
    labels (the inverted membranes: mostly foreground where the old ones were mostly background)."""
    import napari_unetpp.training.optimiser as optimiser

    real, foreground = optimiser.train_step, []

    def spy(module, opt, loss_fn, x, y, v, *a, **k):
        foreground.append(float(y[v].float().mean()))
        return real(module, opt, loss_fn, x, y, v, *a, **k)

    monkeypatch.setattr(optimiser, "train_step", spy)
    base = tiny()
    cfg = config(minutes=30, affine_probability=0.0, focus_fraction=0.0, foreground_fraction=0.0)
    trainer = prepared(base, small_pair(em_crop, em_crop_membrane), cfg, BudgetSchedule(30, None))
    trainer.run_steps(4)
    inverted = 1 - (em_crop_membrane[:2, :96, :96] > 0).astype(np.int64)
    new = prepare_data(small_pair(em_crop, em_crop_membrane, inverted), base)
    worker = threading.Thread(target=trainer.set_data, args=(new,))
    worker.start()
    worker.join()
    assert trainer.data is not new  # handed over at the next step, not in the middle of one
    trainer.run_steps(4)
    trainer.release()
    assert trainer.data is new
    assert max(foreground[:4]) < 0.5 < min(foreground[4:]), foreground


def test_an_open_schedule_trains_until_stopped_and_validates_by_time(em_crop, em_crop_membrane):
    now = [0.0]
    stop = threading.Event()
    schedule = OpenSchedule(validate_every_s=10.0, clock=lambda: now[0])
    trainer = prepared(tiny(), small_pair(em_crop, em_crop_membrane), config(), schedule, stop=stop)
    assert [p.phase for p in trainer.run_steps(5)] == ["train"] * 5 and trainer.phase == "train"
    now[0] = 11.0
    assert [p.phase for p in trainer.step()] == ["train", "validate"]  # due after 10 s of the clock
    assert trainer.history[-1]["step"] == 6 and trainer.epoch == 1
    stop.set()
    assert [p.phase for p in trainer.step()] == [] and trainer.phase == "finalize"
    res = run_to_end(trainer.finalize(save=False))
    assert res.steps == 6 and res.stopped == "stopped by user"


def test_a_snapshot_is_a_copy_taken_between_steps(em_crop, em_crop_membrane):
    trainer = prepared(tiny(), small_pair(em_crop, em_crop_membrane), config(minutes=30), BudgetSchedule(30, None))
    trainer.run_steps(1)
    snap = trainer.snapshot()
    trainer.run_steps(2)
    now = trainer.module.state_dict()
    assert all(v.device.type == "cpu" for v in snap.values())
    assert any(not torch.equal(snap[k], now[k].cpu()) for k in snap)  # training went on; the snapshot did not
    trainer.release()
    trainer.release()  # idempotent


# ------------------------------------------------------------------------------------------------ schedules
def test_the_budget_schedule_decides_learning_rate_patches_refit_and_validations():
    now = [0.0]
    s = BudgetSchedule(minutes=None, epochs=8, clock=lambda: now[0])
    adapt = choose_recipe({1: 0.3}, [1])  # small patches for half the budget, refit from half, first val at 1/4
    s.plan(adapt, 5, refit_from=adapt.refit_from)
    first, half = s.now(0), s.now(20)
    assert first.small_patches and not first.refit and first.fraction == 0.0
    assert first.learning_rate == pytest.approx(adapt.learning_rate / 5)  # warm-up, step 1 of 5
    assert not half.small_patches and half.refit and half.fraction == 0.5
    assert half.learning_rate < adapt.learning_rate
    assert not s.validation_due(4, 0, 0.0)  # an epoch has not passed
    assert not s.validation_due(5, 0, 0.0)  # an epoch, but before the recipe's first validation (1/4)
    assert s.validation_due(10, 5, 0.0)  # a quarter of the budget
    s.plan(adapt, 5, fixed_epochs=True)  # the user set steps_per_epoch: every epoch counts
    assert s.validation_due(5, 0, 0.0) and not s.now(10).refit
    with pytest.raises(RuntimeError, match="plan"):
        BudgetSchedule(1.0, None).now(0)


def test_the_open_schedule_never_ends_and_keeps_its_learning_rate():
    now = [0.0]
    s = OpenSchedule(validate_every_s=5.0, clock=lambda: now[0])
    recipe = choose_recipe({1: 0.3}, [1], fresh=True)
    s.plan(recipe, 10)
    assert not s.done(10**6) and s.fraction(10**6) == 0.0
    late = s.now(10**6)
    assert late.learning_rate == pytest.approx(recipe.learning_rate) and not late.small_patches and not late.refit
    assert not s.validation_due(3, 0, 0.0)
    now[0] = 5.0
    assert s.validation_due(3, 0, 0.0) and not s.validation_due(3, 3, 0.0)


def test_an_open_schedule_with_a_half_life_halves_its_learning_rate_down_to_its_floor():
    now = [0.0]
    s = OpenSchedule(clock=lambda: now[0], half_life_s=30.0)
    recipe = choose_recipe({1: 0.3}, [1], fresh=True)
    s.plan(recipe, 10)
    peak = recipe.learning_rate
    assert s.now(100).learning_rate == pytest.approx(peak)
    now[0] = 30.0
    assert s.now(100).learning_rate == pytest.approx(peak / 2)
    now[0] = 60.0
    assert s.now(100).learning_rate == pytest.approx(peak / 4)
    now[0] = 1e4
    assert s.now(100).learning_rate == pytest.approx(peak * OpenSchedule.FLOOR)
    assert s.now(0).learning_rate < s.now(100).learning_rate  # the warm-up still comes first


# ------------------------------------------------------------------------------------------ small named parts
def test_best_state_rules():
    assert is_improvement(0.5, 0.4, 0.002, True) and not is_improvement(0.401, 0.4, 0.002, True)
    assert is_improvement(0.401, 0.4, 0.002, False)  # anything beats the base while nothing has
    assert refit_pays(0.6, 0.6, 0.3) and not refit_pays(0.59, 0.6, 0.3) and not refit_pays(0.3, 0.2, 0.3)
    assert mean_dice({1: 0.2, 2: 0.9}, [1]) == pytest.approx(0.2)
    assert steps_per_epoch(100, 2, (8, 8)) == 10 and steps_per_epoch(2000, 2, (8, 8)) == 16
    net = torch.nn.Linear(2, 1)
    best = BestState(0.4, {1: 0.4}, state_snapshot(net))
    best.offer({1: 0.3}, [1], net, 0.002)
    assert best.since == 1 and not best.improved and best.mean == 0.4
    with torch.no_grad():
        net.weight.fill_(7.0)
    best.offer({1: 0.5}, [1], net, 0.002)
    assert best.since == 0 and best.improved and best.scores == {1: 0.5} and float(best.state["weight"][0, 0]) == 7
    with torch.no_grad():
        net.weight.fill_(8.0)
    assert float(best.state["weight"][0, 0]) == 7  # a copy
    best.offer_statistics({1: 0.45}, [1], net)
    assert best.mean == 0.5


def test_the_refit_set_trains_the_validation_pixels_and_leaves_the_old_set(em_crop, em_crop_membrane):
    ds = prepare_data(small_pair(em_crop, em_crop_membrane), tiny())
    n_train, n_val = ds.n_train, ds.n_val
    refit = with_validation_trained(ds)
    assert refit.n_train == n_train + n_val and refit.n_val == n_val
    assert ds.n_train == n_train  # unchanged
    assert all(len(a.train_idx) >= len(b.train_idx) for a, b in zip(refit.items, ds.items))


def test_a_batch_source_pads_new_data_and_restarts_its_batches(em_crop, em_crop_membrane):
    ds = prepare_data(small_pair(em_crop, em_crop_membrane), tiny())
    cfg = config()
    source = BatchSource(ds, np.random.default_rng(0), cfg, True, torch.device("cpu"))
    assert source.get(2, (32, 32))[0].shape == (2, 1, 32, 32)
    it = ds.items[0]
    smaller = dataclasses.replace(it, image=it.image[:, :20, :20], target=it.target[:20, :20])
    smaller = dataclasses.replace(smaller, train=it.train[:20, :20] | True, val=it.val[:20, :20] & False, focus=None)
    small_set = type(ds)([smaller], ds.spatial_dims, ds.summary)
    source.replace(small_set, (32, 32))
    assert source.data is small_set and smaller.target.shape == (32, 32)  # padded to the patch
    x, y, v = source.get(2, (32, 32))
    assert x.shape == (2, 1, 32, 32) and v.any()
    source.close()


def test_data_handed_over_in_the_refit_phase_keeps_its_validation_pixels_training(em_crop, em_crop_membrane):
    cfg = config(minutes=30)
    trainer = prepared(tiny(), small_pair(em_crop, em_crop_membrane), cfg, BudgetSchedule(30, None))
    trainer.run_steps(1)
    trainer.phase = "refit"  # as _decide_refit leaves it when the validation pixels join training
    new = prepare_data(small_pair(em_crop, em_crop_membrane), trainer.base)
    trainer.set_data(new)
    trainer.run_steps(1)
    trainer.release()
    assert all((it.train | it.val == it.train).all() for it in trainer.data.items)  # val pixels train too
    assert trainer.data.n_val == new.n_val  # and are still scored


def test_new_validation_pixels_make_the_next_validation_the_best_and_none_score_nothing(em_crop, em_crop_membrane):
    now = [0.0]
    schedule = OpenSchedule(validate_every_s=1.0, clock=lambda: now[0])
    pair = small_pair(em_crop, em_crop_membrane)
    trainer = prepared(tiny(), pair, config(), schedule)
    trainer.best.mean = 2.0  # a score no validation reaches: it holds until the validation pixels change
    now[0] = 2.0
    trainer.run_steps(1)
    assert trainer.best.mean == 2.0 and trainer.best.since == 1
    other = prepare_data(small_pair(em_crop, em_crop_membrane), trainer.base, val_fraction=0.5)
    assert other.n_val != trainer.data.n_val
    trainer.set_data(other)
    now[0] = 4.0
    trainer.run_steps(1)
    assert trainer.best.mean < 1.0 and trainer.best.scores == trainer.history[-1]["val"]  # rebased, not compared
    unscored = with_validation_trained(other)
    for it in unscored.items:
        it.val[:] = False
    trainer.set_data(unscored)
    now[0] = 6.0
    n = len(trainer.history)
    trainer.run_steps(1)
    trainer.release()
    assert len(trainer.history) == n and trainer.validated() == {}  # no pixels: no score (never 1.0)
