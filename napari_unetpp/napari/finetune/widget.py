"""The "UNet++ Fine-tune" dock widget: retrain on the user's corrected labels in a worker, with a live plot; the new
version is then selected in the Segment widget and the current view re-segmented."""

from __future__ import annotations

import functools
import threading
from typing import Any

import napari
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, LineEdit, ProgressBar, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info

from napari_unetpp.errors import ModelFileError
from napari_unetpp.model.modalities import MODALITIES, new_model
from napari_unetpp.model.registry import list_models, load_model
from napari_unetpp.model.windowed import with_window
from napari_unetpp.napari.choices import children_blocked, configure, image_choices
from napari_unetpp.napari.finetune.edits import EditTracker
from napari_unetpp.napari.finetune.pair import TRUTH, training_pair
from napari_unetpp.napari.finetune.plot import TrainingPlot
from napari_unetpp.napari.segment.controller import MODELS_WINDOW, WINDOW_CHOICES, file_windows, pixels
from napari_unetpp.napari.segment.widget import SegmentWidget
from napari_unetpp.napari.workers import abandon, run_generator, user_message
from napari_unetpp.runtimes import DEVICE_CHOICES
from napari_unetpp.training import FineTuneResult, TrainProgress, default_name, fine_tune_iter

__all__ = ["FineTuneWidget"]

LEVELS = {"all levels": None, "fast: L1-L2 only": 2}
NEW_MODEL = "new model ({})"  # base choices that train a fresh network for the modality


