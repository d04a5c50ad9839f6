"""The "UNet++ Fine-tune" dock widget: retrain on the user's corrected labels in a worker, with a live plot; the new
version is then selected in the Segment widget and the current view re-segmented."""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, LineEdit, ProgressBar, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info

from napari_unetpp.data.axes import layer_axes
from napari_unetpp.errors import ModelFileError
from napari_unetpp.model.modalities import MODALITIES, new_model
from napari_unetpp.model.registry import LoadedModel, list_models, load_model
from napari_unetpp.model.windowed import with_window
from napari_unetpp.napari.pixel_size import layer_pixel_size
from napari_unetpp.napari.plot import TrainingPlot
from napari_unetpp.napari.segment import (
    WINDOW_CHOICES,
    SegmentWidget,
    children_blocked,
    image_axes,
    image_choices,
    pixels,
)
from napari_unetpp.napari.workers import WeakHandler, abandon, run_generator, user_message
from napari_unetpp.runtimes.device import DEVICE_CHOICES
from napari_unetpp.training import (
    FineTuneResult,
    TrainingPair,
    TrainProgress,
    default_name,
    fine_tune_iter,
    parse_slices,
)

log = logging.getLogger(__name__)

TRUTH = ("edited slices", "listed slices", "all slices")
LEVELS = {"all levels": None, "fast: L1-L2 only": 2}
NEW_MODEL = "new model ({})"  # base choices that train a fresh network for the modality


