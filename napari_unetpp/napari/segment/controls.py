"""The Segment widget's controls and the choices they offer, without the work they start: the image, the model (or
a model file), the channel, the HU window, the depth and post-processing, and what the widget says about them (the
model's card, the pixel size, the active window). :class:`~.widget.SegmentWidget` adds what the controls do."""

from __future__ import annotations

from typing import Any

import napari
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    Label,
    ProgressBar,
    PushButton,
    Slider,
)
from napari.layers import Image
from napari.utils.notifications import show_error, show_warning

from napari_unetpp.errors import InputError, ModelFileError
from napari_unetpp.inference.postprocess import INSTANCE_METHODS
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.napari.choices import children_blocked, configure, image_choices
from napari_unetpp.napari.segment.controller import (
    MODELS_WINDOW,
    WINDOW_CHOICES,
    SegmentController,
    card_summary,
    objects_for,
    scale_note,
)
from napari_unetpp.napari.segment.shown import Display
from napari_unetpp.napari.workers import user_message
from napari_unetpp.runtimes import DEVICE_CHOICES, describe_device, resolve_device

__all__ = ["SegmentControls"]


def _warn(message: str) -> None:
    show_warning(message)


class SegmentControls(Container):
    """The Segment widget's named children (``_image``, ``_model``, ``_depth_slider`` ...) and their choices, over a
    :class:`~.controller.SegmentController` (``controller``).

    Args:
        napari_viewer: The viewer.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.controller = SegmentController(warn=_warn)
        self._image = ComboBox(
            label="image",
            choices=self._image_choices,
            nullable=True,
            tooltip="Image layer to segment (2D, stack, time series; grey or RGB)",
        )
        self._model = ComboBox(
            label="model", choices=self._model_choices, tooltip="Shipped models and your fine-tuned versions"
        )
        self._model_file = FileEdit(
            label="or file",
            mode="r",
            filter="*.safetensors *.json",
            nullable=True,
            tooltip="A model file (.safetensors with its .json card) from elsewhere",
        )
        self._card = Label(label="trained on", value="")
        self._scale_note = Label(label="pixel size", value="")
        self._channel = ComboBox(
            label="channel",
            choices=self._channel_choices,
            nullable=True,
            tooltip="A layer with channels along its first axis (not split into one layer per channel): the channel "
            "a 1-channel model segments",
        )
        self._depth_slider = Slider(
            label="depth L",
            min=1,
            max=4,
            value=4,
            tooltip="Pruned sub-network: only nodes X(i,j) with i + j <= depth are computed",
        )
        self._mode = ComboBox(
            label="mode",
            choices=["pruned", "ensemble"],
            value="pruned",
            tooltip="pruned: head k alone (fast); ensemble: mean of heads 1..k (accurate)",
        )
        self._threshold = FloatSlider(label="threshold", min=0.05, max=0.95, step=0.05, value=0.5)
        self._instances = ComboBox(
            label="objects",
            choices=list(INSTANCE_METHODS),
            value="none",
            tooltip="Split the mask into objects: connected components, the distance-transform watershed, or the "
            "split the model learned (touching nuclei; models without a learned cue use the watershed)",
        )
        self._window = ComboBox(
            label="HU window",
            choices=list(WINDOW_CHOICES),
            value=MODELS_WINDOW,
            tooltip="CT models: the Hounsfield window the image is clipped to before the network (model's: the one it "
            "was trained with; dicom: the file's own)",
        )
        self._window_shown = Label(label="active", value="")
        self._all_levels = CheckBox(text="every level as a layer", value=False)
        self._disagreement = CheckBox(text="level disagreement layer", value=False)
        self._device = ComboBox(label="device", choices=list(DEVICE_CHOICES), value="auto")
        self._detected = Label(label="runs on", value=describe_device(resolve_device("auto")))
        self._detected.native.setWordWrap(True)  # after a run: the runtime that ran the level, and why
        self._preview_btn = PushButton(text="Segment current slice")
        self._run_btn = PushButton(text="Run whole stack")
        self._cancel_btn = PushButton(text="Cancel", enabled=False)
        self._export_btn = PushButton(
            text="Export for bioimage.io",
            tooltip="Write the selected model at this depth (only that sub-network) as a bioimage.io package: "
            "TorchScript and ONNX weights, its normalisation, test tensors from the current slice",
        )
        # the whole-stack run's progress: the widget's own bar, not napari's activity dock, whose busy animation
        # repainted the window ~30 times a second (measured: 496 repaints, 8 s of a 16 s run under Xvfb)
        self._bar = ProgressBar(min=0, max=1, value=0, visible=False)
        self._timing = Label(value="Move the depth slider or press a button to segment.")
        self._timing.native.setWordWrap(True)
        self._timing.native.setMinimumWidth(320)
        self._card.native.setWordWrap(True)
        buttons = [self._preview_btn, self._run_btn, self._cancel_btn]
        self.extend(
            [
                *(self._image, self._model, self._model_file, self._card, self._scale_note, self._channel),
                *(self._depth_slider, self._mode, self._threshold, self._instances, self._window, self._window_shown),
                *(self._all_levels, self._disagreement, self._device, self._detected),
                Container(widgets=buttons, layout="horizontal", labels=False),
                Container(widgets=[self._export_btn], labels=False),
                Container(widgets=[self._bar, self._timing], labels=False),
            ]
        )
        self._model_shown: str | None = None

    def configure(self, **values: Any) -> None:
        """Set controls as a user would, by name: ``image`` (a layer), ``model``, ``channel``, ``depth``, ``mode``,
        ``threshold``, ``objects``, ``window``, ``all_levels``, ``disagreement``, ``device``."""
        controls = {"image": self._image, "model": self._model, "channel": self._channel}
        controls.update(depth=self._depth_slider, mode=self._mode, threshold=self._threshold, objects=self._instances)
        controls.update(window=self._window, all_levels=self._all_levels, disagreement=self._disagreement)
        configure({**controls, "device": self._device}, values)

    def display(self) -> Display:
        """How results are shown now: the slider's depth and the post-processing choices."""
        d = (self._depth_slider.value, self._mode.value, self._threshold.value, self._instances.value)
        return Display(*d, all_levels=self._all_levels.value, disagreement=self._disagreement.value)

    def _image_choices(self, _=None) -> list[tuple[str, Image]]:
        return image_choices(self._viewer)

    def _model_choices(self, _=None) -> list[str]:
        return self.controller.model_ids()

    def _on_model_file(self, path: Any = None) -> None:
        if path is None or not str(path) or str(path) == "." or not str(path).endswith((".safetensors", ".json")):
            return
        try:
            key = self.controller.open_file(str(path))
        except ModelFileError as exc:
            self._error(str(exc))
            return
        self.refresh_models(select=key)

    def reset_choices(self, *_: Any) -> None:
        """Refresh the image and model lists (napari calls this on layer changes) without triggering a run: a
        list refresh must never compute or add layers (it happens while napari removes layers, too)."""
        with children_blocked(self):
            super().reset_choices()

    def chosen_channel(self, image: Image | None) -> int | None:
        """The channel of ``image``'s first axis this widget segments (its masks then lack that axis), or None
        when ``image`` is not the selected layer or is segmented whole."""
        if image is None or self._image.value is not image or not self._lead():
            return None
        return int(self._channel.value)

    def _channel_choices(self, _=None) -> list[tuple[str, int]]:
        return self.controller.channel_choices(self._image.value, self.controller.loaded(self._model.value))

    def _update_channels(self) -> None:
        with self._channel.changed.blocked():
            self._channel.reset_choices()
            if self._channel.value not in [v for _, v in self._channel_choices()]:
                self._channel.value = None
        self._channel.visible = self.channel_offered

    @property
    def channel_offered(self) -> bool:
        """Whether the selected image has channels along its first axis to choose from."""
        return len(self._channel_choices()) > 1

    def _lead(self) -> int:
        return self.controller.lead(self._image.value, self.controller.loaded(self._model.value), self._channel.value)

    def _show_scale(self) -> None:
        """Say whether the image is resampled to the model's pixel size (and why), or is used as it is."""
        image, lm = self._image.value, self.model
        found = image is not None and lm is not None
        zoom, why = self.controller.zoom(image, lm, self._channel.value) if found else (None, "")
        self._scale_note.value, self._scale_note.tooltip = scale_note(zoom, why)

    def _suggest_model(self) -> None:
        """Images that name their model (the samples: ``metadata["unetpp_model"]``) select it when it is shipped."""
        image = self._image.value
        name = image.metadata.get("unetpp_model") if image is not None else None
        if name and f"{name}@v1" in self._model.choices and self._model.value != f"{name}@v1":
            self._model.value = f"{name}@v1"

    def refresh_models(self, select: str | None = None) -> None:
        """Re-read the model list (after fine-tuning) and optionally select ``select``."""
        self._model.reset_choices()
        if select is not None:
            self._model.value = select

    @property
    def selected_model_id(self) -> str | None:
        """The selected model: a registry id (``name@vN``) or a file path."""
        return self._model.value

    @property
    def model(self) -> LoadedModel | None:
        """The live snapshot while one is shown (:meth:`~.widget.SegmentWidget.show_live`), else the selected model
        under the chosen HU window (``dicom``: the selected image's own), loaded once."""
        if self.controller.live is not None:
            return self.controller.live
        return self.controller.model(self._model.value, self._window.value, self._image.value)

    def _show_window(self) -> bool:
        """Say which HU window is active; a window the selected image cannot give (``dicom`` for an image without
        one) goes back to the model's, with one sentence. Returns whether the chosen window stands."""
        try:
            lm, ok = self.model, True
        except InputError as exc:
            with self._window.changed.blocked():
                self._window.value = MODELS_WINDOW
            self._error(user_message(exc))
            lm, ok = self.model, False
        if lm is not None and lm.normalization.mode == "window":
            self._window_shown.value = lm.normalization.describe()
        return ok

    def _on_model_changed(self, _=None) -> None:
        if self._model.value == self._model_shown:
            return
        self.controller.live = None  # a model chosen by the user ends a live snapshot's turn
        try:
            lm = self.model
        except ModelFileError as exc:
            show_warning(str(exc))
            return
        if lm is None:
            return
        self._model_shown = self._model.value  # the selection key: a registry id or a file path
        self._card.value, self._card.tooltip = card_summary(lm)
        self._model.tooltip = self._card.tooltip
        self._depth_slider.max = lm.max_depth
        self._depth_slider.value = lm.card.recommended_depth or lm.max_depth
        objects = objects_for(lm, self._instances.value)  # the learned split where the model has one
        if objects != self._instances.value:
            self._instances.value = objects
        is_ct = lm.normalization.mode == "window"
        self._window.visible = self._window_shown.visible = is_ct
        self._window_shown.value = ""
        if is_ct:
            self._show_window()
        self._update_channels()
        self._show_scale()

    def _set_busy_preview(self, busy: bool) -> None:
        self._preview_btn.enabled = not busy
        self._timing.value = f"computing L{self._depth_slider.value} ..." if busy else self._timing.value

    def _ask_export_path(self, default: str) -> str:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(
            self.native, "Export for bioimage.io", default, "bioimage.io package (*.zip)"
        )
        return str(path or "")

    def _error(self, message: str) -> None:
        show_error(message)
        self._timing.value = message[:80]
