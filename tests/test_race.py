"""The race of batch fine-tuning (training.race): a base that does not fit races a fresh network on a quarter of the
budget, the better goes on, the card says what was chosen and why; no race where the base fits or the user chose."""

from __future__ import annotations

import threading

import pytest
import torch

from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.training import TrainingPair, fine_tune, fine_tune_iter
from napari_unetpp.training.config import make_config
from napari_unetpp.training.engine import Trainer
from napari_unetpp.training.race import RACE_SHARE, Lanes, fresh_rival, races, real_share
from napari_unetpp.training.schedule import BudgetSchedule

from .conftest import tiny_batchnorm


def pair(em_crop, em_crop_membrane) -> TrainingPair:
    return TrainingPair(em_crop[:2, :96, :96], em_crop_membrane[:2, :96, :96], slices="all")


def trained_tiny(seed: int = 0, head_bias: float | None = None) -> LoadedModel:
    """A tiny base that looks trained (batch norms with statistics), in eval mode; ``head_bias``: every head's bias,
    e.g. -20 for a base that confidently calls everything background."""
    lm = tiny_batchnorm(seed=seed)
    for m in lm.module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.num_batches_tracked.fill_(100)
    if head_bias is not None:
        with torch.no_grad():
            for head in lm.module.heads.values():
                head.bias.fill_(head_bias)
    lm.module.eval()
    return lm


OPTS = {"epochs": 4, "steps_per_epoch": 5, "batch_size": 2, "patch_size": 32, "small_patch_size": 32, "race": True}


def scripted(monkeypatch, base_score: float, fresh_score: float) -> list[Trainer]:
    """Every validation scores ``base_score`` for the base's lane and ``fresh_score`` for the fresh one (the
    baseline makes the recipe adapt); returns the trainers released, in order."""
    released: list[Trainer] = []

    def validated(self) -> dict[int, float]:
        s = fresh_score if self.base.card.training.get("untrained") else base_score
        return {1: s, 2: s}

    real_release = Trainer.release

    def release(self) -> None:
        if not self._released:
            released.append(self)
        real_release(self)

    monkeypatch.setattr(Trainer, "validated", validated)
    monkeypatch.setattr(Trainer, "release", release)
    return released


def finished(gen):
    """Run a fine-tuning generator to its end: (phases seen, result)."""
    phases = []
    while True:
        try:
            phases.append(next(gen).phase)
        except StopIteration as stop:
            return phases, stop.value


@pytest.mark.parametrize("fresh_wins", [True, False])
def test_the_better_lane_goes_on_and_the_card_says_why(em_crop, em_crop_membrane, monkeypatch, fresh_wins):
    released = scripted(monkeypatch, 0.3, 0.6 if fresh_wins else 0.1)
    base = trained_tiny()
    phases, res = finished(fine_tune_iter(base, pair(em_crop, em_crop_membrane), save=False, **OPTS))
    race = res.data["race"]
    assert race["chosen"] == ("fresh" if fresh_wins else "base")
    assert race["base_model"] == base.card.id and "does not fit" in race["base_reason"]
    # each lane trained half of the race: a quarter of the 20-step budget is 5 steps, 2 or 3 each
    assert race["steps"]["base"] + race["steps"]["fresh"] in (5, 6)
    assert abs(race["steps"]["base"] - race["steps"]["fresh"]) <= 1
    assert "raced for 25% of the budget" in res.data["recipe"]["reason"]
    assert phases.count("race") == 1 + race["steps"]["fresh"]  # its start, then each fresh-lane step
    assert res.steps == 20  # the winner goes on to the end of its budget (20 steps: an epoch budget is per lane)
    assert res.model.card.name == base.card.name  # the user's base names the result, whoever won
    if fresh_wins:
        assert res.model.card.parent is None and "trained from scratch" in res.model.card.training["data"]
        assert res.data["recipe"]["name"] == "scratch" and res.scores == {1: 0.6, 2: 0.6}
        assert res.baseline == {1: 0.3, 2: 0.3}  # the base's scores on the same pixels: the card's "before"
        assert race["fresh"] == {"L1": 0.6, "L2": 0.6} and race["base"] == {"L1": 0.3, "L2": 0.3}
    else:
        assert res.model.card.parent == base.card.id and res.data["recipe"]["name"] == "adapt"
    # the loser is released at the race's end (its threads and memory), the winner after training
    assert len(released) == 2 and released[0].optimiser is None
    assert bool(released[0].base.card.training.get("untrained")) is (not fresh_wins)


