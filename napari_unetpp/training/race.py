"""The race of batch fine-tuning (``race=True``): when the base does not fit (recipe ``adapt``), the adapted base and
a fresh network train side by side on the first :data:`RACE_SHARE` of the budget, and the run continues whichever
validates better.

    for p in race(trainer, data): ...    # the trainer after its baseline phase (adapt recipe)
    winner = ...                         # the generator's return value: the trainer that goes on

Both lanes train on the same prepared data (the base's normalisation, the same validation split; a base with an
instance cue encodes its targets for the cue, so the fresh network, which has none, prepares the pairs itself) and
alternate steps; each lane's schedule reads a clock that leaves out the other lane's steps, so each sees half of
the race as its own budget (warm-up, small patches, learning rate as in a run of its own). At the end both are
validated (the base's earlier candidates, its baseline and AdaBN, count for it), the loser is released, and the
winner's schedule reads the real clock again: the run ends within the budget. What was raced and why the winner won
is in the ``race`` entry of the card's data summary and in the recipe's reason.

It is off by default, because it measured worse than adapting the base (``benchmarks/bench_finetune.py``, 2
minutes, 2-core AVX2 CPU): a quarter of the budget is 18-26 steps per lane, where the adapted base was still in its
first dip on three of five shifts (its validation at or below its baseline) while a fresh network already scored by
calling broad regions foreground. The race chose the fresh network on four of five shifts; it finished within 0.02
Dice of ``--new`` on four, and 0.28 under it on CT liver from the nuclei model (the fresh network then had the
base's percentile normalisation, not an HU window), while adapting the base was never more than 0.013 under
``--new`` on any of the five.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Generator, Sequence
from typing import Any

import torch

from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.model.modalities import new_model
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.training.config import TrainProgress
from napari_unetpp.training.data import TrainingPair, TrainingSet
from napari_unetpp.training.engine import Trainer
from napari_unetpp.training.schedule import BudgetSchedule

__all__ = ["RACE_SHARE", "ROOM", "Lanes", "fresh_rival", "race", "races", "real_share"]

RACE_SHARE = 0.25  # share of the budget the race takes (each lane trains about half of it)
ROOM = 0.1  # share of the budget that must be left after the race (its two validations, the winner's training)


class Lanes:
    """One clock per lane: the real clock less the time spent stepping the other lane while :attr:`racing`."""

    def __init__(self, real: Callable[[], float]) -> None:
        self.real = real
        self.away = [0.0, 0.0]  # per lane: seconds spent in the other lane's steps
        self.racing = True

    def clock(self, lane: int) -> Callable[[], float]:
        return lambda: self.real() - (self.away[lane] if self.racing else 0.0)


def races(trainer: Trainer, data: Any) -> bool:
    """Whether this run races: ``race`` on, the recipe chosen automatically as ``adapt`` (a trained base that does
    not fit), no stop asked for, room left in the budget for the race and more (:func:`real_share`), no refit
    point inside the race (it would score a lane on pixels it trains on), and data the
    fresh network can read (a base with an instance cue encodes its targets for the cue, so the fresh network,
    which has none, prepares the pairs itself)."""
    cfg = trainer.cfg
    readable = not trainer.base.module.config.has_cue or not isinstance(data, TrainingSet)
    start = real_share(trainer, trainer.steps)
    room = start + RACE_SHARE + ROOM <= 1.0
    chosen = bool(cfg.race) and cfg.recipe == "auto" and trainer.recipe.name == "adapt"
    refit = trainer.refit.get("from") or 1.0  # a refit inside the race would score a lane on pixels it trains on
    return (
        chosen
        and trainer.phase == "train"
        and readable
        and room
        and refit >= start + RACE_SHARE
        and (not trainer.should_stop())
    )


def real_share(trainer: Trainer, steps: int, now: float | None = None) -> float:
    """Share of the run's budget used on the real clock (``now``, default the trainer's schedule's clock) after
    ``steps`` steps of both lanes together: the time against the minutes, the steps against the epochs (an epoch
    budget is per lane: the winner trains its own after the race)."""
    cfg, sched = trainer.cfg, trainer.schedule
    shares = []
    if cfg.minutes is not None:
        shares.append(((sched.clock() if now is None else now) - sched.t0) / (cfg.minutes * 60.0))
    if cfg.epochs is not None:
        shares.append(steps / (cfg.epochs * sched.steps_per_epoch))
    return max(shares, default=1.0)


def fresh_rival(base: LoadedModel, seed: int = 0) -> LoadedModel:
    """A fresh network for the base's data: the base's architecture without its instance cue (the labels of a
    fine-tuning rarely teach one: objects are then split by the watershed), its channels, classes, tile and
    normalisation (both lanes read the same pixels and validate alike), no pixel size (it trains at the image's
    own)."""
    config = dataclasses.replace(base.module.config, cue="none")
    fresh = new_model("fluorescence", in_channels=config.in_channels, spatial_dims=config.spatial_dims)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = UNetPlusPlus.from_config(config).eval()
    card = fresh.card
    card.name, card.classes, card.tile = base.card.name, list(base.card.classes), base.card.tile
    card.architecture, card.normalization = config.to_dict(), dict(base.card.normalization)
    card.description = f"UNet++ trained from scratch on the user's images (raced against {base.card.id})"
    if "modality" in base.card.training:
        card.training["modality"] = base.card.training["modality"]
    else:
        card.training.pop("modality", None)
    card.training["decision"]["normalization"] = f"the base's ({base.card.id}), so both lanes read the same pixels"
    if "object_diameter" in base.card.training:
        card.training["object_diameter"] = base.card.training["object_diameter"]
    return LoadedModel(module, card)


def race(
    trainer: Trainer, data: TrainingPair | Sequence[TrainingPair] | TrainingSet
) -> Generator[TrainProgress, None, Trainer]:
    """Race ``trainer`` (after its baseline phase, recipe ``adapt``; ``data``: what it was given) against a fresh
    network on :data:`RACE_SHARE` of its budget; yield both lanes' progress (the fresh lane's steps as phase
    ``"race"``) and return the trainer that goes on (the other is released; both are, when the caller closes
    the generator)."""
    cfg, base = trainer.cfg, trainer.base
    real = trainer.schedule.clock
    lanes = Lanes(real)
    start = real_share(trainer, trainer.steps)
    trainer.schedule.clock = lanes.clock(0)
    schedule = BudgetSchedule(cfg.minutes, cfg.epochs, clock=lanes.clock(1))
    schedule.t0 = trainer.schedule.t0  # one budget, counted from the run's start
    rival_cfg = dataclasses.replace(cfg, batch_size=trainer.setup.batch)  # the same batch (on CUDA: not re-sized)
    same = data if base.module.config.has_cue else _shallow(trainer.data)  # a cue base's targets: its own
    with torch.random.fork_rng(devices=[]):  # the base's lane goes on as it would without a race
        rival = Trainer(fresh_rival(base, cfg.seed), same, rival_cfg, schedule, device=trainer.device,
                        stop=trainer.should_stop)  # fmt: skip
    winner = trainer
    try:
        for _ in rival.prepare():
            pass
        for _ in rival.baseline(scores={}):  # a fresh network scores nothing worth keeping
            pass
        yield TrainProgress(
            "race",
            seconds=trainer.schedule.elapsed(),
            message=f"the base does not fit: racing it against a fresh network for {RACE_SHARE:.0%} of the budget",
        )
        end = trainer.schedule.fraction(trainer.steps) + RACE_SHARE / 2  # each lane: half the race, its own time
        while trainer.phase == "train" and rival.phase == "train":
            a, b = trainer.schedule.fraction(trainer.steps), rival.schedule.fraction(rival.steps)
            if min(a, b) >= end or real_share(trainer, trainer.steps + rival.steps, real()) >= start + RACE_SHARE:
                break
            lane = 0 if a <= b else 1
            t = real()
            if lane == 0:
                yield from trainer.step()
            else:
                for p in rival.step():
                    yield TrainProgress(
                        "race", p.step, p.epoch, real() - trainer.schedule.t0, a, p.loss,
                        message=p.message if p.phase not in ("train", "validate") else "",
                    )  # fmt: skip
            lanes.away[1 - lane] += real() - t
        for tr in (trainer, rival):
            if tr.last_val[0] != tr.steps or not tr.history[-1]["val"]:  # not validated at this step yet
                tr.best.offer(tr.revalidated({"note": "race"}), tr.setup.levels, tr.module, cfg.min_delta)
        lanes.racing = False
        winner, loser = (rival, trainer) if rival.best.mean > trainer.best.mean else (trainer, rival)
        if winner is rival:  # the base's scores on the same validation pixels: the "before" of the new card
            rival.baseline_scores = dict(trainer.baseline_scores)
        loser.release()
        yield _record(trainer, rival, winner)
    except BaseException:  # closed or failed: neither lane keeps threads, cores or memory
        rival.release()
        trainer.release()
        raise
    return winner


def _record(trainer: Trainer, rival: Trainer, winner: Trainer) -> TrainProgress:
    """The race's outcome in the winner's summary (``race``, and the recipe's reason) and as progress."""
    chosen = "fresh" if winner is rival else "base"
    why = (
        f"raced for {RACE_SHARE:.0%} of the budget: the adapted base validated {trainer.best.mean:.3f} "
        f"({trainer.steps} steps), a fresh network {rival.best.mean:.3f} ({rival.steps} steps): "
        + ("continued the fresh network" if chosen == "fresh" else "continued the base")
    )
    winner.summary["race"] = {
        "share": RACE_SHARE,
        "chosen": chosen,
        "why": why,
        "base_model": trainer.base.card.id,
        "base_reason": trainer.recipe.reason,
        "base": _rounded(trainer.best.scores),
        "fresh": _rounded(rival.best.scores),
        "steps": {"base": trainer.steps, "fresh": rival.steps},
    }
    recipe = winner.summary["recipe"] = dict(winner.summary.get("recipe", {}))
    recipe["reason"] = f"{recipe.get('reason', '')}; {why}"
    return TrainProgress(
        "validate",
        winner.steps,
        winner.epoch,
        winner.schedule.elapsed(),
        winner.schedule.fraction(winner.steps),
        val=winner.best.scores,
        best=winner.best.mean,
        message=why,
    )


def _shallow(ds: TrainingSet) -> TrainingSet:
    """The prepared data with copied items (their arrays shared: padding and hand-overs replace arrays, never
    write into them), so the fresh lane's padding and hand-overs never touch the base lane's items."""
    return type(ds)([copy.copy(it) for it in ds.items], ds.spatial_dims, dict(ds.summary))


def _rounded(scores: dict[int, float]) -> dict[str, Any]:
    return {f"L{k}": round(float(v), 4) for k, v in scores.items()}
