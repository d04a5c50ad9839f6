"""Training while the user paints: :class:`LiveTrainer`.

    with LiveTrainer(image, base="nuclei") as lt:
        lt.update(scribbles)            # 0 unknown, 1 background, 2 class; any time, any thread, never blocks
        ...                             # training runs in a thread; a snapshot about every second
        predict(image[3], lt.model, runtime="torch")
        lt.save()                       # a new model version (card: data, recipe, scores, "live")

The trainer is the batch fine-tuning engine (:class:`~napari_unetpp.training.engine.Trainer`) under an open-ended
schedule (:class:`~napari_unetpp.training.schedule.OpenSchedule`): no budget, a constant learning rate, a validation
on the held-out strokes every few seconds. Its data grows between steps (:meth:`~.engine.Trainer.set_data`; which
strokes are held out is :class:`~.scribbles.LiveData`'s). Patches centre on the strokes painted last half of the
time and replay every label otherwise.

Where to start from: without a base, a fresh network of the modality. With one, the base is scored on the first
strokes before it trains on them (it never saw them); a base below :data:`FITS` Dice there starts from a fresh
network instead (:func:`start_from`), since adapting a base that does not fit the data loses to a fresh network
(see the docs' fine-tuning page). What was chosen and why is in :attr:`LiveTrainer.start` and in the saved card.

Each snapshot is a new :class:`~napari_unetpp.model.loaded.LoadedModel` (nothing is memoised across snapshots) whose
card records the image's own pixel size, so a prediction with it does not zoom. Predict snapshots with
``runtime="torch"``: nothing is exported or measured per snapshot.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from napari_unetpp.errors import TrainingDataError
from napari_unetpp.model.card import ModelCard
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.model.modalities import new_model
from napari_unetpp.model.registry import resolve_model
from napari_unetpp.training.config import FineTuneConfig, TrainProgress, make_config
from napari_unetpp.training.engine import Trainer
from napari_unetpp.training.recipe import GOOD_BASELINE
from napari_unetpp.training.saving import FineTuneResult, save_result
from napari_unetpp.training.schedule import OpenSchedule
from napari_unetpp.training.scribbles import LiveData
from napari_unetpp.training.validation import validate

__all__ = ["FITS", "LIVE_DEFAULTS", "LiveTrainer", "start_from"]

log = logging.getLogger(__name__)

FITS = 0.5  # the base's best-level Dice on the first strokes from which live training adapts it (else: fresh)
LIVE_DEFAULTS = {"patch_size": 128, "batch_size": 4, "patience": 0, "min_delta": 0.0, "val_fraction": 0.2}


def start_from(base_scores: dict[int, float]) -> tuple[str, str]:
    """("base" or "fresh", why) from the base's per-level Dice on the strokes it never saw."""
    best = max(base_scores.values(), default=0.0)
    if best >= FITS:
        return "base", f"the base scores {best:.2f} Dice on your first strokes (>= {FITS}): adapted"
    return "fresh", f"the base scores {best:.2f} Dice on your first strokes (< {FITS}): a fresh network instead"