def _atom_changes(atom: Any) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Full-array coordinates of the pixels one napari history atom changed, and their values before the change.

    napari records either ``(indices, old_values, new_values)`` tuples (``data_setitem``) or masked bounding-box
    atoms with a ``slice_key``, an optional ``mask`` (None: the whole box changed) and ``old_values``.
    """
    if hasattr(atom, "slice_key"):
        key = tuple(atom.slice_key)
        starts = [s.start or 0 for s in key]
        old = np.asarray(atom.old_values)
        if atom.mask is None:  # old_values is a snapshot of the whole box
            idx = np.nonzero(np.ones([s.stop - (s.start or 0) for s in key], bool))
            old = old.ravel()
        else:
            idx = np.nonzero(atom.mask)
        return tuple(i + st for i, st in zip(idx, starts)), old
    idx = tuple(np.asarray(i) for i in atom[0])
    return idx, np.broadcast_to(np.asarray(atom[1]), idx[0].shape if idx else ())


def painted(atoms: Any, ndim: int) -> tuple[set[tuple[int, ...]], list[tuple[np.ndarray, ...]]]:
    """Slices (indices over the leading non-YX axes) and pixel coordinates touched by one napari paint event."""
    lead = ndim - 2
    slices: set[tuple[int, ...]] = set()
    coords: list[tuple[np.ndarray, ...]] = []
    for atom in atoms or []:
        full, _ = _atom_changes(atom)
        if not full or full[0].size == 0:
            continue
        coords.append(full)
        if lead:
            slices.update(map(tuple, np.unique(np.stack(full[:lead], 1), axis=0).tolist()))
        else:
            slices.add(())
    return slices, coords


def slice_before(data: Any, key: tuple[int, ...], atoms: Any) -> np.ndarray:
    """The YX plane ``key`` of a labels array as it was before the edits in ``atoms`` (one paint event), rebuilt
    from the current plane and the old values the atoms keep (the inverse of napari's own undo). Correct whether
    napari emits the event before writing (single edits) or after (a staged mouse stroke)."""
    lead = len(key)
    plane = np.array(data[key], copy=True)
    for atom in reversed(list(atoms or [])):
        full, old = _atom_changes(atom)
        if not full or full[0].size == 0:
            continue
        sel = np.ones(full[0].shape, bool)
        for d in range(lead):
            sel &= full[d] == key[d]
        plane[full[lead][sel], full[lead + 1][sel]] = old[sel]
    return plane


def _digest(plane: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(plane).tobytes(), digest_size=16).digest()


@dataclass
class LayerEdits:
    """What the user did on one labels layer, and the paint handler that records it (so it can be disconnected when
    the layer goes)."""

    layer: weakref.ref
    handler: WeakHandler
    slices: set[tuple[int, ...]] = field(default_factory=set)  # painted slices
    original: dict[tuple[int, ...], bytes] = field(default_factory=dict)  # slice -> digest before its first edit
    restored: set[tuple[int, ...]] = field(default_factory=set)  # painted, but back to the original (undone)
    focus: list[tuple[np.ndarray, ...]] = field(default_factory=list)  # changed pixel coordinates


class FineTuneWidget(Container):
    """Fine-tune a model on corrected labels and re-segment with the new version.

    Args:
        napari_viewer: The viewer (injected by napari).
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
            value=WINDOW_CHOICES[0],
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
                self._image,
                self._labels,
                self._base,
                self._window,
                self._truth,
                self._slices,
                self._edited,
                self._budget_kind,
                self._budget,
                self._levels,
                self._ignore,
                self._device,
                self._name,
                self._classes,
                Container(widgets=[self._start_btn, self._stop_btn], layout="horizontal", labels=False),
                self._bar,
                Container(widgets=[self._status], labels=False),
            ]
        )
        self.plot = TrainingPlot()
        self.native.layout().addWidget(self.plot)

        # labels layer's unique_id (never id(): a new layer may get a removed one's) -> its edits; dropped with it
        self._tracked: dict[Any, LayerEdits] = {}
        self._worker: Any = None
        self._stop: threading.Event | None = None
        self.result: FineTuneResult | None = None

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
        present = {ly.unique_id for ly in self._viewer.layers}
        for uid in [u for u in self._tracked if u not in present]:  # gone: its edits and its handler go too
            gone = self._tracked.pop(uid)
            layer = gone.layer()
            if layer is not None:
                layer.events.paint.disconnect(gone.handler)
        for ly in self._viewer.layers:
            if isinstance(ly, Labels) and ly.unique_id not in self._tracked:
                handler = WeakHandler(self, "_on_paint", ly.unique_id)
                ly.events.paint.connect(handler)
                self._tracked[ly.unique_id] = LayerEdits(weakref.ref(ly), handler)
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
    def _on_paint(self, uid: Any, event: Any) -> None:
        rec = self._tracked.get(uid)
        layer = rec.layer() if rec is not None else None
        if rec is None or layer is None:
            return
        atoms = getattr(event, "value", None)
        slices, coords = painted(atoms, layer.data.ndim)
        for s in slices:
            if s not in rec.original:
                rec.original[s] = _digest(slice_before(layer.data, s, atoms))
        rec.slices.update(slices)
        rec.restored -= slices  # napari sends this event before or after writing, so no re-read here
        rec.focus.extend(coords)
        if layer is self._labels.value:
            self._show_edited()

    def _recheck(self, layer: Labels, slices: Any) -> None:
        """Mark which of ``slices`` are back to their content before the first edit (napari's undo sends no
        event, so this also runs before training starts)."""
        rec = self._tracked.get(layer.unique_id)
        if rec is None:
            return
        for s in slices:
            now = _digest(np.asarray(layer.data[s]))
            (rec.restored.add if now == rec.original.get(s) else rec.restored.discard)(s)

    def edited_slices(self, layer: Labels | None = None, recheck: bool = False) -> list[tuple[int, ...]]:
        """Slices of ``layer`` (default: the chosen labels) the user painted on and did not undo back to what they
        were, sorted. ``recheck`` re-reads every painted slice first (to catch undo)."""
        layer = layer or self._labels.value
        if layer is None:
            return []
        rec = self._tracked.get(layer.unique_id)
        if rec is None:
            return []
        if recheck:
            self._recheck(layer, rec.slices)
        return sorted(rec.slices - rec.restored)

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
    def _pair(self, base: LoadedModel) -> TrainingPair:
        image, labels = self._image.value, self._labels.value
        if image is None or labels is None:
            raise ValueError("Choose an image and the labels layer with your corrections.")
        dims = base.module.config.spatial_dims
        axes = image_axes(image, dims)
        data = pixels(image)  # lazy (dask, zarr) stays lazy: the worker reads the slices it trains on
        shape = tuple(data.shape[:-1]) if image.rgb else tuple(data.shape)
        seg = SegmentWidget.for_viewer(self._viewer)
        channel = seg.chosen_channel(image) if seg is not None else None
        lead = 0  # leading axes of the layer that are not in the pair (its scale and units are not theirs)
        if channel is not None and tuple(labels.data.shape) == shape[1:]:
            # a mask the Segment widget made from one channel of the first axis: train on that channel
            data = data[channel]
            axes = layer_axes(data.ndim, False, dims)
            shape = shape[1:]
            lead = 1
        if tuple(labels.data.shape) != shape:
            if tuple(labels.data.shape) == shape[1:] and not image.rgb:
                raise ValueError(
                    f"'{labels.name}' matches one channel of '{image.name}' (its first axis); choose that channel "
                    f"in the Segment widget, or draw the labels on a layer of that channel alone."
                )
            raise ValueError(
                f"'{labels.name}' has shape {tuple(labels.data.shape)} but '{image.name}' {shape}; "
                f"choose the labels drawn on this image."
            )
        lab = np.array(labels.data, copy=True)  # a snapshot: painting may go on while training runs
        focus = None
        known = None
        slices: Any
        if self._truth.value == "edited slices":
            ed = self.edited_slices(recheck=True)
            self._show_edited()
            if not ed:
                raise ValueError(
                    "No edited slices: correct some slices with the paint tools first, or choose "
                    "'listed slices' or 'all slices'."
                )
            slices = "all" if ed == [()] else [s for s in ed]
            focus = np.zeros(lab.shape, bool)
            rec = self._tracked.get(labels.unique_id)
            for c in rec.focus if rec is not None else []:
                focus[c] = True
            if ed != [()]:  # pixels painted on slices that were undone are no focus
                lead = lab.ndim - 2
                keep = np.zeros(lab.shape[:lead], bool)
                keep[tuple(np.array(ed).T)] = True
                focus &= keep.reshape(keep.shape + (1, 1))
        elif self._truth.value == "listed slices":
            slices = parse_slices(self._slices.value)
            if slices is None:
                raise ValueError("List the corrected slices, e.g. 3, 7, 10-12.")
        else:
            slices = "all"
        spacing, unit = _spacing(image, axes, lead)
        return TrainingPair(
            data,
            lab,
            axes=axes,
            slices=slices,
            known=known,
            focus=focus,
            name=f"{image.name} / {labels.name}",
            spacing=spacing,
            spacing_unit=unit,
        )

    def start(self, _=None) -> None:
        """Fine-tune in a worker thread."""
        if self._worker is not None:
            show_info("Fine-tuning is already running; stop it first.")
            return
        modality = self._new_modality()
        name = self._name.value.strip() or None
        classes = [c for c in self._classes.value.split(",") if c.strip()] or None
        try:
            if modality is not None:
                img = self._image.value
                base = new_model(
                    modality,
                    classes=classes or ["foreground"],
                    in_channels=int(pixels(img).shape[-1]) if img is not None and img.rgb else 1,
                    name=name,
                )
            else:
                base = load_model(self._base.value)
            if self._window.value != WINDOW_CHOICES[0] and base.normalization.mode == "window":
                img = self._image.value
                dicom = img.metadata.get("unetpp_windows", []) if img is not None else []
                base = with_window(base, str(self._window.value), dicom)
            pair = self._pair(base)
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


def _spacing(image: Image, axes: str, lead: int = 0) -> tuple[dict[str, float] | None, str]:
    """The pixel size the Segment widget reads from the layer (:func:`~.pixel_size.layer_pixel_size`, after its
    ``lead`` axes: a channel segmented on its own), for the card, and its unit; None for napari's default scale of
    ones in pixels (the layer says nothing: the base's pixel size stays)."""
    spacing, unit = layer_pixel_size(image, axes, lead)
    if not spacing or (not unit and all(abs(s - 1.0) <= 1e-9 for s in spacing.values())):
        return None, ""
    return spacing, unit