def test_a_timed_race_takes_a_quarter_of_the_budget_and_the_run_ends_within_it(em_crop, em_crop_membrane, monkeypatch):
    """On a clock that moves one second per optimiser step (nothing else takes time), a 1-minute run: each lane
    trains about 12.5 % of the budget, and both lanes' steps together stay within it."""
    from napari_unetpp.training import optimiser

    scripted(monkeypatch, 0.3, 0.6)
    now = [0.0]
    real_step = optimiser.train_step

    def timed_step(*args, **kw):
        now[0] += 1.0
        return real_step(*args, **kw)

    monkeypatch.setattr(optimiser, "train_step", timed_step)
    opts = {k: v for k, v in OPTS.items() if k not in ("epochs", "steps_per_epoch")}
    gen = fine_tune_iter(
        trained_tiny(), pair(em_crop, em_crop_membrane), save=False, minutes=1, clock=lambda: now[0], **opts
    )
    _, res = finished(gen)
    race = res.data["race"]
    assert race["steps"]["base"] == pytest.approx(RACE_SHARE / 2 * 59, abs=1.5)  # 59 s: the save's second is kept
    assert abs(race["steps"]["base"] - race["steps"]["fresh"]) <= 1
    assert res.steps + race["steps"]["base"] <= 60 and now[0] <= 60.0  # the winner's and the loser's steps
    assert res.steps + race["steps"]["base"] >= 55


def test_no_race_by_default_where_the_base_fits_or_the_user_chose(em_crop, em_crop_membrane, monkeypatch):
    scripted(monkeypatch, 0.9, 0.95)  # a base that fits: gentle, adjusted without a race
    assert "race" not in fine_tune(trained_tiny(), pair(em_crop, em_crop_membrane), save=False, **OPTS).data
    scripted(monkeypatch, 0.3, 0.95)
    for extra in ({"recipe": "adapt"}, {"race": False}):
        res = fine_tune(trained_tiny(), pair(em_crop, em_crop_membrane), save=False, **{**OPTS, **extra})
        assert "race" not in res.data and res.data["recipe"]["name"] == "adapt"
    default = {k: v for k, v in OPTS.items() if k != "race"}  # off unless asked: it measured worse than adapting
    assert "race" not in fine_tune(trained_tiny(), pair(em_crop, em_crop_membrane), save=False, **default).data
    fresh = tiny_batchnorm()  # a fresh network has nothing to race
    assert "race" not in fine_tune(fresh, pair(em_crop, em_crop_membrane), save=False, **OPTS).data


def test_a_base_that_calls_everything_background_loses_to_a_fresh_network(em_crop, em_crop_membrane):
    """Real training on a real crop: a base whose heads confidently say background (bias -20: a few steps do not
    move it off) against a fresh network; the fresh one goes on, and beats the base on validation."""
    res = fine_tune(trained_tiny(head_bias=-20.0), pair(em_crop, em_crop_membrane), save=False, **OPTS)
    race = res.data["race"]
    assert race["chosen"] == "fresh", race
    assert max(race["fresh"].values()) > max(race["base"].values()) + 0.1
    assert res.improved and min(res.scores.values()) > 0.2


def test_a_cue_base_races_a_fresh_network_on_its_own_data(em_crop, em_crop_membrane, monkeypatch):
    """A base with an instance cue encodes its targets for the cue: the fresh network (no cue) prepares the pairs
    itself, and both score the same validation pixels."""
    from napari_unetpp.model.network import UNetPlusPlus

    torch.manual_seed(0)
    base = LoadedModel.from_module(UNetPlusPlus(features=(8, 16, 32), cue="distance", norm="batch"), name="tiny-cue")
    for m in base.module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.num_batches_tracked.fill_(100)
    rival = fresh_rival(base, seed=1)
    assert not rival.module.config.has_cue and rival.card.normalization == base.card.normalization
    assert rival.card.training["untrained"] and rival.module.config.features == base.module.config.features
    seen = []
    real_prepare = Trainer.prepare

    def prepare(self):
        yield from real_prepare(self)
        seen.append((self.base.module.config.has_cue, self.data.n_train, self.data.n_val))

    monkeypatch.setattr(Trainer, "prepare", prepare)
    labels = em_crop_membrane[:2, :96, :96]
    res = fine_tune(base, TrainingPair(em_crop[:2, :96, :96], labels, slices="all"), save=False, **OPTS)
    race = res.data["race"]
    assert set(race["fresh"]) == set(race["base"]) == {"L1", "L2"}
    (cue, *base_pixels), (no_cue, *fresh_pixels) = seen  # the base's lane, then the fresh lane's own preparation
    assert cue and not no_cue and base_pixels == fresh_pixels and base_pixels[1] > 0  # the same split