class FineTuneWidget(Container):
    """Fine-tune a model on corrected labels and re-segment with the new version.

    Args:
        napari_viewer: The viewer (injected by napari).

    Attributes:
        run_options: Further :class:`~napari_unetpp.training.FineTuneConfig` fields for every run, over the budget
            and levels chosen (default none). Scripts and tests set e.g. ``{"steps_per_epoch": 2, "patch_size":
            64}`` for runs of seconds; the budget control keeps its user-facing minimum.
        result: The last run's :class:`~napari_unetpp.training.FineTuneResult` (None before, or while one runs).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._image = ComboBox(label="image", choices=self._image_choices, nullable=True)
        self._labels = ComboBox(
            label="corrected labels",
            choices=self._labels_choices,
            nullable=True,
            tooltip="Labels layer with your corrections (0 = background, > 0 = objects)",
        )
        self._base = ComboBox(
            label="start from",
            choices=self._model_choices,
            tooltip="The model to fine-tune (default: the one selected in UNet++ Segment), or a new network for "
            "images no shipped model resembles (its modality picks the intensity normalisation)",
        )
        self._window = ComboBox(
            label="HU window",
            choices=list(WINDOW_CHOICES),
            value=MODELS_WINDOW,
            visible=False,
            tooltip="CT: the Hounsfield window the network sees, stored in the new model's card (model's: the base's; "
            "a new CT model starts from soft-tissue W400 L40; dicom: the file's own)",
        )
        self._truth = ComboBox(
            label="ground truth",
            choices=list(TRUTH),
            value=TRUTH[0],
            tooltip="Which slices are correct. Pixels elsewhere are ignored, not background.",
        )
        self._slices = LineEdit(
            label="slices", value="", tooltip="For 'listed slices': e.g. 3, 7, 10-12 (first axis of a stack)"
        )
        self._edited = Label(label="edited", value="none yet: paint on the labels layer")
        self._budget_kind = ComboBox(label="budget", choices=["minutes", "epochs"], value="minutes")
        self._budget = FloatSpinBox(label="amount", min=0.1, max=600, step=0.5, value=2.0)
        self._levels = ComboBox(
            label="train",
            choices=list(LEVELS),
            value="all levels",
            tooltip="fast: trains the depth-2 sub-network only (deeper levels share its encoder and are re-validated)",
        )
        self._ignore = SpinBox(
            label="ignore label", min=-1, max=65535, value=-1, tooltip="Label value meaning 'not annotated' (-1: none)"
        )
        self._device = ComboBox(label="device", choices=list(DEVICE_CHOICES), value="auto")
        self._name = LineEdit(
            label="save as",
            value="",
            tooltip="Model name (default: the base's own line, or <shipped name>-finetuned); never overwrites",
        )
        self._classes = LineEdit(
            label="class name",
            value="",
            tooltip="What the new model segments (empty: keep the base's name); comma-separated for several classes",
        )
        self._start_btn = PushButton(text="Fine-tune")
        self._stop_btn = PushButton(text="Stop (keep best)", enabled=False)
        self._bar = ProgressBar(label="progress", min=0, max=1000, value=0)
        self._status = Label(value="Correct the mask with the paint tools, then press Fine-tune.")
        self._status.native.setWordWrap(True)
        self._status.native.setMinimumWidth(320)
        self._edited.native.setWordWrap(True)
        self.extend(
            [
                *(self._image, self._labels, self._base, self._window, self._truth, self._slices, self._edited),
                *(self._budget_kind, self._budget, self._levels, self._ignore, self._device, self._name),
                self._classes,
                Container(widgets=[self._start_btn, self._stop_btn], layout="horizontal", labels=False),
                self._bar,
                Container(widgets=[self._status], labels=False),
            ]
        )
        self.plot = TrainingPlot()
        self.native.layout().addWidget(self.plot)

        self.edits = EditTracker(lambda ly: isinstance(ly, Labels), self._on_edit)
        self.run_options: dict[str, Any] = {}
        self.result: FineTuneResult | None = None
        self._worker: Any = None
        self._stop: threading.Event | None = None

        self._labels.changed.connect(self._show_edited)
        self._truth.changed.connect(self._show_edited)
        self._budget_kind.changed.connect(self._on_budget_kind)
        self._base.changed.connect(self._on_base)
        self._start_btn.changed.connect(self.start)
        self._stop_btn.changed.connect(self.stop)
        napari_viewer.layers.events.inserted.connect(self._on_layers_changed)
        napari_viewer.layers.events.removed.connect(self._on_layers_changed)
        self._jobs: list[tuple[Any, threading.Event]] = []  # running (worker, stop), ended when the widget goes
        self.native.destroyed.connect(functools.partial(_abandon_jobs, self._jobs))
        self._on_layers_changed()
        seg = SegmentWidget.for_viewer(napari_viewer)
        if seg is not None and seg.selected_model_id in self._base.choices:
            self._base.value = seg.selected_model_id
        self._on_base()

    def configure(self, **values: Any) -> None:
        """Set controls as a user would, by name: ``image``, ``labels`` (layers), ``base``, ``window``, ``truth``,
        ``slices``, ``budget_kind`` (``"minutes"``/``"epochs"``), ``budget``, ``levels``, ``ignore``, ``device``,
        ``name``, ``classes``."""
        controls = {"image": self._image, "labels": self._labels, "base": self._base, "window": self._window}
        controls.update(truth=self._truth, slices=self._slices, budget_kind=self._budget_kind, budget=self._budget)
        controls.update(levels=self._levels, ignore=self._ignore, device=self._device, name=self._name)
        configure({**controls, "classes": self._classes}, values)

    @property
    def running(self) -> bool:
        """Whether a fine-tuning run is going."""
        return self._worker is not None

    @property
    def status(self) -> str:
        """The status line (what the run does, its result, or the last error)."""
        return str(self._status.value)

    # ----------------------------------------------------------------- choices
    def _image_choices(self, _=None) -> list[tuple[str, Image]]:
        return image_choices(self._viewer)

    def _labels_choices(self, _=None) -> list[tuple[str, Labels]]:
        return [(ly.name, ly) for ly in self._viewer.layers if isinstance(ly, Labels)]

    def _model_choices(self, _=None) -> list[str]:
        return [r.id for r in list_models()] + [NEW_MODEL.format(m) for m in MODALITIES]

    def _new_modality(self) -> str | None:
        """The modality when "new model (...)" is chosen, else None."""
        value = str(self._base.value or "")
        return next((m for m in MODALITIES if value == NEW_MODEL.format(m)), None)

    def reset_choices(self, *_: Any) -> None:
        """Refresh the lists without side effects (napari calls this while it removes layers)."""
        with children_blocked(self):
            super().reset_choices()

    def _on_layers_changed(self, _=None) -> None:
        self.reset_choices()
        self.edits.sync(self._viewer.layers)  # a layer that went takes its edits and its handler with it
        images = [c for c in self._image.choices if c is not None]
        labels = [c for c in self._labels.choices if c is not None]
        if self._image.value is None and images:
            self._image.value = images[0]
        if self._labels.value is None and labels:  # prefer the Segment widget's mask: that is what users correct
            self._labels.value = ([c for c in labels if "[UNet++ mask" in c.name] or labels)[-1]
        self._show_edited()

    def _on_budget_kind(self, _=None) -> None:
        self._budget.value = 2.0 if self._budget_kind.value == "minutes" else 20

    def _is_ct(self, row: Any) -> bool:
        """A new CT model, or a base that normalises by a Hounsfield window: the HU window choice applies."""
        return self._new_modality() == "ct" or (row is not None and row.card.normalization.get("mode") == "window")

    def _on_base(self, _=None) -> None:
        modality = self._new_modality()
        row = next((r for r in list_models() if r.id == self._base.value), None)
        self._window.visible = self._is_ct(row)
        if modality is not None:
            self._name.tooltip = f"default: {modality}-new"
            self._name.native.setPlaceholderText(f"{modality}-new")
            self._classes.native.setPlaceholderText("foreground")
            return
        if row is not None:
            self._name.tooltip = f"default: {default_name(row)}"
            self._name.native.setPlaceholderText(default_name(row))
            self._classes.native.setPlaceholderText(", ".join(row.card.classes))

    # ----------------------------------------------------------------- edits
    def _on_edit(self, layer: Labels) -> None:
        if layer is self._labels.value:
            self._show_edited()

    def edited_slices(self, layer: Labels | None = None, recheck: bool = False) -> list[tuple[int, ...]]:
        """Slices of ``layer`` (default: the chosen labels) the user painted on and did not undo back to what they
        were, sorted. ``recheck`` re-reads every painted slice first (to catch undo)."""
        layer = layer or self._labels.value
        return [] if layer is None else self.edits.edited_slices(layer, recheck)

    def _show_edited(self, _=None) -> None:
        ed = self.edited_slices()
        if not ed:
            self._edited.value = "none yet: paint on the labels layer"
        elif ed == [()]:
            self._edited.value = "the image (2D)"
        else:
            txt = ", ".join(",".join(map(str, s)) for s in ed[:12]) + (" ..." if len(ed) > 12 else "")
            self._edited.value = f"{len(ed)} slice(s): {txt}"
        self._slices.enabled = self._truth.value == "listed slices"

    # ----------------------------------------------------------------- run
    def start(self, _=None) -> None:
        """Fine-tune in a worker thread."""
        if self._worker is not None:
            show_info("Fine-tuning is already running; stop it first.")
            return
        modality = self._new_modality()
        name = self._name.value.strip() or None
        classes = [c for c in self._classes.value.split(",") if c.strip()] or None
        img, labels = self._image.value, self._labels.value
        try:
            if modality is not None:
                rgb = img is not None and img.rgb
                channels = int(pixels(img).shape[-1]) if rgb else 1
                base = new_model(modality, classes=classes or ["foreground"], in_channels=channels, name=name)
            else:
                base = load_model(self._base.value)
            if self._window.value != MODELS_WINDOW and base.normalization.mode == "window":
                base = with_window(base, str(self._window.value), file_windows(img))  # "dicom": the file's own
            if self._truth.value == "edited slices" and labels is not None:
                self.edited_slices(recheck=True)  # (napari's undo sends no event)
                self._show_edited()
            seg = SegmentWidget.for_viewer(self._viewer)
            channel = seg.chosen_channel(img) if seg is not None else None
            pair = training_pair(img, labels, base, self._truth.value, self._slices.value, self.edits, channel)
        except (ValueError, ModelFileError) as exc:
            self._error(user_message(exc))
            return
        budget = (
            {"minutes": float(self._budget.value)}
            if self._budget_kind.value == "minutes"
            else {"epochs": max(1, int(round(self._budget.value)))}
        )
        self._stop = threading.Event()
        stop = self._stop
        options = dict(
            budget,
            train_depth=LEVELS[self._levels.value],
            ignore_label=None if self._ignore.value < 0 else int(self._ignore.value),
        )
        options.update(self.run_options)
        device = self._device.value
        self.plot.clear()
        self._bar.value = 0
        self.result = None
        self._status.value = "preparing ..."

        def gen():
            return (
                yield from fine_tune_iter(base, pair, device=device, name=name, stop=stop, classes=classes, **options)
            )

        self._start_btn.enabled = False
        self._stop_btn.enabled = True
        self._worker = run_generator(gen, self._on_yield, self._on_return, self._error, self._finished)
        if self._worker is not None:
            self._jobs.append((self._worker, stop))

    def stop(self, _=None) -> None:
        """End training at the next step; the best state so far is validated and saved."""
        if self._stop is not None and not self._stop.is_set():
            self._stop.set()
            self._status.value = "stopping: validating and saving the best state so far ..."

    def _on_yield(self, p: TrainProgress) -> None:
        self._bar.value = int(1000 * p.fraction)
        if p.phase == "train" and p.loss is not None:
            self.plot.add_loss(p.step, p.loss)
            if p.step % 5 == 0:
                self._status.value = f"{p.message} ({p.seconds:.0f} s)"
        elif p.val is not None:
            self.plot.add_validation(p.step, p.val)
            self._status.value = p.message
        elif p.message:
            self._status.value = p.message

    def _on_return(self, res: FineTuneResult) -> None:
        self.result = res
        card = res.model.card
        scores = ", ".join(f"L{k} {res.baseline[k]:.3f}->{v:.3f}" for k, v in res.scores.items())
        note = "" if res.improved else " Validation did not improve: the new version keeps the base weights."
        self._bar.value = 1000
        if res.save_error:
            # trained but not written (a full or read-only models folder): keep the result, say where it failed
            self._status.value = (
                f"Not saved ({res.stopped}, {res.steps} steps, {res.seconds:.0f} s): {res.save_error} "
                f"Validation Dice {scores}."
            )
            show_error(f"The fine-tuned model could not be saved: {res.save_error}")
            return
        self._status.value = (
            f"Saved {card.id} ({res.stopped}, {res.steps} steps, {res.seconds:.0f} s). "
            f"Validation Dice {scores}; recommended L{res.recommended_depth}.{note}"
        )
        show_info(f"Fine-tuned model saved as {card.id}; recommended depth L{res.recommended_depth}.")
        with self._base.changed.blocked():
            self._base.reset_choices()
            if card.id in self._base.choices:
                self._base.value = card.id  # the next round continues from this version
        seg = SegmentWidget.for_viewer(self._viewer)
        if seg is not None:
            seg.show_new_model(card.id, res.recommended_depth, self._image.value)

    def _finished(self) -> None:
        self._jobs[:] = [j for j in self._jobs if j[0] is not self._worker]
        self._worker = None
        self._stop = None
        self._start_btn.enabled = True
        self._stop_btn.enabled = False

    def _error(self, message: str) -> None:
        show_error(message)
        self._status.value = message


def _abandon_jobs(jobs: list[tuple[Any, threading.Event]], *_: Any) -> None:
    """The widget is going: stop each training run (it saves its best state) and disconnect it from the widget."""
    for worker, stop in list(jobs):
        abandon([worker], stop=stop)
    jobs.clear()
