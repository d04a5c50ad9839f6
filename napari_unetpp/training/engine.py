"""The training engine: one object holding a run's state (:class:`Trainer`), advanced a phase or a step at a time.

Phases (:attr:`Trainer.phase`, in order): ``prepare`` (data, network, batch and patch sizes), ``baseline`` (the base
model's validation, the recipe, AdaBN), ``train`` (:meth:`Trainer.step`: one optimiser step with the validation it
brings), ``refit`` (the last steps, when the validation pixels train too), ``finalize`` (the best state saved), then
``done``. Each phase method is a generator of :class:`~napari_unetpp.training.config.TrainProgress`;
:meth:`Trainer.run_steps` runs steps synchronously. When to do what is the schedule's (:mod:`.schedule`: a budget for
:func:`~napari_unetpp.training.loop.fine_tune_iter`, or none); the steps sample a :class:`~.source.BatchSource`,
whose data :meth:`Trainer.set_data` replaces (from any thread) before the next step. Decisions: :mod:`.loop`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.runtimes import describe_device, hold_cores, release_memory, release_pending, resolve_device
from napari_unetpp.training.config import FineTuneConfig, TrainProgress
from napari_unetpp.training.data import TrainingPair, TrainingSet, prepare_data
from napari_unetpp.training.metrics import format_scores
from napari_unetpp.training.optimiser import Optimiser
from napari_unetpp.training.recipe import reestimate_batchnorm
from napari_unetpp.training.saving import FineTuneResult, save_result
from napari_unetpp.training.schedule import Schedule
from napari_unetpp.training.setup import calibration, holding_cores, set_up
from napari_unetpp.training.source import BatchSource, statistics_batches, with_validation_trained
from napari_unetpp.training.steps import (
    BestState,
    freeze_batchnorms,
    mean_dice,
    refit_pays,
    state_snapshot,
    steps_per_epoch,
)
from napari_unetpp.training.validation import validate

__all__ = ["PHASES", "Trainer"]

PHASES = ("prepare", "baseline", "train", "refit", "finalize", "done")


class Trainer:
    """A fine-tuning run's state (network, optimiser, data, best state, phase), advanced a phase or a step at a time.

    Args:
        base: The base model (never modified: the trainer copies its network).
        data: Training pairs (prepared in :meth:`prepare`) or a prepared
            :class:`~napari_unetpp.training.data.TrainingSet`.
        cfg: Hyperparameters (``minutes`` and ``epochs`` are the schedule's business).
        schedule: When to validate, refit and stop, and the learning rate (created at the run's start: its clock
            starts there).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"`` or a torch device.
        stop: An event (or callable) that ends training at the next step, keeping the best state.

    Attributes:
        phase: The phase the trainer is in (one of :data:`PHASES`).
        steps: Optimiser steps done.
        epoch: Validations done since the baseline.
        stopped: Why training ended (``"budget"``, ``"early stopping"``, ``"stopped by user"``).
        history: One dict per validation (step, seconds, loss, per-level Dice).
        summary: The data and decisions, for the card.
    """

    def __init__(
        self,
        base: LoadedModel,
        data: TrainingPair | Sequence[TrainingPair] | TrainingSet,
        cfg: FineTuneConfig,
        schedule: Schedule,
        *,
        device: str | torch.device = "auto",
        stop: threading.Event | Callable[[], bool] | None = None,
    ) -> None:
        self.base, self.cfg, self.schedule = base, cfg, schedule
        self.device = resolve_device(device)
        release_pending()  # memory a recent prediction kept for the next one: training needs its own
        self.should_stop = stop.is_set if isinstance(stop, threading.Event) else (stop or (lambda: False))
        self.rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.phase = "prepare"
        self.steps = self.epoch = 0
        self.stopped = "budget"
        self.history: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self._pairs = data
        self._pending: TrainingSet | None = None
        self._lock, self._weights = threading.Lock(), threading.Lock()  # set_data's hand-over; a step's weights
        self._val_changed = False
        self._cores: Any = None
        self._released = False
        self.optimiser: Optimiser | None = None
        self.source: BatchSource  # made in prepare()
        self.refit: dict[str, Any] = {}
        self.losses: list[float] = []

    # ------------------------------------------------------------------------------------------------- phases
    def prepare(self) -> Iterator[TrainProgress]:
        """The prepare phase: the data (normalised, split), the network on its device, batch and patch sizes."""
        self._expect("prepare")
        cfg, dev = self.cfg, self.device
        if isinstance(self._pairs, TrainingSet):
            ds = self._pairs
        else:
            ds = prepare_data(self._pairs, self.base, ignore_label=cfg.ignore_label, val_fraction=cfg.val_fraction)
        self.setup = net = set_up(self.base, ds, cfg, dev)
        self.module = net.module
        self.summary = {**ds.summary, "patch": list(net.full_patch), "batch": net.batch}
        mirror = cfg.mirror if cfg.mirror is not None else self.base.normalization.mode != "window"
        self.source = BatchSource(ds, self.rng, cfg, mirror, dev)  # flips and quarter turns: off for CT anatomy
        self.phase = "baseline"
        yield TrainProgress(
            "prepared",
            seconds=self.schedule.elapsed(),
            message=f"{ds.n_train} training and {ds.n_val} validation pixels in {len(ds.items)} slice(s); patches "
            f"{'x'.join(map(str, net.full_patch))}, batch {net.batch}, on {describe_device(dev)}",
        )

    def baseline(self, scores: dict[int, float] | None = None) -> Iterator[TrainProgress]:
        """The baseline phase: the base validated (its score is the first candidate; ``scores``: known already, ``{}``
        none), the recipe chosen from it, AdaBN when the recipe says so; then the optimiser is made (phase train)."""
        self._expect("baseline")
        self.baseline_scores = baseline = self.validated() if scores is None else dict(scores)
        recipe = self.setup.recipe_for(baseline, self.cfg)
        self.recipe = recipe
        small = list(self.setup.small_patch) if recipe.small_patch_until else None
        self.summary.update(recipe=recipe.to_dict(), small_patch=small)
        self.best = BestState(mean_dice(baseline, self.setup.levels), baseline, state_snapshot(self.module))
        self.history = [{"step": 0, "seconds": round(self.schedule.elapsed(), 2), "loss": None, "val": baseline}]
        yield TrainProgress(
            "baseline",
            seconds=self.schedule.elapsed(),
            val=baseline,
            best=self.best.mean,
            message=f"base model: {format_scores(baseline)}; {recipe.describe()}"
            + (f"; patches {'x'.join(map(str, self.setup.small_patch))} first" if recipe.small_patch_until else ""),
        )
        if recipe.reestimate_batchnorm:
            yield self._reestimated()
        self._start_training()

    def step(self) -> Iterator[TrainProgress]:
        """One optimiser step of the train or refit phase, with what falls due around it: the refit decision
        before it, a validation after it; or the end of training (phase finalize) when the schedule is done or the
        stop is set. Data handed to :meth:`set_data` is trained on from this step on."""
        if self.phase not in ("train", "refit"):
            raise RuntimeError(f"step() needs the train or refit phase; the trainer is in {self.phase!r}.")
        with self._lock:
            data, self._pending = self._pending, None
        if data is not None:  # new validation pixels: the best score no longer compares (see _after_step)
            self._val_changed |= self.source.replace(data, self.setup.full_patch, refit=self.phase == "refit")
            self.summary.update(train_pixels=data.n_train, val_pixels=data.n_val, n_items=len(data.items))
        if self.should_stop():
            self._finish("stopped by user")
            return
        if self.schedule.done(self.steps):
            self._finish()
            return
        now = self.schedule.now(self.steps)
        if now.refit and self.refit["why"] == "not reached":
            yield self._decide_refit(now.fraction)
        assert self.optimiser is not None
        patch = self.setup.small_patch if now.small_patches else self.setup.full_patch
        batch = self.source.get(self.setup.batch, patch)
        with self._weights:
            done = self.optimiser.step(batch, now.learning_rate, self.rng, self.schedule.clock)
        if done is None:  # out of memory: the next step tries smaller
            yield self._progress("retry", message=self.setup.shrink(patch))
            return
        loss, self.schedule.step_seconds = done
        self.steps += 1
        self.losses.append(loss)
        yield self._progress("train", loss=loss, best=self.best.mean, message=f"step {self.steps}: loss {loss:.4f}")
        yield from self._after_step(patch)

    def run_steps(self, n: int) -> list[TrainProgress]:
        """Run up to ``n`` calls of :meth:`step` synchronously (fewer when training ends) and return their progress."""
        out: list[TrainProgress] = []
        for _ in range(n):
            if self.phase not in ("train", "refit"):
                break
            out.extend(self.step())
        return out

    def finalize(
        self, *, name: str | None = None, save: bool = True, classes: list[str] | None = None
    ) -> Generator[TrainProgress, None, FineTuneResult]:
        """The finalize phase: the best state becomes a new model version (saved unless ``save`` is False, named
        ``name`` or the default) with its card; returns the :class:`~napari_unetpp.training.saving.FineTuneResult`."""
        self._expect("finalize")
        self.release()
        yield self._progress(
            "saving",
            fraction=1.0,
            best=self.best.mean,
            message=f"{self.stopped} after {self.steps} steps" + ("; saving" if save else ""),
        )
        clock = self.schedule
        t0 = clock.t0 if clock.clock is time.perf_counter else time.perf_counter() - clock.elapsed()
        result = save_result(
            self.base,
            self.best.state,
            self.best.scores,
            self.baseline_scores,
            self.cfg,
            name,
            self.history,
            self.steps,
            t0,
            self.device,
            self.stopped,
            self.best.improved,
            self.summary,
            write=save,
            classes=classes,
            levels=self.setup.levels,
            calibration=calibration(self.data.items),
        )
        release_memory(self.device)
        self.phase = "done"
        return result

    # ------------------------------------------------------------------------------------------ outside access
    @property
    def data(self) -> TrainingSet:
        """The data the steps train on and validation scores (after :meth:`prepare`)."""
        return self.source.data

    def set_data(self, data: TrainingSet) -> None:
        """Train on ``data`` from the next step on (thread-safe; the last data given wins). Its items are padded
        to the patch; validation scores its validation pixels."""
        with self._lock:
            self._pending = data

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The network's current weights, copied to the CPU: a consistent state from any thread (it waits for a
        step that is changing them)."""
        with self._weights:
            return state_snapshot(self.module)

    def release(self) -> None:
        """Release the cores, the batch maker and the device memory of training (idempotent; also on a cancel)."""
        if self._released:
            return
        self._released = True
        if self._cores is not None:
            self._cores.release()
            self._cores = None
        if self.optimiser is not None:
            self.source.close()
            if self.source.threaded:
                self.summary["waited_for_batches_s"] = round(self.source.wait_seconds, 2)
            self.summary["train_steps_s"] = round(self.optimiser.seconds, 2)
            self.optimiser = None
        if getattr(self, "module", None) is not None:
            self.module.to("cpu")
            if self.device.type != "cpu":  # the accelerator's cached memory; on the CPU the freed tensors are
                release_memory(self.device)  # back already, and a full collection of napari's heap took ~1 s

    # ------------------------------------------------------------------------------------------------ helpers
    def _expect(self, phase: str) -> None:
        if self.phase != phase:
            raise RuntimeError(f"{phase}() runs in the {phase} phase; the trainer is in {self.phase!r}.")

    def _progress(self, phase: str, *, fraction: float | None = None, **kw: Any) -> TrainProgress:
        frac = self.schedule.fraction(self.steps) if fraction is None else fraction
        return TrainProgress(phase, self.steps, self.epoch, self.schedule.elapsed(), frac, **kw)

    def validated(self) -> dict[int, float]:
        """Per-level validation Dice; its duration is what the schedule keeps for the last validation."""
        if self.data.n_val == 0:  # nothing held out yet (a live run's first strokes): no score, not 1.0
            return {}
        t_val = self.schedule.clock()
        with holding_cores(self.device):  # predict's tiles, on the module trained
            scores = validate(self.module, self.data, self.device, self.setup.amp, tile=self.base.card.tile)
        self.schedule.val_seconds = self.schedule.clock() - t_val
        return scores

    def revalidated(self, note: dict[str, Any] | None = None) -> dict[int, float]:
        """A validation during training, recorded in the history (train mode and frozen batch norms restored)."""
        self.epoch += 1
        scores = self.validated()
        freeze_batchnorms(self.frozen)
        self.last_val = (self.steps, self.schedule.elapsed())
        self.history.append({"step": self.steps, "seconds": round(self.last_val[1], 2), "loss": None, "val": scores})
        self.history[-1].update(note or {})
        return scores

    def _reestimated(self) -> TrainProgress:
        """AdaBN: batch-norm statistics re-estimated on the user's images, then validated (a candidate too)."""
        with holding_cores(self.device):
            batches = statistics_batches(
                self.data, self.rng, self.setup.batch, self.setup.full_patch, self.device, self.setup.fmt
            )
            n = reestimate_batchnorm(self.module, batches)
        scores = self.validated()
        self.history.append(
            {"step": 0, "seconds": round(self.schedule.elapsed(), 2), "loss": None, "val": scores, "note": "AdaBN"}
        )
        self.best.offer_statistics(scores, self.setup.levels, self.module)
        return self._progress(
            "statistics",
            val=scores,
            best=self.best.mean,
            message=f"batch-norm statistics re-estimated on {n} batches of your images: {format_scores(scores)}",
        )

    def _start_training(self) -> None:
        """The optimiser, loss and batches; the plan handed to the schedule; the cores held (CPU). Phase train."""
        cfg, ds, recipe = self.cfg, self.data, self.recipe
        self.optimiser = Optimiser(self.setup, recipe, cfg, self.device)
        spe = cfg.steps_per_epoch or steps_per_epoch(ds.n_train, self.setup.batch, self.setup.full_patch)
        refit_at = recipe.refit_from if cfg.refit_from is None else float(cfg.refit_from)
        self.schedule.plan(
            recipe, spe, fixed_epochs=bool(cfg.steps_per_epoch), refit_from=refit_at, warmup_steps=cfg.warmup_steps
        )
        self.refit = {"from": refit_at, "used": False, "why": "not reached" if refit_at else "off"}
        self.summary.update(steps_per_epoch=spe, mirror=self.source.mirror, refit=self.refit)
        self.last_val = (0, self.schedule.elapsed())
        self.frozen: list[Any] = self.setup.statistics if recipe.freeze_batchnorm else []  # decided once, first
        self.module.train()
        freeze_batchnorms(self.frozen)
        self.source.start()
        self._cores = hold_cores() if self.device.type == "cpu" else None  # released by release()
        self.phase = "train"

    def _decide_refit(self, fraction: float) -> TrainProgress:
        """At the refit point: the validation pixels join training (phase refit) if validation is still improving,
        else the run goes on keeping its best validated state."""
        validated_now = self.last_val[0] != self.steps  # else the validation just made decides
        if validated_now:
            self.revalidated()
        scores = self.history[-1]["val"]
        mean = mean_dice(scores, self.setup.levels)
        best = self.best
        if refit_pays(mean, best.mean, mean_dice(self.baseline_scores, self.setup.levels)):
            best.mean, best.scores, best.improved = mean, scores, True
            why = f"validation still improving at {self.refit['from']:.0%} of the budget"
            self.refit.update(used=True, step=self.steps, why=why)
            self.source.replace(with_validation_trained(self.data), self.setup.full_patch)
            self.phase = "refit"
            message = "still improving: the validation pixels train too from now on, and the final state is kept"
        else:
            self.refit["why"] = f"validation not improving (best {best.mean:.3f}, now {mean:.3f})"
            message = "no longer improving: the best validated state is kept"
        return self._progress(
            "validate" if validated_now else "refit",
            fraction=fraction,
            val=scores if validated_now else None,
            best=best.mean,
            message=f"validation after {self.steps} steps: {format_scores(scores)}; {message}",
        )

    def _after_step(self, patch: tuple[int, ...]) -> Iterator[TrainProgress]:
        """The validation a step brings (when due, and always at the end of training), the best state it keeps, and
        early stopping; in the refit phase, only the final validation (scored on pixels it trained on)."""
        last = self.schedule.done(self.steps) or self.should_stop()
        due = self.schedule.validation_due(self.steps, *self.last_val)
        trained_on = self.phase == "refit"  # scored on pixels it trained on: shown, never used to choose
        if not (last or due) or (trained_on and not last):
            return
        if self.data.n_val == 0:  # nothing to score: the next validation waits for held-out pixels
            self.last_val = (self.steps, self.schedule.elapsed())
            return
        spe = self.schedule.steps_per_epoch
        loss = round(float(np.mean(self.losses[-spe:])), 4)
        scores = self.revalidated({"loss": loss, "patch": list(patch)})
        if trained_on:
            self.history[-1]["note"] = "validation pixels trained on"
        else:
            if self._val_changed:  # other validation pixels than the best was scored on: not comparable
                self.best.rebase()
                self._val_changed = False
            self.best.offer(scores, self.setup.levels, self.module, self.cfg.min_delta)
        yield self._progress(
            "refit" if trained_on else "validate",
            loss=loss,
            val=None if trained_on else scores,
            best=self.best.mean,
            message=f"{'after' if trained_on else 'validation after'} {self.steps} steps"
            + (", scored on pixels it trained on" if trained_on else "")
            + f": {format_scores(scores)}",
        )
        if trained_on:
            self._finish("stopped by user" if self.should_stop() else None)
        elif self.cfg.patience and self.best.since >= self.cfg.patience:
            self._finish("early stopping")

    def _finish(self, why: str | None = None) -> None:
        """Training is over (phase finalize); after a refit the final state is the one kept."""
        if why is not None:
            self.stopped = why
        if self.refit.get("used"):
            self.best.state = state_snapshot(self.module)  # the final state, trained on every known pixel
        self.phase = "finalize"
