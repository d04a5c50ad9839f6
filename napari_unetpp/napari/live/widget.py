"""The "UNet++ Live" dock widget: the network learns while you paint.

Press *Start live*: a scribble layer opens over the image (1 = background, 2 = foreground), or the chosen labels layer
is read as a corrected mask (its edited slices fully known). Every stroke goes to a
:class:`~napari_unetpp.training.live.LiveTrainer` training in its own thread; each new snapshot re-segments the
slice on screen through the Segment widget, at its slider's depth. *Stop* keeps the latest snapshot unless the
held-out strokes say an earlier one was better; *Save* makes it a model version.

The main thread only hands strokes over (a copy of the painted planes) and polls for snapshots (a timer); nothing
there waits for training. :attr:`LiveWidget.stall` measures the main thread's longest stall during a session.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer

from napari_unetpp.inference.predict import predict_iter
from napari_unetpp.inference.review import correction_order
from napari_unetpp.model.modalities import MODALITIES
from napari_unetpp.model.registry import list_models
from napari_unetpp.napari.choices import children_blocked, image_choices
from napari_unetpp.napari.finetune.edits import painted
from napari_unetpp.napari.finetune.plot import TrainingPlot
from napari_unetpp.napari.segment.widget import SegmentWidget
from napari_unetpp.napari.workers import run_generator, user_message
from napari_unetpp.runtimes import DEVICE_CHOICES
from napari_unetpp.training.live import LiveTrainer
from napari_unetpp.training.metrics import format_scores
from napari_unetpp.training.scribbles import from_corrected_mask

__all__ = ["SCRIBBLES", "LiveWidget", "StallMeter"]

NEW = "new network ({})"
SCRIBBLES = "new scribble layer"
SCRIBBLE_COLORS = {0: "transparent", 1: "#3d7bd9", 2: "#ffd21f", None: "#ff4fa3"}  # background blue, class yellow


class StallMeter:
    """The main thread's longest stall: a timer that should tick every ``every_ms`` records the longest gap."""

    def __init__(self, every_ms: int = 10) -> None:
        self.every_ms, self.longest_ms, self._last = every_ms, 0.0, 0.0
        self.gaps_ms: list[float] = []  # every stall over 50 ms, in order
        self._timer = QTimer()
        self._timer.setInterval(every_ms)
        self._timer.timeout.connect(self._tick)

    def start(self) -> None:
        self.longest_ms, self._last, self.gaps_ms = 0.0, time.perf_counter(), []
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()

    def _tick(self) -> None:
        now = time.perf_counter()
        gap = (now - self._last) * 1e3 - self.every_ms
        self.longest_ms = max(self.longest_ms, gap)
        if gap > 50:
            self.gaps_ms.append(round(gap, 1))
        self._last = now


