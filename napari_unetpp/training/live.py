"""Training while the user paints: :class:`LiveTrainer`.

    with LiveTrainer(image, base="nuclei") as lt:
        lt.update(scribbles)            # 0 unknown, 1 background, 2 class; any time, any thread, never blocks
        ...                             # training runs in a thread; a snapshot about every second
        predict(image[3], lt.model, runtime="torch")
        lt.save()                       # a new model version (card: data, recipe, scores, "live")

The trainer is the batch fine-tuning engine (:class:`~napari_unetpp.training.engine.Trainer`) under an open-ended
schedule (:class:`~napari_unetpp.training.schedule.OpenSchedule`): no budget, a steady (or halving) rate, a validation
on the held-out strokes every few seconds (at most a fifth of the time). Its data grows between steps
(:meth:`~.engine.Trainer.set_data`; which strokes are held out is :class:`~.scribbles.LiveData`'s). Patches centre
on the strokes painted last half of the time and replay every label otherwise.

Where to start from: without a base, a fresh network of the modality. With one, the base is scored on the first
strokes before it trains on them (it never saw them); a base below :data:`FITS` Dice there starts from a fresh
network instead (:func:`start_from`), since adapting a base that does not fit the data loses to a fresh network.
What was chosen and why is in :attr:`LiveTrainer.start` and in the saved card.

Each snapshot is a new :class:`~napari_unetpp.model.loaded.LoadedModel` (nothing is memoised across snapshots) whose
card records the image's own pixel size (``spacing``, or none), so a prediction with it does not zoom; the saved
version records the same. Predict snapshots with ``runtime="torch"``: nothing is exported or measured per snapshot.

Threads: :meth:`LiveTrainer.update` only copies the planes handed over; the training thread rebuilds their items,
trains, publishes snapshots, and at the end (:meth:`LiveTrainer.stop`) validates the last state, keeps it or an
earlier better one, and releases the cores and memory (an accelerator's is kept between previews until then).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from napari_unetpp.errors import TrainingDataError
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.model.registry import resolve_model
from napari_unetpp.runtimes import device_memory, resolve_device
from napari_unetpp.training.config import FineTuneConfig, TrainProgress, make_config
from napari_unetpp.training.engine import Trainer
from napari_unetpp.training.live_model import (
    FITS,
    LIVE_DEFAULTS,
    LIVE_HALF_LIFE_S,
    LIVE_RECIPE,
    fresh_for,
    save_live,
    scored_on_all,
    snapshot_card,
    start_from,
    validation_key,
)
from napari_unetpp.training.recipe import GOOD_BASELINE
from napari_unetpp.training.saving import FineTuneResult
from napari_unetpp.training.schedule import OpenSchedule
from napari_unetpp.training.scribbles import LiveData, check_scribbles
from napari_unetpp.training.setup import calibration
from napari_unetpp.training.steps import mean_dice

__all__ = ["FITS", "LIVE_DEFAULTS", "LIVE_RECIPE", "LiveTrainer", "start_from"]

log = logging.getLogger(__name__)


class LiveTrainer:
    """A network that trains on scribbles while they are painted.

    Args:
        image: The image being painted (numpy, memmap, dask; YX, ZYX, TZYX, with C where it has channels).
        base: None (a fresh network of ``modality``), a model name or path, or a :class:`LoadedModel`.
        modality: The fresh network's normalisation (default: the base's own normalisation, else
            ``"fluorescence"``).
        axes: The image's axes (guessed when None).
        device: ``"auto"`` / None (CUDA, MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"mps"``; an accelerator's cached
            memory stays for the session.
        channel: For a 1-channel model and a multi-channel image: the channel it reads.
        spacing: The image's pixel size per axis letter, recorded in the snapshots' and the saved card (default
            none: a prediction with them never zooms).
        config: Hyperparameters (:class:`FineTuneConfig`; without one, :data:`LIVE_DEFAULTS`); keywords in
            ``options`` override its fields.
        threaded: Train in a background thread (default). False: nothing runs until :meth:`step` (tests, scripts).
        snapshot_every_s: Seconds between snapshots (default 1).
        validate_every_s: Seconds between validations on the held-out strokes (default 5).
        half_life_s: Seconds in which the learning rate halves, down to a tenth (default
            :data:`~.live_model.LIVE_HALF_LIFE_S`; None: constant).
        on_snapshot: Called with each new snapshot (from the training thread; an error in it is logged).

    Attributes:
        start: ``{"from": "base" | "fresh", "why": ...}`` once training started.
        kept: Which state :meth:`stop` kept, in words.
        error: Why training stopped on its own (one sentence), else None.
        finished: Set once the session is over (after :meth:`stop`, or an error).
    """

    def __init__(
        self,
        image: Any,
        base: Any = None,
        modality: str | None = None,
        axes: str | None = None,
        device: str | torch.device | None = None,
        *,
        channel: int | None = None,
        spacing: dict[str, float] | None = None,
        config: FineTuneConfig | None = None,
        threaded: bool = True,
        snapshot_every_s: float = 1.0,
        validate_every_s: float = 5.0,
        half_life_s: float | None = LIVE_HALF_LIFE_S,
        on_snapshot: Callable[[LoadedModel], None] | None = None,
        **options: Any,
    ) -> None:
        self.base = None if base is None else resolve_model(base)
        self.modality = modality or "fluorescence"
        self.cfg = make_config(config, {**(LIVE_DEFAULTS if config is None else {}), **options})
        self.cfg.minutes = config.minutes if config is not None else None  # no budget: make_config's default is not
        self.device = resolve_device(device or "auto")
        self.spacing, self.snapshot_every_s, self.validate_every_s = spacing, snapshot_every_s, validate_every_s
        self.half_life_s, self.on_snapshot = half_life_s, on_snapshot
        self._fresh = fresh_for(self.base, self.modality, modality is None)
        first = self.base if self.base is not None else self._fresh
        self.data = LiveData(image, first, axes, channel, self.cfg.val_fraction)
        self._image, self._axes, self._channel = image, axes, channel
        self._scribbles = np.zeros(self.data.shape, np.uint8)
        self._lock = threading.Lock()
        self._dirty: set[tuple[int, ...]] = set()
        self._focus: dict[tuple[int, ...], np.ndarray] = {}
        self._wake, self._stop = threading.Event(), threading.Event()
        self.finished = threading.Event()
        self._trainer: Trainer | None = None
        self._model: LoadedModel | None = None
        self._published_step = -1
        self._last_snapshot = 0.0
        self._usable = False  # the data handed over has background and a class
        self._best_at: tuple[str, int] | None = None  # (validation pixels, step) of the best validated state
        self._stopped_at: float | None = None
        self._calibration: Any = None
        self.start: dict[str, Any] = {}
        self.kept = "the latest state"
        self.kept_step = 0
        self.error: str | None = None
        self.progress: TrainProgress | None = None
        device_memory(self.device).enter()  # training and previews share it: no release until the session ends
        self._thread = threading.Thread(target=self._run, name="napari-unetpp live", daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()

    # ----------------------------------------------------------------------------------------------- public
    def update(self, scribbles: np.ndarray | Mapping[Any, np.ndarray], planes: Sequence[Any] | None = None) -> None:
        """Hand over the scribbles (the image's shape without C; 0 unknown, 1 background, 2.. class); ``planes``
        says which planes changed (indices over the leading axes; None: all). Or a mapping of plane index to that
        plane's scribbles. Copies those planes and returns.

        Raises:
            TrainingDataError: scribbles of another shape, or values the model has no class for (one sentence).
        """
        plane_shape = self.data.shape[len(self._leading()) :]
        if isinstance(scribbles, Mapping):
            new = {self.data.plane_of(p): np.asarray(v) for p, v in scribbles.items()}
            if any(v.shape != plane_shape for v in new.values()):
                raise TrainingDataError(f"each plane of scribbles must have the shape {plane_shape}.")
        else:
            s = np.asarray(scribbles)
            if s.shape != self.data.shape:
                raise TrainingDataError(f"the scribbles have shape {s.shape} but the image {self.data.shape} (no C).")
            idx = [self.data.plane_of(p) for p in planes] if planes is not None else list(np.ndindex(*self._leading()))
            new = {p: np.asarray(s[p]) for p in idx}
        cfg = self.data.model.module.config
        for v in new.values():
            check_scribbles(v, 1 if cfg.has_cue else cfg.num_classes)
        with self._lock:
            for p, plane in new.items():
                if np.array_equal(plane, self._scribbles[p]):
                    continue  # nothing new on this plane: nothing to rebuild
                self._focus[p] = self._focus.get(p, False) | ((plane > 0) & (plane != self._scribbles[p]))
                self._scribbles[p] = plane
                self._dirty.add(p)
        self._wake.set()

    @property
    def model(self) -> LoadedModel | None:
        """The latest snapshot (a :class:`LoadedModel` for :func:`~napari_unetpp.inference.predict.predict`), or
        None before the first."""
        return self._model

    @property
    def steps(self) -> int:
        """Optimiser steps trained so far."""
        return 0 if self._trainer is None else self._trainer.steps

    @property
    def history(self) -> list[dict[str, Any]]:
        """The validations on the held-out strokes (the trainer's history: step, seconds, per-level Dice)."""
        tr = self._trainer
        return [h for h in tr.history if h.get("val")] if tr is not None else []

    @property
    def running(self) -> bool:
        """Whether the training thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def step(self, n: int = 1) -> int:
        """Without a thread: take the scribbles handed over, train up to ``n`` steps, publish a snapshot; returns
        the steps done (0 while the scribbles lack background or a class)."""
        if self._thread is not None:
            raise RuntimeError("step() is for a LiveTrainer made with threaded=False; this one trains in a thread.")
        before = self.steps
        self._take_scribbles()
        tr = self._trainer
        if tr is None or not self._usable or self._stop.is_set():
            return 0
        for _ in range(n):
            for p in tr.step():
                self._record(p)
        self._publish()
        return self.steps - before

    def stop(self, wait: bool = True) -> LoadedModel | None:
        """Stop training; the training thread then validates the last state and keeps it unless the held-out
        strokes say an earlier one was better (:attr:`kept`), publishes it as :attr:`model` and releases the cores
        and memory. ``wait``: return once that is done (else at once; :attr:`finished` is set when it is).
        Idempotent."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            self._finish()
        elif wait and self._thread is not threading.current_thread():
            self._thread.join()
        return self._model

    def save(self, name: str | None = None) -> FineTuneResult:
        """Stop, and save the kept state as a new model version (card: the strokes, the live recipe, scores,
        ``live``: steps, where it started and why, which state was kept).

        Raises:
            TrainingDataError: nothing trained yet.
        """
        self.stop()
        tr, snap = self._trainer, self._model
        if tr is None or snap is None:
            raise TrainingDataError("nothing trained yet: paint background (1) and a class (2) first.")
        seconds = (self._stopped_at or time.perf_counter()) - tr.schedule.t0
        start, kept = self.start, (self.kept, self.kept_step)
        return save_live(tr, snap, start, *kept, seconds, self.data.shape, self.spacing, self._calibration, name)

    def close(self) -> None:
        """Stop training and release its thread and memory (the latest snapshot stays in :attr:`model`)."""
        self.stop()

    def __enter__(self) -> LiveTrainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ worker
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._take_scribbles()
                tr = self._trainer
                if tr is None or not self._usable or tr.phase not in ("train", "refit"):
                    self._wake.wait(0.2)
                    self._wake.clear()
                    continue
                for p in tr.step():
                    self._record(p)
                self._publish()
        except Exception as exc:  # a worker thread must not die silently: the widget shows this
            self.error = f"Live training stopped ({exc}); press Stop, then start again."
            log.exception("live training stopped")
        finally:
            self._finish()

    def _finish(self) -> None:
        """The end of the session (on the training thread): the last state validated, the better of it and the
        best earlier one kept and published, the calibration tiles taken, cores and memory released."""
        if self.finished.is_set():
            return
        tr = self._trainer
        try:
            if tr is not None and tr.steps and self.error is None:
                self._keep_better(tr)
                self._calibration = calibration(tr.data.items)
        except Exception as exc:  # the kept state stays the latest snapshot
            self.error = self.error or f"Live training could not validate its last state ({exc})."
            log.exception("live training: the last validation failed")
        finally:
            if tr is not None:
                tr.release()
            device_memory(self.device).leave()
            self.data.clear()
            self._stopped_at = time.perf_counter()
            self.finished.set()

    def _keep_better(self, tr: Trainer) -> None:
        """The latest state, unless a state validated earlier on the same held-out strokes scored higher."""
        self._publish(force=True)
        self.kept, self.kept_step = "the latest state", tr.steps
        if not tr.data.n_val or self._best_at is None or self._best_at[1] == tr.steps:
            return
        latest = mean_dice(tr.validated(), tr.setup.levels)
        if self._best_at[0] == validation_key(tr.data) and tr.best.mean > latest:
            self._publish(state=tr.best.state, force=True)
            self.kept, self.kept_step = "an earlier state (better on the held-out strokes)", self._best_at[1]

    def _take_scribbles(self) -> None:
        """Rebuild the changed planes' items and hand the data to the trainer (made at the first usable data)."""
        with self._lock:
            dirty, self._dirty = sorted(self._dirty), set()
            if not dirty:
                return
            focus, self._focus = {p: self._focus[p] for p in dirty if p in self._focus}, {}
            planes = {p: self._scribbles[p].copy() for p in dirty}
        self.data.update(planes, dirty, focus)
        ds = self.data.training_set()
        self._usable = ds is not None  # an erase that leaves one class pauses training on the old strokes
        if ds is None:
            return
        if self._trainer is None:
            self._begin(ds)
        else:
            self._trainer.set_data(ds)

    def _begin(self, ds: Any) -> None:
        """The first usable strokes: base or fresh (:func:`start_from`), then the trainer's prepare and baseline."""
        base = self.base if self.base is not None else self._fresh
        if self.base is None:
            self.start = {"from": "fresh", "why": f"no base model: a fresh {self.modality} network"}
        else:
            scores = scored_on_all(self.base, ds, self.device)
            chosen, why = start_from(scores)
            self.start = {"from": chosen, "why": why, "base": self.base.card.id, "base_scores": scores}
            if chosen == "fresh":
                base = self._fresh
                self.data = LiveData(self._image, base, self._axes, self._channel, self.cfg.val_fraction)
                with self._lock:
                    planes = {p: self._scribbles[p].copy() for p in self._annotated()}
                self.data.update(planes, sorted(planes), None)
                ds = self.data.training_set()
            elif self.cfg.recipe == "auto":  # the user's recipe stands; else gentle where the base already does well
                recipe = "gentle" if max(scores.values()) >= GOOD_BASELINE else "adapt"
                self.cfg = dataclasses.replace(self.cfg, recipe=recipe)
        if ds is None:
            return
        tr = Trainer(
            base,
            ds,
            self.cfg,
            OpenSchedule(self.validate_every_s, half_life_s=self.half_life_s),
            device=self.device,
            stop=self._stop,
        )
        for p in tr.prepare():
            self._record(p)
        for p in tr.baseline({}):  # no baseline validation: the base was scored on the strokes already
            self._record(p)
        self._trainer = tr

    def _annotated(self) -> list[tuple[int, ...]]:
        """The planes holding scribbles."""
        lead = len(self.data.lay.loop)
        ann = (self._scribbles > 0).any(axis=tuple(range(lead, self._scribbles.ndim)))
        return [tuple(int(v) for v in i) for i in np.argwhere(ann)] if lead else [()]

    def _leading(self) -> tuple[int, ...]:
        return self.data.shape[: len(self.data.lay.loop)]

    def _record(self, p: TrainProgress) -> None:
        self.progress = p
        tr = self._trainer
        if p.val and tr is not None and tr.history and tr.best.scores is tr.history[-1]["val"]:
            self._best_at = (validation_key(tr.data), tr.steps)  # this validation's state is the best now

    def _publish(self, state: dict[str, torch.Tensor] | None = None, force: bool = False) -> None:
        """A snapshot as a fresh LoadedModel after new steps, at most every ``snapshot_every_s`` (taken on the
        training thread, between steps: never half-written weights)."""
        tr = self._trainer
        now = time.perf_counter()
        soon = self._model is not None and now - self._last_snapshot < self.snapshot_every_s
        if tr is None or not tr.steps or (not force and (tr.steps == self._published_step or soon)):
            return
        net = copy.deepcopy(tr.base.module).cpu()
        net.load_state_dict(state if state is not None else tr.snapshot())
        net.eval()
        snap = LoadedModel(net, snapshot_card(tr.base, self.spacing, tr.steps, self.start))
        _ = snap.fingerprint  # hashed here, on the training thread, not on the viewer's when it is first shown
        self._model, self._last_snapshot, self._published_step = snap, now, tr.steps
        if self.on_snapshot is not None:
            try:
                self.on_snapshot(snap)
            except Exception:  # the caller's callback must not end training
                log.exception("live training: on_snapshot failed")