class LiveTrainer:
    """A network that trains on scribbles while they are painted.

    Args:
        image: The image being painted (numpy, memmap, dask; YX, ZYX, TZYX, with C where it has channels).
        base: None (a fresh network of ``modality``), a model name or path, or a :class:`LoadedModel`.
        modality: The fresh network's normalisation (default: the base's modality, else ``"fluorescence"``).
        axes: The image's axes (guessed when None).
        device: ``"auto"`` / None (CUDA, MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.
        channel: For a 1-channel model and a multi-channel image: the channel it reads.
        spacing: The image's pixel size per axis letter; recorded in the snapshots' cards (default: none, so a
            prediction with a snapshot never zooms).
        config: Hyperparameters (:class:`FineTuneConfig`; live defaults in :data:`LIVE_DEFAULTS`); keywords in
            ``options`` override its fields.
        threaded: Train in a background thread (default). False: nothing runs until :meth:`step` (tests, scripts).
        snapshot_every_s: Seconds between snapshots (default 1).
        validate_every_s: Seconds between validations on the held-out strokes (default 5).
        on_snapshot: Called (from the training thread) with each new snapshot.

    Attributes:
        start: ``{"from": "base" | "fresh", "why": ...}`` once training started.
        history: The validations (step, seconds, per-level Dice).
        error: Why training stopped on its own (one sentence), else None.
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
        on_snapshot: Callable[[LoadedModel], None] | None = None,
        **options: Any,
    ) -> None:
        self.base = None if base is None else resolve_model(base)
        known_modality = self.base.card.training.get("modality") if self.base is not None else None
        self.modality = modality or known_modality or "fluorescence"
        self.cfg = make_config(config, {**LIVE_DEFAULTS, **options})
        self.device = device or "auto"
        self.spacing, self.snapshot_every_s, self.validate_every_s = spacing, snapshot_every_s, validate_every_s
        self.on_snapshot = on_snapshot
        self._fresh = _fresh_for(self.base, self.modality, modality is None)
        first = self.base if self.base is not None else self._fresh
        self.data = LiveData(image, first, axes, channel, self.cfg.val_fraction)
        self._image, self._axes, self._channel = image, axes, channel
        self._scribbles = np.zeros(self.data.shape, np.uint8)
        self._lock = threading.Lock()
        self._dirty: set[tuple[int, ...]] = set()
        self._focus: dict[tuple[int, ...], np.ndarray] = {}
        self._wake, self._stop = threading.Event(), threading.Event()
        self._trainer: Trainer | None = None
        self._model: LoadedModel | None = None
        self._last_snapshot = 0.0
        self.start: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.error: str | None = None
        self.kept = "the latest state"
        self._stopped = False
        self.progress: TrainProgress | None = None
        self._thread = threading.Thread(target=self._run, name="napari-unetpp live", daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()

    # ----------------------------------------------------------------------------------------------- public
    def update(self, scribbles: np.ndarray, planes: Sequence[Any] | None = None) -> None:
        """Hand over the scribbles (the image's shape without C; 0 unknown, 1 background, 2.. class); ``planes``
        says which planes changed (indices over the leading axes; None: all). Copies what changed and returns."""
        s = np.asarray(scribbles)
        if s.shape != self.data.shape:
            raise TrainingDataError(f"the scribbles have shape {s.shape} but the image {self.data.shape} (without C).")
        idx = [self.data.plane_of(p) for p in planes] if planes is not None else list(np.ndindex(*self._leading()))
        with self._lock:
            for p in idx:
                new = np.asarray(s[p])
                if np.array_equal(new, self._scribbles[p]):
                    continue  # nothing new on this plane: nothing to rebuild
                self._focus[p] = self._focus.get(p, False) | ((new > 0) & (new != self._scribbles[p]))
                self._scribbles[p] = new
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
        if self._trainer is None or self._trainer.phase not in ("train", "refit"):
            return 0
        for _ in range(n):
            for p in self._trainer.step():
                self._record(p)
        self._publish()
        return self.steps - before

    def stop(self) -> LoadedModel | None:
        """Stop training and keep the latest state unless the held-out strokes say an earlier one was better;
        returns it (also :attr:`model`; :attr:`kept` says which). Idempotent."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            tr, done, self._stopped = self._trainer, self._stopped, True
        if tr is None or done:
            return self._model
        if tr.steps:
            self._publish(force=True)  # the latest state
            scores = tr.validated() if tr.data.n_val else {}
            if scores and tr.best.scores:
                before = tr.best.since
                tr.best.offer(scores, tr.setup.levels, tr.module, 0.0)
                if tr.best.since > before:  # the latest did not beat the best validated state: keep that one
                    self._publish(state=tr.best.state, force=True)
                    self.kept = "an earlier state (better on the held-out strokes)"
        tr.release()
        return self._model

    def save(self, name: str | None = None) -> FineTuneResult:
        """Stop, and save the kept state as a new model version (card: data, recipe, scores, ``live``).

        Raises:
            TrainingDataError: nothing trained yet.
        """
        self.stop()
        tr = self._trainer
        if tr is None or self._model is None:
            raise TrainingDataError("nothing trained yet: paint background (1) and a class (2) first.")
        state = {k: v.clone() for k, v in self._model.module.state_dict().items()}
        live = {"steps": tr.steps, "start": self.start, "kept": self.kept, "seconds": round(tr.schedule.elapsed(), 1)}
        return save_result(
            tr.base,
            state,
            dict(tr.best.scores),
            tr.baseline_scores,
            tr.cfg,
            name,
            tr.history,
            tr.steps,
            tr.schedule.t0,
            tr.device,
            "live",
            bool(tr.best.scores),
            {**tr.summary, "live": live},
            levels=tr.setup.levels,
        )

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
                if tr is None or tr.phase not in ("train", "refit"):
                    self._wake.wait(0.2)
                    self._wake.clear()
                    continue
                for p in tr.step():
                    self._record(p)
                self._publish()
        except Exception as exc:  # a worker thread must not die silently: the widget shows this
            self.error = f"live training stopped: {exc}"
            log.exception("live training stopped")

    def _take_scribbles(self) -> None:
        """Rebuild the changed planes' items and hand the data to the trainer (made at the first usable data)."""
        with self._lock:
            dirty, self._dirty = sorted(self._dirty), set()
            focus, self._focus = {p: self._focus[p] for p in dirty if p in self._focus}, {}
            if not dirty:
                return
            scribbles = self._scribbles.copy()
        self.data.update(scribbles, dirty, focus)
        ds = self.data.training_set()
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
            scores = _scored_on_all(self.base, ds)
            chosen, why = start_from(scores)
            self.start = {"from": chosen, "why": why, "base": base.card.id, "base_scores": scores}
            if chosen == "fresh":
                base = self._fresh
                self.data = LiveData(self._image, base, self._axes, self._channel, self.cfg.val_fraction)
                with self._lock:
                    scribbles = self._scribbles.copy()
                self.data.update(scribbles, sorted(self.data_planes()), None)
                ds = self.data.training_set()
            else:
                recipe = "gentle" if max(scores.values()) >= GOOD_BASELINE else "adapt"
                self.cfg = make_config(self.cfg, {"recipe": recipe})
        assert base is not None and ds is not None
        tr = Trainer(base, ds, self.cfg, OpenSchedule(self.validate_every_s), device=self.device, stop=self._stop)
        for p in tr.prepare():
            self._record(p)
        for p in tr.baseline({}):  # no baseline validation: the base was scored on the strokes already
            self._record(p)
        self._trainer = tr

    def data_planes(self) -> set[tuple[int, ...]]:
        """The planes holding scribbles."""
        lead = len(self.data.lay.loop)
        ann = (self._scribbles > 0).any(axis=tuple(range(lead, self._scribbles.ndim)))
        return {tuple(int(v) for v in i) for i in np.argwhere(ann)} if lead else {()}

    def _leading(self) -> tuple[int, ...]:
        return self.data.shape[: len(self.data.lay.loop)]

    def _record(self, p: TrainProgress) -> None:
        self.progress = p
        if p.val:
            self.history.append({"step": p.step, "seconds": round(p.seconds, 2), "val": dict(p.val)})

    def _publish(self, state: dict[str, torch.Tensor] | None = None, force: bool = False) -> None:
        """A snapshot as a fresh LoadedModel, at most every ``snapshot_every_s`` (taken on the training thread,
        between steps: never half-written weights)."""
        tr = self._trainer
        now = time.perf_counter()
        if tr is None or (not force and self._model is not None and now - self._last_snapshot < self.snapshot_every_s):
            return
        net = copy.deepcopy(tr.base.module).cpu()
        net.load_state_dict(state if state is not None else tr.snapshot())
        net.eval()
        snap = LoadedModel(net, _snapshot_card(tr.base, self.spacing, tr.steps, self.start))
        _ = snap.fingerprint  # hashed here, on the training thread, not on the viewer's when it is first shown
        self._model = snap
        self._last_snapshot = now
        if self.on_snapshot is not None:
            self.on_snapshot(self._model)


def _fresh_for(base: LoadedModel | None, modality: str, base_normalisation: bool) -> LoadedModel:
    """A fresh network for the data: the base's channels and classes and (``base_normalisation``) its intensity
    recipe, else the modality's."""
    if base is None:
        return new_model(modality, name=f"{modality}-live")
    cfg = base.module.config
    names = list(base.card.classes)
    classes = names[-(cfg.num_classes - 1) :] if cfg.num_classes > 1 else names[:1]
    fresh = new_model(
        modality,
        classes=classes,
        in_channels=cfg.in_channels,
        spatial_dims=cfg.spatial_dims,
        name=f"{base.card.name}-live",
    )
    if base_normalisation:
        fresh.card.normalization = dict(base.card.normalization)
    return fresh


def _scored_on_all(base: LoadedModel, ds: Any) -> dict[int, float]:
    """The base's per-level Dice on every known pixel (training and held-out): it never saw any of them."""
    items = [copy.copy(it) for it in ds.items]
    for it in items:
        it.val = it.train | it.val
    probe = type(ds)(items, ds.spatial_dims, ds.summary)
    return validate(base.module, probe, torch.device("cpu"), None, tile=base.card.tile)


def _snapshot_card(base: LoadedModel, spacing: dict[str, float] | None, steps: int, start: dict) -> ModelCard:
    """The base's card for a snapshot: its normalisation and classes, the image's own pixel size (or none)."""
    training = {k: v for k, v in base.card.training.items() if k not in ("spacing", "spacing_unit", "object_diameter")}
    training.update(live={"steps": steps, **{k: v for k, v in start.items() if k != "base_scores"}})
    if spacing:
        training["spacing"] = dict(spacing)
    card = copy.deepcopy(base.card)
    card.name, card.training, card.parent = f"{base.card.name}-live", training, base.card.id
    card.weights_sha256 = ""  # not the base's weights: the fingerprint hashes the snapshot's own
    return card