def test_each_lane_clock_leaves_out_the_other_lanes_time():
    now = [100.0]
    lanes = Lanes(lambda: now[0])
    a, b = lanes.clock(0), lanes.clock(1)
    now[0] += 3.0
    lanes.away[1] += 3.0  # lane 0 stepped for 3 s
    now[0] += 2.0
    lanes.away[0] += 2.0  # lane 1 stepped for 2 s
    assert (a(), b()) == (103.0, 102.0)
    lanes.racing = False  # the winner reads the real clock again: the run ends within its budget
    assert a() == b() == 105.0


@pytest.mark.parametrize("at", ["mid-race", "the race's end"])
def test_a_cancelled_race_releases_both_lanes(em_crop, em_crop_membrane, monkeypatch, at):
    released = scripted(monkeypatch, 0.3, 0.6)
    gen = fine_tune_iter(trained_tiny(), pair(em_crop, em_crop_membrane), save=False, **OPTS)
    for p in gen:
        if at == "mid-race" and p.phase == "race" and p.step >= 1:
            break
        if at != "mid-race" and "raced for" in p.message:  # the winner is chosen, the loser released already
            break
    else:
        pytest.fail(f"the run ended without reaching {at}")
    gen.close()  # the user cancels: nothing saved, both lanes' threads and memory released
    assert len(released) == 2 and all(t.optimiser is None for t in released)
    assert {bool(t.base.card.training.get("untrained")) for t in released} == {True, False}


def test_no_race_once_the_user_stopped_or_without_room_in_the_budget(em_crop, em_crop_membrane, monkeypatch):
    scripted(monkeypatch, 0.3, 0.6)
    stop = threading.Event()
    stop.set()
    res = fine_tune(trained_tiny(), pair(em_crop, em_crop_membrane), save=False, stop=stop, **OPTS)
    assert "race" not in res.data and res.stopped == "stopped by user"
    base = trained_tiny()
    trainer = Trainer(base, pair(em_crop, em_crop_membrane), make_config(None, OPTS), BudgetSchedule(None, 4))
    list(trainer.prepare())
    list(trainer.baseline())
    assert races(trainer, None)
    trainer.steps = 14  # 70 % of the budget gone: no room for a quarter and the rest
    assert real_share(trainer, trainer.steps) == pytest.approx(0.7) and not races(trainer, None)
    trainer.release()


def test_train_race_on_the_command_line_reports_the_fresh_winner(
    em_crop, em_crop_membrane, monkeypatch, tmp_path, capsys
):
    """``train --race`` where the fresh network wins: the summary says it was trained from scratch and prints the
    base's scores before it (the table reads the baseline of the same pixels)."""
    import tifffile

    from napari_unetpp.cli.app import main
    from napari_unetpp.model.registry import save_model

    scripted(monkeypatch, 0.3, 0.6)
    base = trained_tiny()
    base.card.name = "tiny-race"
    save_model(base.module, base.card)
    img, lab = tmp_path / "img.tif", tmp_path / "lab.tif"
    tifffile.imwrite(img, em_crop[:2, :96, :96])
    tifffile.imwrite(lab, em_crop_membrane[:2, :96, :96])
    args = ["train", "--image", str(img), "--labels", str(lab), "--base", "tiny-race", "--axes", "ZYX", "--race"]
    code = main([*args, "--epochs", "4", "--batch-size", "2", "--patch-size", "32", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "trained from scratch" in out and "raced for 25% of the budget" in out
    assert "L1" in out and "0.300" in out and "0.600" in out