class LiveWidget(Container):
    """Train while you paint, and see each snapshot on the slice on screen.

    Args:
        napari_viewer: The viewer (injected by napari).

    Attributes:
        trainer: The running session's :class:`~napari_unetpp.training.live.LiveTrainer` (None between sessions).
        scribbles: The layer painted on.
        run_options: Further :class:`~napari_unetpp.training.live.LiveTrainer` keywords (tests: small patches).
        stall: The main thread's longest stall in the session (:class:`StallMeter`).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._image = ComboBox(label="image", choices=lambda _: image_choices(napari_viewer), nullable=True)
        self._base = ComboBox(
            label="start from",
            choices=lambda _: [r.id for r in list_models()] + [NEW.format(m) for m in MODALITIES],
            tooltip="A model to adapt (replaced by a fresh network when it scores below 0.5 Dice on your first "
            "strokes), or a fresh network whose modality picks the intensity normalisation",
        )
        self._paint_on = ComboBox(
            label="paint on",
            choices=self._paint_choices,
            tooltip="A new scribble layer (1 = background, 2 = foreground, 0 = not annotated), or a labels layer read "
            "as a corrected mask (0 = background on the slices you edit)",
        )
        self._device = ComboBox(label="device", choices=list(DEVICE_CHOICES), value="auto")
        self._toggle = PushButton(text="Start live")
        self._save = PushButton(text="Save version", enabled=False)
        self._rank_btn = PushButton(text="Where to correct next?", enabled=False)
        self._next = ComboBox(
            label="correct next",
            choices=[],
            nullable=True,
            tooltip="Regions where the latest snapshot's heads disagree most (their spread; 0 = all agree), most "
            "uncertain first",
        )
        self._go = PushButton(text="Go there", enabled=False)
        self._status = Label(value="Press Start live, then paint background (1) and objects (2).")
        self._status.native.setWordWrap(True)
        self._status.native.setMinimumWidth(320)
        self.extend(
            [
                self._image,
                self._base,
                self._paint_on,
                self._device,
                Container(widgets=[self._toggle, self._save], layout="horizontal", labels=False),
                Container(widgets=[self._status], labels=False),
                Container(widgets=[self._rank_btn, self._go], layout="horizontal", labels=False),
                self._next,
            ]
        )
        self.plot = TrainingPlot()
        self.native.layout().addWidget(self.plot)
        self.trainer: LiveTrainer | None = None
        self.scribbles: Labels | None = None
        self.run_options: dict[str, Any] = {}
        self.stall = StallMeter()
        self._mask_mode = False
        self._shown: Any = None
        self._plotted = self._loss_step = 0
        self._painted: set[tuple[int, ...]] = set()  # planes painted since the last hand-over
        self._sessions: list[LiveTrainer] = []  # closed when the widget goes (held by the list, not the widget)
        self._poll = QTimer()
        self._poll.setInterval(200)
        self._poll.timeout.connect(self.poll)
        self._toggle.changed.connect(self.toggle)
        self._save.changed.connect(self.save)
        self._rank_btn.changed.connect(self.rank)
        self._go.changed.connect(self.go)
        napari_viewer.layers.events.inserted.connect(self.reset_choices)
        napari_viewer.layers.events.removed.connect(self.reset_choices)
        self.native.destroyed.connect(self._poll.stop)
        self.native.destroyed.connect(functools.partial(_close_all, self._sessions))
        seg = SegmentWidget.for_viewer(napari_viewer)
        if seg is not None and seg.selected_model_id in self._base.choices:
            self._base.value = seg.selected_model_id

    # ---------------------------------------------------------------------------------------------- choices
    def _paint_choices(self, _=None) -> list[Any]:
        image = self._image.value if hasattr(self, "_image") else None
        shape = None if image is None else _shape_without_channels(image)
        fits = [(ly.name, ly) for ly in self._viewer.layers if isinstance(ly, Labels) and ly.data.shape == shape]
        return [(SCRIBBLES, SCRIBBLES)] + [f for f in fits if f[1] is not self.scribbles]

    def reset_choices(self, *_: Any) -> None:
        """Refresh the lists without side effects (napari calls this while it removes layers)."""
        with children_blocked(self):
            super().reset_choices()

    # ------------------------------------------------------------------------------------------------ session
    @property
    def running(self) -> bool:
        """Whether a live session trains."""
        return self.trainer is not None and self.trainer.running

    def toggle(self, _=None) -> None:
        """Start a live session, or stop the running one."""
        self.stop() if self.trainer is not None else self.start()

    def start(self, _=None) -> None:
        """Open the scribble layer (or read the chosen labels layer) and start training on what is painted."""
        image = self._image.value
        if image is None:
            show_error("Add or select an image layer to paint on.")
            return
        base = str(self._base.value or "")
        modality = next((m for m in MODALITIES if base == NEW.format(m)), None)
        try:
            self.trainer = LiveTrainer(
                image.data, None if modality else base, modality, device=self._device.value, **self.run_options
            )
        except Exception as exc:  # noqa: BLE001 - one sentence; the viewer keeps working
            show_error(user_message(exc))
            return
        target = self._paint_on.value
        self._mask_mode = isinstance(target, Labels)
        if self._mask_mode:
            self.scribbles = target
        else:
            data = np.zeros(self.trainer.data.shape, np.uint8)
            self.scribbles = self._viewer.add_labels(
                data, name=f"{image.name} live scribbles", scale=image.scale[-data.ndim :], opacity=0.8
            )
            self.scribbles.colormap = napari.utils.colormaps.DirectLabelColormap(color_dict=SCRIBBLE_COLORS)
            self.scribbles.selected_label, self.scribbles.brush_size = 2, 4
            self.scribbles.mode = "paint"
            self._viewer.layers.selection.active = self.scribbles
        self.scribbles.events.paint.connect(self._on_paint)
        self._shown, self._plotted, self._loss_step, self._painted = None, 0, 0, set()
        self.plot.clear()
        self._image_layer = image
        self._toggle.text, self._save.enabled = "Stop live", False
        self._status.value = (
            "Live: paint objects (label 2) and background (label 1); each stroke trains."
            if not self._mask_mode
            else "Live: correct the mask; each edited slice trains (it counts as fully correct)."
        )
        self._sessions.append(self.trainer)
        self.stall.start()
        self._poll.start()

    def stop(self, _=None) -> None:
        """Stop training: the training thread validates the last state and keeps it, or an earlier one the held-out
        strokes prefer; the widget shows the result when that is done (nothing here waits for it)."""
        tr = self.trainer
        if tr is None:
            return
        self._disconnect()
        tr.stop(wait=False)
        self._toggle.enabled = False
        self._status.value = "Stopping: validating the last state on the held-out strokes ..."
        self._finished, self.trainer = tr, None
        self._sessions[:] = [tr]  # only the last session's state is kept (for Save); earlier ones are closed

    def _stopped(self, tr: LiveTrainer) -> None:
        """The session ended (on the training thread): show what was kept; Save is possible."""
        self._poll.stop()
        self.stall.stop()
        kept = tr.model
        self._toggle.text, self._toggle.enabled, self._save.enabled = "Start live", True, kept is not None
        self._rank_btn.enabled = kept is not None
        self._status.value = tr.error or (
            f"Stopped after {tr.steps} steps; kept {tr.kept}. Save it as a version, or start again."
            if kept is not None
            else "Stopped before anything trained: paint background (1) and objects (2) while live."
        )

    def save(self, _=None) -> None:
        """Save the kept snapshot as a new model version and select it in the Segment widget."""
        tr = getattr(self, "_finished", None) or self.trainer
        if tr is None:
            return
        try:
            res = tr.save()
        except Exception as exc:  # noqa: BLE001 - one sentence
            show_error(user_message(exc))
            return
        self._save.enabled = False
        show_info(f"Saved {res.model.card.id}.")
        self._status.value = f"Saved {res.model.card.id} ({format_scores(res.scores)})."
        seg = SegmentWidget.for_viewer(self._viewer)
        if seg is not None:
            seg.show_live(None)
            seg.show_new_model(res.model.card.id, seg.display().depth, getattr(self, "_image_layer", None))

    # -------------------------------------------------------------------------------------------- main thread
    def _on_paint(self, event: Any) -> None:
        slices, _ = painted(getattr(event, "value", None), self.scribbles.data.ndim if self.scribbles else 2)
        if not slices:
            return
        if not self._painted:  # napari may send this before it writes the stroke: hand over once it is written,
            QTimer.singleShot(0, self._hand_over)  # and once for every event that came meanwhile
        self._painted |= slices

    def _hand_over(self) -> None:
        slices, self._painted = self._painted, set()
        tr, layer = self.trainer, self.scribbles
        if tr is None or layer is None:
            return
        try:
            if not tr.data.lay.loop:  # one plane, or a 3D model's volume: the whole layer is its plane
                data = np.asarray(layer.data)
                tr.update(from_corrected_mask(data, self._classes()) if self._mask_mode else data)
                return
            planes = {p: np.asarray(layer.data[p]) for p in sorted(slices)}  # only the planes painted
            if self._mask_mode:
                planes = {p: from_corrected_mask(v, self._classes()) for p, v in planes.items()}
            tr.update(planes)
        except Exception as exc:  # noqa: BLE001 - a bad label: one sentence, the session goes on
            self._status.value = user_message(exc)

    def _classes(self) -> int:
        tr = self.trainer
        cfg = tr.data.model.module.config if tr is not None else None
        return 1 if cfg is None or cfg.has_cue else cfg.num_classes

    def poll(self, _=None) -> None:
        """Show a new snapshot on the slice on screen, and the session's progress (the timer calls it)."""
        tr = self.trainer or getattr(self, "_finished", None)
        if tr is None:
            return
        ended = self.trainer is None and tr.finished.is_set()
        if tr.error:
            self._status.value = tr.error
        lm = tr.model
        if lm is not None and lm is not self._shown:
            self._shown = lm
            self._rank_btn.enabled = True
            seg = SegmentWidget.for_viewer(self._viewer)
            if seg is not None:
                seg.show_live(lm, getattr(self, "_image_layer", None))
            held = f"; held-out {format_scores(tr.history[-1]['val'])}" if tr.history else ""
            self._status.value = f"Live: step {tr.steps}, snapshot shown{held}. {tr.start.get('why', '')}"
        p = tr.progress
        if p is not None and p.loss is not None and p.step > self._loss_step:
            self.plot.add_loss(p.step, p.loss)
            self._loss_step = p.step
        history = tr.history
        for h in history[self._plotted :]:
            self.plot.add_validation(h["step"], h["val"])
        self._plotted = len(history)
        if ended:
            self._stopped(tr)

    # ------------------------------------------------------------------------------------ where to correct next
    def rank(self, _=None) -> None:
        """Rank the image's regions by the latest snapshot's head disagreement (every level of every plane, in a
        worker, on PyTorch) and list them under *correct next*."""
        tr = self.trainer or getattr(self, "_finished", None)
        image = getattr(self, "_image_layer", None)
        lm = tr.model if tr is not None else None
        if lm is None or image is None or lm.max_depth < 2:
            show_error("Train a snapshot first (two levels or more): paint background (1) and objects (2) while live.")
            return
        data, device = image.data, self._device.value

        def job():
            pred = yield from predict_iter(data, lm, depth=lm.max_depth, levels="all", runtime="torch", device=device)
            return correction_order(pred, top=8)

        def done(ranked: list) -> None:
            self._next.choices = [(str(s), s) for s in ranked]
            if ranked:
                self._next.value = ranked[0]
            self._go.enabled = bool(ranked)
            self._rank_btn.enabled = True

        self._rank_btn.enabled = False
        self._status.value = "Ranking the regions by the heads' disagreement ..."
        run_generator(job, lambda _p: None, done, self._rank_failed)

    def _rank_failed(self, message: str) -> None:
        self._rank_btn.enabled = True
        self._status.value = message

    def go(self, _=None) -> None:
        """Move the view to the region chosen under *correct next* (its slice, centred on it)."""
        s, image = self._next.value, getattr(self, "_image_layer", None)
        if s is None or image is None:
            return
        world = image.data_to_world(s.centre)
        lead = len(s.plane)
        for axis in range(lead):
            self._viewer.dims.set_point(axis, world[axis])
        scene = getattr(self._viewer, "scene", None)  # napari >= 0.9 (viewer.camera before)
        (scene.camera if scene is not None else self._viewer.camera).center = tuple(world[lead:])

    def _disconnect(self) -> None:
        if self.scribbles is not None:
            try:
                self.scribbles.events.paint.disconnect(self._on_paint)
            except (TypeError, ValueError, RuntimeError):
                pass


def _close_all(sessions: list[LiveTrainer], *_: Any) -> None:
    """The widget went: its sessions stop and let go of their threads (connected with the list, not the widget)."""
    for s in sessions:
        s.close()
    sessions.clear()


def _shape_without_channels(image: Image) -> tuple[int, ...]:
    shape = tuple(image.data.shape)
    return shape[:-1] if image.rgb else shape
