"""The "UNet++ Segment" dock widget: depth slider over pruned sub-networks, per-level layers, live preview of the
current slice, and whole-stack runs in a worker thread."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import tempfile
import time
import weakref
from typing import Any

import napari
import numpy as np
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
from napari.utils.notifications import show_error, show_info, show_warning

from napari_unetpp.data.axes import layer_axes
from napari_unetpp.data.windows import WINDOWS, Window, parse_window
from napari_unetpp.errors import InputError, ModelFileError
from napari_unetpp.inference.masks import mask_from
from napari_unetpp.inference.postprocess import INSTANCE_METHODS, level_disagreement, split_instances
from napari_unetpp.inference.predict import Prediction, normalization_stats, predict_iter
from napari_unetpp.model.registry import LoadedModel, list_models, load_model
from napari_unetpp.model.windowed import with_window
from napari_unetpp.napari.cache import PlaneResult, ResultCache, ResultKey
from napari_unetpp.napari.pixel_size import layer_pixel_size
from napari_unetpp.napari.workers import WeakHandler, abandon, run_generator, user_message
from napari_unetpp.runtimes.device import DEVICE_CHOICES, describe_device, resolve_device
from napari_unetpp.training.metrics import headline_score

log = logging.getLogger(__name__)


def layer_name(image: str, tag: str) -> str:
    """``"<image> [UNet++ L2]"`` and friends."""
    return f"{image} [UNet++ {tag}]"


def pixels(layer: Image) -> Any:
    """The layer's full-resolution array: the finest level of a multiscale (pyramid) layer, else its data. Lazy
    arrays (dask, zarr) stay lazy."""
    return layer.data[0] if layer.multiscale else layer.data


def image_axes(layer: Image, spatial_dims: int) -> str:
    """Axes of a napari Image layer's data for a model with ``spatial_dims`` (RGB layers carry a C axis last)."""
    return layer_axes(pixels(layer).ndim, layer.rgb, spatial_dims)


def blank(shape: tuple[int, ...], dtype: Any, like: Any) -> np.ndarray:
    """Zeros for a result layer: in memory when the image is an in-memory array, else (dask, zarr, pyramids)
    a memory map on an anonymous temporary file, so results of stacks larger than memory do not fill it."""
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dtype)
    return np.memmap(tempfile.TemporaryFile(prefix="napari-unetpp-"), dtype=dtype, mode="w+", shape=shape)


def plane_mask(
    prob: np.ndarray,
    num_classes: int,
    threshold: float,
    objects: str,
    spatial_dims: int,
    cue: np.ndarray | None = None,
) -> np.ndarray:
    """A plane's mask from its probabilities: threshold (1 class) or argmax, then the object split (1 class):
    ``learned`` uses the model's ``cue`` (without one, the watershed)."""
    mask = mask_from(prob, num_classes, threshold).astype(np.uint8)
    if num_classes == 1:
        if objects == "none":
            return mask
        method = "watershed" if objects == "learned" and cue is None else objects
        return split_instances(mask, method, spatial_dims, cue=None if cue is None else cue.astype(np.float32))
    return mask


def chosen_cue(cues: dict[int, np.ndarray], k: int, ensemble: bool) -> np.ndarray | None:
    """The instance cue that goes with the mask of level ``k`` (the mean of levels 1..k for the ensemble), or None
    when the model has no cue (or those levels' cues are not at hand)."""
    if ensemble:
        have = [cues[lv] for lv in range(1, k + 1) if lv in cues]
        return np.mean([c.astype(np.float32) for c in have], axis=0) if len(have) == k else None
    return cues[k].astype(np.float32) if k in cues else None


def image_choices(viewer: Any) -> list[tuple[str, Image]]:
    """The viewer's image layers a user may segment or train on (not our own result layers)."""
    return [(ly.name, ly) for ly in viewer.layers if isinstance(ly, Image) and "[UNet++" not in ly.name]


@contextlib.contextmanager
def children_blocked(container: Container):
    """Block the ``changed`` signals of a container's children: a choice refresh must not start work (napari
    refreshes dock widgets while it removes layers)."""
    with contextlib.ExitStack() as stack:
        for w in container:
            if hasattr(w, "changed"):
                stack.enter_context(w.changed.blocked())
        yield


_INSTANCES: list[weakref.ref] = []
WINDOW_CHOICES = ("model's", *WINDOWS, "dicom")


def _norm_key(lm: LoadedModel) -> tuple:
    """The model's normalisation as a hashable key: results under one HU window are not another's."""
    return tuple(sorted(lm.card.normalization.items()))


class SegmentWidget(Container):
    """Segment the selected image with a UNet++ pruned to the depth on the slider.

    Args:
        napari_viewer: The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._loaded: dict[str, LoadedModel] = {}
        # (model, window) -> the model with that window (its own folded copy, runtime sessions): one per window, so
        # images that share a window share it, and a file's own ("dicom") window is that image's, never another's
        self._windowed: dict[tuple[str, Window], LoadedModel] = {}
        self._zoom_refused: set[tuple[Any, str]] = set()  # (image, model) pairs told once that they are not resampled
        self._files: list[str] = []  # models opened from files, listed after the registry's
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
            value=WINDOW_CHOICES[0],
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
        self.extend(
            [
                self._image,
                self._model,
                self._model_file,
                self._card,
                self._scale_note,
                self._channel,
                self._depth_slider,
                self._mode,
                self._threshold,
                self._instances,
                self._window,
                self._window_shown,
                self._all_levels,
                self._disagreement,
                self._device,
                self._detected,
                Container(
                    widgets=[self._preview_btn, self._run_btn, self._cancel_btn], layout="horizontal", labels=False
                ),
                Container(widgets=[self._export_btn], labels=False),
                Container(widgets=[self._bar, self._timing], labels=False),
            ]
        )

        # everything per layer is keyed by napari's layer.unique_id (never id(), which a new layer may reuse, nor
        # the name, which a new layer may share) and forgotten when the layer goes or its data changes
        self._cache = ResultCache()
        self._next_label: dict[Any, int] = {}  # mask layer -> next free object id (unique across the stack)
        self._stats: dict[ResultKey, list] = {}
        self._results: dict[tuple[Any, str], Any] = {}  # (image layer, tag) -> the result layer we write
        self._edited: set[Any] = set()  # mask layers the user painted on
        self._version: dict[Any, int] = {}  # image layer -> how many times its data was replaced
        self._data_hooks: dict[Any, tuple[weakref.ref, WeakHandler]] = {}  # image layer -> its data-event handler
        self._shapes: dict[Any, tuple[int, ...]] = {}  # image layer -> the shape of its data when last seen
        self._stack_layer: Any = None  # the image layer of the whole-stack run going on
        self._preview_worker: Any = None
        self._pending_preview = False
        self._stack_worker: Any = None
        self._live = False  # after the first preview, scrolling through slices segments them too
        self._rendering = False  # our own layer writes must not re-enter through layer/choice events
        self._cancelled = False
        self._model_shown: str | None = None

        self._depth_slider.changed.connect(self._on_depth_changed)
        self._mode.changed.connect(self._on_depth_changed)
        self._threshold.changed.connect(self._render_current)
        self._instances.changed.connect(self._render_current)
        self._all_levels.changed.connect(self._render_current)
        self._disagreement.changed.connect(self._render_current)
        self._model.changed.connect(self._on_model_changed)
        self._window.changed.connect(self._on_window_changed)
        self._model_file.changed.connect(self._on_model_file)
        self._image.changed.connect(self._on_image_changed)
        self._channel.changed.connect(self._on_channel_changed)
        self._preview_btn.changed.connect(self.preview)
        self._run_btn.changed.connect(self.run_stack)
        self._cancel_btn.changed.connect(self.cancel)
        self._export_btn.changed.connect(self.export_model)
        napari_viewer.layers.events.inserted.connect(self._on_layers_changed)
        napari_viewer.layers.events.removed.connect(self._on_layers_changed)
        napari_viewer.dims.events.current_step.connect(self._on_step)
        self._on_model_changed()
        self._on_layers_changed()  # docked after the layers were opened: pick the image (and its model) now
        _INSTANCES[:] = [r for r in _INSTANCES if r() is not None] + [weakref.ref(self)]
        self._workers: list[Any] = []  # running thread workers, stopped and disconnected when the widget goes
        self.native.destroyed.connect(functools.partial(abandon, self._workers))

    @classmethod
    def for_viewer(cls, viewer: napari.viewer.Viewer) -> SegmentWidget | None:
        """The Segment widget docked in ``viewer`` (the newest if several), or None."""
        # napari hands plugins a proxy of the viewer: compare the objects behind the proxies
        target = getattr(viewer, "__wrapped__", viewer)
        found = [
            w
            for w in (r() for r in _INSTANCES)
            if w is not None and getattr(w._viewer, "__wrapped__", w._viewer) is target
        ]
        return found[-1] if found else None

    def show_new_model(self, model_id: str, depth: int, image: Image | None = None) -> None:
        """Select a freshly saved model version at ``depth`` and re-segment what the user looks at (after
        fine-tuning)."""
        if image is not None and image in self._viewer.layers:
            with self._image.changed.blocked():
                self._image.value = image
        with self._depth_slider.changed.blocked():
            self.refresh_models(select=model_id)
            self._depth_slider.value = min(depth, self._depth_slider.max)
        self.preview()

    # ----------------------------------------------------------------- choices and model
    def _image_choices(self, _=None) -> list[tuple[str, Image]]:
        return image_choices(self._viewer)

    def _model_choices(self, _=None) -> list[str]:
        return [r.id for r in list_models()] + self._files

    def _on_model_file(self, path: Any = None) -> None:
        if path is None or not str(path) or str(path) == "." or not str(path).endswith((".safetensors", ".json")):
            return
        key = str(path)
        try:
            self._loaded[key] = load_model(key)
        except ModelFileError as exc:
            self._error(str(exc))
            return
        if key not in self._files:
            self._files.append(key)
        self.refresh_models(select=key)

    def reset_choices(self, *_: Any) -> None:
        """Refresh the image and model lists (napari calls this on layer changes) without triggering a run: a
        list refresh must never compute or add layers (it happens while napari removes layers, too)."""
        with children_blocked(self):
            super().reset_choices()

    def _on_layers_changed(self, event: Any = None) -> None:
        if self._rendering:
            return
        self._forget_gone()
        self.reset_choices()
        images = [c for c in self._image.choices if c is not None]
        if self._image.value is None and images:
            with self._image.changed.blocked():
                self._image.value = images[0]
            self._suggest_model()

    def _forget_gone(self) -> None:
        """Drop cached results, statistics, windows, result-layer links and data hooks of layers and models that
        went away (result layers of a removed image stay in the viewer, the user's now, and are never written
        again); listen to the data of image layers that came."""
        present = {ly.unique_id for ly in self._viewer.layers}
        choices = set(self._model.choices) | set(self._files)
        for mid in [m for m in self._loaded if m not in choices and m != self._model.value]:
            del self._loaded[mid]
        self._cache.keep_only(present, {lm.fingerprint for lm in self._loaded.values()})
        self._stats = {k: v for k, v in self._stats.items() if k.layer in present}
        in_use = set(WINDOWS.values()) | {w for ly in self._viewer.layers for w in _file_windows(ly)}
        self._windowed = {k: v for k, v in self._windowed.items() if k[0] in self._loaded and k[1] in in_use}
        self._results = {k: v for k, v in self._results.items() if k[0] in present and v.unique_id in present}
        self._edited &= present
        self._next_label = {k: v for k, v in self._next_label.items() if k in present}
        self._version = {k: v for k, v in self._version.items() if k in present}
        self._shapes = {k: v for k, v in self._shapes.items() if k in present}
        for uid in [u for u in self._data_hooks if u not in present]:
            ref, handler = self._data_hooks.pop(uid)
            layer = ref()
            if layer is not None:
                layer.events.data.disconnect(handler)
        for ly in self._viewer.layers:
            if isinstance(ly, Image) and ly.unique_id not in self._data_hooks:
                handler = WeakHandler(self, "_on_data_changed", ly.unique_id)
                ly.events.data.connect(handler)
                self._data_hooks[ly.unique_id] = (weakref.ref(ly), handler)
                self._shapes[ly.unique_id] = tuple(pixels(ly).shape)
        self._update_channels()

    def _on_data_changed(self, uid: Any, event: Any = None) -> None:
        """An image layer's data was replaced: its results and statistics are stale; a whole-stack run on it stops
        (what it computes now is for the old data and is not kept). Data of another shape gets new result layers:
        the old ones stay in the viewer as they are (they may hold the user's corrections) and are never written
        again."""
        self._version[uid] = self._version.get(uid, 0) + 1
        self._cache.drop(layer=uid)
        self._stats = {k: v for k, v in self._stats.items() if k.layer != uid}
        hook = self._data_hooks.get(uid)
        layer = hook[0]() if hook is not None else None
        shape = tuple(pixels(layer).shape) if layer is not None else None
        if shape != self._shapes.get(uid):
            gone = {v.unique_id for k, v in self._results.items() if k[0] == uid}
            self._results = {k: v for k, v in self._results.items() if k[0] != uid}
            self._next_label = {k: v for k, v in self._next_label.items() if k not in gone}
            if shape is not None:
                self._shapes[uid] = shape
        if self._stack_worker is not None and self._stack_layer == uid:
            self.cancel()

    def _on_image_changed(self, _=None) -> None:
        self._suggest_model()
        self._show_window()
        self._update_channels()
        self._show_scale()
        self._render_current()

    def chosen_channel(self, image: Image | None) -> int | None:
        """The channel of ``image``'s first axis this widget segments (its masks then lack that axis), or None
        when ``image`` is not the selected layer or is segmented whole."""
        if image is None or self._image.value is not image or not self._lead():
            return None
        return int(self._channel.value)

    def _channel_choices(self, _=None) -> list[tuple[str, int]]:
        """Channels along the first axis of the selected grey layer, for a 1-channel model: offered when the layer
        has two more dimensions than the model's (C and a stack axis: CZYX for a 2D model) and 2-8 entries along the
        first. napari's own multi-channel files open as one layer per channel instead."""
        image = self._image.value
        lm = self._loaded.get(self._model.value) if self._model.value else None
        if image is None or image.rgb or lm is None or lm.module.config.in_channels != 1:
            return []
        shape = pixels(image).shape
        dims = lm.module.config.spatial_dims
        if len(shape) < dims + 2 or not 2 <= shape[0] <= 8 or len(shape) - 1 > 4:
            return []
        return [(f"{c} of {shape[0]} (first axis)", c) for c in range(shape[0])]

    def _update_channels(self) -> None:
        with self._channel.changed.blocked():
            self._channel.reset_choices()
            if self._channel.value not in [v for _, v in self._channel_choices()]:
                self._channel.value = None
        self._channel.visible = self._channel_offered

    def _on_channel_changed(self, _=None) -> None:
        self._show_scale()
        if self._live:
            self.preview()

    @property
    def _channel_offered(self) -> bool:
        return len(self._channel_choices()) > 1

    def _lead(self) -> int:
        """1 when a channel of the first axis is segmented (that axis is not in the results), else 0."""
        value = self._channel.value
        return 1 if value is not None and value in [v for _, v in self._channel_choices()] else 0

    def _source(self, image: Image, lm: LoadedModel) -> tuple[Any, str]:
        """The pixels the model reads and their axes: the layer's, or the chosen channel of its first axis."""
        dims = lm.module.config.spatial_dims
        if self._lead():
            data = pixels(image)[int(self._channel.value)]
            return data, layer_axes(data.ndim, False, dims)
        return pixels(image), image_axes(image, dims)

    def _show_scale(self) -> None:
        """Say whether the image is resampled to the model's pixel size (and why), or is used as it is."""
        image, lm = self._image.value, self.model
        zoom, why = self._zoom(image, lm) if image is not None and lm is not None else (None, "")
        if zoom:
            self._scale_note.value = f"resampled x{' x '.join(f'{z:.2f}' for z in zoom)}"
        else:
            refused = why.startswith("not resampled")
            self._scale_note.value = "used as it is (pixel size far from the model's)" if refused else "used as it is"
        self._scale_note.tooltip = why or (
            "The layer's pixel size matches the model's, or one of them is unknown (a layer in pixels): the image "
            "is segmented as it is."
        )

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
        """The selected model, loaded once."""
        mid = self._model.value
        if mid is None:
            return None
        if mid not in self._loaded:
            self._loaded[mid] = load_model(mid)
        lm = self._loaded[mid]
        choice = str(self._window.value)
        if lm.normalization.mode != "window" or choice == WINDOW_CHOICES[0]:
            return lm
        image = self._image.value
        # "dicom": the selected image's own window (another image's may differ)
        key = (mid, parse_window(choice, _file_windows(image) if image is not None else []))
        if key not in self._windowed:
            self._windowed[key] = with_window(lm, key[1])
        return self._windowed[key]

    def _show_window(self) -> bool:
        """Say which HU window is active; a window the selected image cannot give (``dicom`` for an image without
        one) goes back to the model's, with one sentence. Returns whether the chosen window stands."""
        try:
            lm = self.model
        except InputError as exc:
            with self._window.changed.blocked():
                self._window.value = WINDOW_CHOICES[0]
            self._error(user_message(exc))
            lm = self.model
            ok = False
        else:
            ok = True
        if lm is not None and lm.normalization.mode == "window":
            self._window_shown.value = lm.normalization.describe()
        return ok

    def _on_window_changed(self, _=None) -> None:
        if self._show_window() and self._image.value is not None and self._live:
            self.preview()

    def _on_model_changed(self, _=None) -> None:
        if self._model.value == self._model_shown:
            return
        try:
            lm = self.model
        except ModelFileError as exc:
            show_warning(str(exc))
            return
        if lm is None:
            return
        self._model_shown = self._model.value  # the selection key: a registry id or a file path
        c = lm.card
        heads = {lv: headline_score(s) for lv, s in c.scores.items()}
        key = next((h[0] for h in heads.values() if h), None)
        scores = " ".join(f"{lv} {h[1]:.3f}" for lv, h in heads.items() if h) or "no scores"
        self._card.value = f"{c.training.get('data', c.description)[:48]}..."
        self._card.tooltip = (
            f"{c.id}: {c.description}\nvalidation {key or ''}: {scores}\nrecommended depth: "
            f"L{c.recommended_depth or lm.max_depth}\n" + "\n".join(c.training.get("citations", []))
        )
        self._model.tooltip = self._card.tooltip
        self._depth_slider.max = lm.max_depth
        self._depth_slider.value = c.recommended_depth or lm.max_depth
        # the learned object split where the model has one; the watershed where it has not
        has_cue = lm.module.config.has_cue
        if has_cue and self._instances.value == "watershed":
            self._instances.value = "learned"
        elif not has_cue and self._instances.value == "learned":
            self._instances.value = "watershed"
        is_ct = lm.normalization.mode == "window"
        self._window.visible = self._window_shown.visible = is_ct
        self._window_shown.value = ""
        if is_ct:
            self._show_window()
        self._update_channels()
        self._show_scale()

    # ----------------------------------------------------------------- where we are
    def _plane(self, image: Image, lm: LoadedModel) -> tuple[str, tuple[int, ...]]:
        """(axes, index of the current plane over the non-spatial axes) for ``image`` as the viewer shows it."""
        data, axes = self._source(image, lm)
        n_loop = len([a for a in axes if a not in ("ZYX" if lm.module.config.spatial_dims == 3 else "YX") + "C"])
        if n_loop == 0:
            return axes, ()
        lead = self._lead()
        pos = image.world_to_data(self._viewer.dims.point)[lead:]
        shape = data.shape
        idx = tuple(int(np.clip(round(float(p)), 0, shape[i] - 1)) for i, p in enumerate(pos[:n_loop]))
        return axes, idx

    def _zoom(self, image: Image, lm: LoadedModel) -> tuple[tuple[float, ...] | None, str]:
        """Resampling to the model's pixel size from the layer's scale, when the layer's units are lengths (what
        the readers set from the file: um for OME-Zarr and ImageJ TIFFs, mm for CT), and a note saying so."""
        from napari_unetpp.data.scale import ZoomError, zoom_for

        dims = lm.module.config.spatial_dims
        spatial = "ZYX" if dims == 3 else "YX"
        try:
            size, unit = layer_pixel_size(image, self._source(image, lm)[1], self._lead(), spatial)
        except (InputError, AttributeError, IndexError, TypeError):
            return None, ""
        if not unit:
            return None, ""  # pixels, or a unit we do not know: as it is
        try:
            return zoom_for(lm.card, spatial, size, unit)
        except ZoomError as exc:
            # too far to resample (a wrong layer scale, or a model for another pixel size): segment as it is, and
            # say so once per image and model instead of quietly ignoring the layer's scale
            seen = (image.unique_id, lm.fingerprint)
            if seen not in self._zoom_refused:
                self._zoom_refused.add(seen)
                show_warning(
                    f"'{image.name}' is segmented as it is, not resampled: {exc} In napari, the layer's scale and "
                    f"units (layer properties) are its pixel size."
                )
            return None, f"not resampled: {exc}"
        except ValueError:
            return None, ""

    def _key(self, image: Image, lm: LoadedModel, plane: tuple[int, ...]) -> ResultKey:
        """Layer (unique id, shape, data version), weights (fingerprint), plane, channel, normalisation and zoom:
        never a stale result from a new layer that reuses an ``id()``, a layer whose data was replaced, or another
        file with the same ``name@vN``."""
        return ResultKey(
            layer=image.unique_id,
            shape=tuple(pixels(image).shape),
            fingerprint=lm.fingerprint,
            plane=plane,
            channel=int(self._channel.value) if self._lead() else None,
            normalization=_norm_key(lm),
            zoom=self._zoom(image, lm)[0],
            version=self._version.get(image.unique_id, 0),
        )

    def _image_stats(self, image: Image, lm: LoadedModel, axes: str) -> list:
        key = dataclasses.replace(self._key(image, lm, ()), zoom=None)  # (statistics of the image as it is)
        if key not in self._stats:
            self._stats[key] = normalization_stats(self._source(image, lm)[0], lm, axes=axes)
        return self._stats[key]

    # ----------------------------------------------------------------- preview of the current slice
    def _on_depth_changed(self, _=None) -> None:
        if self._image.value is not None:
            self.preview()

    def _on_step(self, _=None) -> None:
        if self._image.value is None or self.model is None:
            return
        if self._live and self._stack_worker is None:
            self.preview()
        else:
            self._render_current()

    def preview(self, _=None) -> None:
        """Segment what the user looks at (current slice; the whole image if 2D) at the slider's depth.

        Levels already computed for this slice are shown at once; otherwise the slice is computed in the background.
        """
        image, lm = self._image.value, self.model
        if image is None or lm is None:
            show_warning("Add or select an image layer to segment.")
            return
        try:
            axes, plane = self._plane(image, lm)
            stats = self._image_stats(image, lm, axes)
        except (InputError, ValueError) as exc:
            self._error(user_message(exc))
            return
        self._live = True
        k = self._depth_slider.value
        res = self._cache.get(self._key(image, lm, plane))
        if res is not None and k in res.probs:
            self._render(image, lm, plane, res)
            return
        if self._preview_worker is not None:  # one at a time; the newest request wins
            self._pending_preview = True
            return
        src = self._source(image, lm)[0]
        data = src[plane] if plane else src  # read tile by tile by predict, never whole
        sub_axes = axes[len(plane) :]
        key = self._key(image, lm, plane)
        zoom = key.zoom
        device = self._device.value  # (every widget value is read here, on the main thread: the worker reads none)

        def gen():
            t0 = time.perf_counter()
            pred = yield from predict_iter(
                data,
                lm,
                axes=sub_axes,
                depth=k,
                levels="all",
                device=device,
                stats=stats,
                prob_dtype="float32",
                zoom=zoom,
            )
            return pred, time.perf_counter() - t0

        def done(out: tuple[Prediction, float]) -> None:
            pred, seconds = out
            self._detected.value = pred.device  # what ran this level, and why (PyTorch or ONNX Runtime, precision)
            if not self._current(key):
                return  # the layer's data was replaced meanwhile: a result of the old data
            entry = self._cache.put(key, pred.probabilities, {k: seconds}, pred.cues)
            if self._shows(image, key) and self._plane(image, lm)[1] == plane:
                self._render(image, lm, plane, entry)

        self._set_busy_preview(True)
        self._preview_worker = run_generator(gen, lambda p: None, done, self._error, self._preview_finished)
        self._track(self._preview_worker)

    def _current(self, key: ResultKey) -> bool:
        """Whether ``key`` is of its layer's current data."""
        return key.version == self._version.get(key.layer, 0)

    def _shows(self, image: Image, key: ResultKey) -> bool:
        """Whether a result under ``key`` is what the widget shows for its plane now: ``image`` is selected and the
        model, window, channel, zoom and data are those the result was computed with (a result that arrives after
        the user changed one of them is cached, never drawn)."""
        if self._image.value is not image:
            return False
        try:
            lm = self.model
            return lm is not None and self._key(image, lm, key.plane) == key
        except (InputError, ValueError):
            return False

    def _set_busy_preview(self, busy: bool) -> None:
        self._preview_btn.enabled = not busy
        self._timing.value = f"computing L{self._depth_slider.value} ..." if busy else self._timing.value

    def _preview_finished(self) -> None:
        self._preview_worker = None
        try:
            self._set_busy_preview(False)
        except RuntimeError:  # the dock widget was closed while the preview ran: nothing left to update
            self._pending_preview = False
            return
        if self._pending_preview:
            self._pending_preview = False
            self.preview()

    def _render_current(self, _=None) -> None:
        image, lm = self._image.value, self.model
        if image is None or lm is None:
            return
        try:
            plane = self._plane(image, lm)[1]
        except InputError:
            return
        res = self._cache.get(self._key(image, lm, plane))
        if res is not None and self._depth_slider.value in res.probs:
            self._render(image, lm, plane, res)

    # ----------------------------------------------------------------- layers
    def _render(
        self, image: Image, lm: LoadedModel, plane: tuple[int, ...], res: PlaneResult, mask: np.ndarray | None = None
    ) -> None:
        """Show the cached result of one plane at the slider's depth: mask, and levels if asked."""
        if self._rendering or self._depth_slider.value not in res.probs:
            return  # (not computed: e.g. a whole-stack run at a shallower depth while the slider moved deeper)
        self._rendering = True
        try:
            self._render_layers(image, lm, plane, res, mask)
        finally:
            self._rendering = False

    def _render_layers(
        self, image: Image, lm: LoadedModel, plane: tuple[int, ...], res: PlaneResult, mask: np.ndarray | None = None
    ) -> None:
        k = self._depth_slider.value
        levels = [res.probs[lv] for lv in range(1, k + 1) if lv in res.probs]
        ensemble = self._mode.value == "ensemble" and len(levels) == k
        if ensemble:
            chosen = np.mean([p.astype(np.float32) for p in levels], axis=0)
        else:
            chosen = res.probs[k].astype(np.float32)
        if mask is None:  # (a whole-stack run made it in its worker)
            mask = self._mask_from(chosen, lm, chosen_cue(res.cues, k, ensemble))
        self._write_plane(image, "mask", plane, mask, labels=True)
        if self._all_levels.value:
            for lv in range(1, k + 1):
                if lv in res.probs:
                    self._write_plane(image, f"L{lv}", plane, self._fg(res.probs[lv], lm), visible=lv == k)
            if self._mode.value == "ensemble" and len(levels) == k:
                self._write_plane(image, "ensemble", plane, self._fg(chosen.astype(np.float16), lm), visible=False)
        if self._disagreement.value and len(levels) > 1:
            self._write_plane(
                image,
                "disagreement",
                plane,
                self._fg(level_disagreement(levels), lm),
                colormap="inferno",
                contrast=(0, 0.5),
            )
        if res.seconds:  # this slice's own timings (slices from a whole-stack run keep the run's summary)
            times = ", ".join(f"L{lv} {s:.2f} s" for lv, s in sorted(res.seconds.items()))
            self._timing.value = f"{times} (showing L{k}{' ensemble' if self._mode.value == 'ensemble' else ''})"

    @staticmethod
    def _fg(prob: np.ndarray, lm: LoadedModel) -> np.ndarray:
        """Foreground probability of a 1-class map, or 1 - background for multi-class maps."""
        return prob if lm.module.config.num_classes == 1 else (1 - prob[0].astype(np.float32))

    def _mask_from(self, prob: np.ndarray, lm: LoadedModel, cue: np.ndarray | None = None) -> np.ndarray:
        cfg = lm.module.config
        return plane_mask(prob, cfg.num_classes, self._threshold.value, self._instances.value, cfg.spatial_dims, cue)

    def _full_shape(self, image: Image) -> tuple[int, ...]:
        shape = tuple(pixels(image).shape)[self._lead() :]
        return shape[:-1] if image.rgb else shape

    def result_layer(self, image: Image, tag: str = "mask") -> Any:
        """The result layer (``"mask"``, ``"L2"``, ``"ensemble"``, ``"disagreement"``) this widget writes for the
        image layer ``image``, or None. Found by the layer's identity, never its name: the results of a closed
        ``a.tif`` are never written for another ``a.tif``."""
        layer = self._results.get((image.unique_id, tag))
        return layer if layer is not None and layer in self._viewer.layers else None

    def _free_name(self, image: str, tag: str) -> str:
        """``"<image> [UNet++ <tag>]"``, or ``<tag> 2``, ``<tag> 3`` ... when a layer has that name (the user's edited
        mask, or the results of a closed image of the same name)."""
        name, n = layer_name(image, tag), 2
        while name in self._viewer.layers:
            name, n = layer_name(image, f"{tag} {n}"), n + 1
        return name

    def _layer_for(self, image: Image, tag: str, labels: bool, dtype: Any, **kw: Any):
        geo = {
            "scale": tuple(image.scale)[self._lead() :][: len(self._full_shape(image))],
            "translate": tuple(image.translate)[self._lead() :][: len(self._full_shape(image))],
            # a CT image's geometry travels with its results, so a mask saved to NIfTI overlays the scan
            "metadata": {k: v for k, v in image.metadata.items() if k == "unetpp_geometry"},
        }
        layer = self.result_layer(image, tag)
        if labels:
            if layer is not None and layer.unique_id in self._edited:
                name = self._free_name(image.name, tag)
                show_info(f"'{layer.name}' has your edits and is kept; the new result is in '{name}'.")
                layer = None
            if layer is None:
                layer = self._viewer.add_labels(
                    blank(self._full_shape(image), dtype, pixels(image)),
                    name=self._free_name(image.name, tag),
                    opacity=0.5,
                    **geo,
                )
                layer = _unproxied(layer)
                layer.events.paint.connect(WeakHandler(self, "_on_mask_painted", layer.unique_id))
                self._results[(image.unique_id, tag)] = layer
            elif layer.data.dtype != dtype and np.dtype(dtype).itemsize > layer.data.dtype.itemsize:
                layer.data = layer.data.astype(dtype)
            return layer
        if layer is not None:
            return layer
        layer = self._viewer.add_image(
            blank(self._full_shape(image), np.float16, pixels(image)),
            name=self._free_name(image.name, tag),
            colormap=kw.get("colormap", "magma"),
            blending="additive",
            opacity=0.5,
            contrast_limits=kw.get("contrast", (0, 1)),
            visible=kw.get("visible", True),
            **geo,
        )
        layer = _unproxied(layer)
        self._results[(image.unique_id, tag)] = layer
        return layer

    def _on_mask_painted(self, uid: Any, event: Any) -> None:
        """The user painted on one of our mask layers: it is theirs now, and never overwritten."""
        self._edited.add(uid)

    def _write_plane(
        self,
        image: Image,
        tag: str,
        plane: tuple[int, ...],
        values: np.ndarray,
        labels: bool = False,
        visible: bool = True,
        **kw: Any,
    ) -> None:
        layer = self._layer_for(image, tag, labels, values.dtype if labels else np.float16, visible=visible, **kw)
        if labels and values.dtype == np.uint32 and values.any():  # objects: ids unique across the whole stack
            start = self._next_label.get(layer.unique_id, 0)
            values = np.where(values > 0, values + np.uint32(start), 0).astype(np.uint32)
            self._next_label[layer.unique_id] = int(values.max())
        layer.data[plane] = values
        if self._on_screen(layer, plane):  # planes off screen are read when the user moves there
            layer.refresh()

    def _on_screen(self, layer: Any, plane: tuple[int, ...]) -> bool:
        """Whether ``plane`` of ``layer`` is what the viewer shows now (always, in 3D display). A whole-stack run
        refreshed the layer for every finished plane; re-slicing for planes nobody sees cost 0.1 s each."""
        if not plane or self._viewer.dims.ndisplay == 3:
            return True
        try:
            point = layer.world_to_data(self._viewer.dims.point)
        except Exception:  # pragma: no cover - napari API drift: refresh, as before
            return True
        return tuple(int(round(float(v))) for v in list(point)[: len(plane)]) == tuple(plane)

    # ----------------------------------------------------------------- whole stack
    def run_stack(self, _=None) -> None:
        """Segment every slice (or volume) in a worker, streaming planes into the layers as they complete."""
        image, lm = self._image.value, self.model
        if image is None or lm is None:
            show_warning("Add or select an image layer to segment.")
            return
        if self._stack_worker is not None:
            show_info("A whole-stack run is already going; cancel it first.")
            return
        try:
            data, axes = self._source(image, lm)
            stats = self._image_stats(image, lm, axes)
        except (InputError, ValueError) as exc:
            self._error(user_message(exc))
            return
        k = self._depth_slider.value
        cfg = lm.module.config
        # keep only what is shown: every level for the level layers, the ensemble or the disagreement, else head k
        levels = (
            "all" if (self._all_levels.value or self._disagreement.value or self._mode.value == "ensemble") else [k]
        )
        post = (self._threshold.value, self._instances.value, self._mode.value)
        base_key = self._key(image, lm, ())
        zoom = base_key.zoom
        device = self._device.value  # (every widget value is read here, on the main thread: the worker reads none)
        self._bar.value, self._bar.visible = 0, True
        t0 = time.perf_counter()

        def gen():
            """In the worker: predict, then copy each finished plane and make its mask (objects too) here."""
            run = predict_iter(
                data,
                lm,
                axes=axes,
                depth=k,
                levels=levels,
                device=device,
                stats=stats,
                allocate=lambda shape, dtype, name: blank(shape, dtype, data),
                zoom=zoom,
            )
            while True:
                try:
                    p = next(run)
                except StopIteration as stop:
                    return stop.value
                planes = []
                for plane in p.planes_done:
                    probs = {lv: np.array(a[plane]) for lv, a in p.partial.probabilities.items()}
                    cues = {lv: np.array(a[plane]) for lv, a in p.partial.cues.items()}
                    chosen = (
                        np.mean([probs[lv].astype(np.float32) for lv in range(1, k + 1)], axis=0)
                        if post[2] == "ensemble"
                        else probs[k].astype(np.float32)
                    )
                    cue = chosen_cue(cues, k, post[2] == "ensemble")
                    mask = plane_mask(chosen, cfg.num_classes, post[0], post[1], cfg.spatial_dims, cue)
                    planes.append((plane, probs, cues, mask))
                yield p, planes

        shown = [0.0]

        def on_yield(item) -> None:
            p, planes = item
            now = time.perf_counter()
            # the progress bar and line at most twice a second: each redraw competes with the prediction for the CPU
            if now - shown[0] >= 0.5 or p.done == p.total:
                shown[0] = now
                self._bar.max, self._bar.value = p.total, p.done
                self._timing.value = f"whole stack L{k}: {p.done} / {p.total} tiles, {now - t0:.0f} s"
            # the worker's mask stands for what is shown only while depth and post-processing are those it used
            same = (k, *post) == (
                self._depth_slider.value,
                self._threshold.value,
                self._instances.value,
                self._mode.value,
            )
            for plane, probs, cues, mask in planes:
                key = dataclasses.replace(base_key, plane=plane)
                self._store_plane(image, lm, key, probs, mask if same else None, cues)

        def on_return(pred: Prediction) -> None:
            self._detected.value = pred.device
            self._timing.value = (
                f"whole stack L{k}: {time.perf_counter() - t0:.1f} s, "
                f"{pred.mask.size / 1e6 / max(pred.seconds, 1e-9):.2f} MP/s"
            )

        self._run_btn.enabled = False
        self._cancel_btn.enabled = True
        self._cancelled = False
        self._stack_layer = image.unique_id
        self._stack_worker = run_generator(gen, on_yield, on_return, self._error, self._stack_finished)
        self._track(self._stack_worker)

    def _store_plane(
        self,
        image: Image,
        lm: LoadedModel,
        key: ResultKey,
        probs: dict[int, np.ndarray],
        mask: np.ndarray | None,
        cues: dict[int, np.ndarray] | None = None,
    ) -> None:
        """Cache a whole-stack run's plane under the key the run started with, and draw it unless the user changed
        what the image is shown with since (model, window, channel: the result is then only cached). While another
        image is selected, the run keeps filling its own image's layers."""
        if not self._current(key):
            return  # the layer's data was replaced: a result of the old data
        entry = self._cache.put(key, probs, cues=cues)
        if self._image.value is not image or self._shows(image, key):
            self._render(image, lm, key.plane, entry, mask)

    def _stack_finished(self) -> None:
        if self._cancelled:
            self._timing.value = "cancelled; the slices already shown are complete and kept"
        self._stack_worker = self._stack_layer = None
        self._run_btn.enabled = True
        self._cancel_btn.enabled = False
        self._bar.visible = False

    def _track(self, worker: Any) -> None:
        if worker is not None:  # (None: it ran synchronously)
            self._workers.append(worker)
            worker.finished.connect(functools.partial(_forget, self._workers, worker))

    def cancel(self, _=None) -> None:
        """Stop the whole-stack run at its next tile; planes already shown stay."""
        if self._stack_worker is not None:
            self._cancelled = True
            self._stack_worker.quit()

    # ----------------------------------------------------------------- export
    def export_model(self, _=None, path: str | None = None) -> None:
        """Export the selected model at the slider's depth as a bioimage.io package (asks where, unless ``path``),
        in a worker; the current slice of the selected image is the package's test input when it fits."""
        lm = self.model
        if lm is None:
            show_warning("Choose a model to export.")
            return
        k = self._depth_slider.value
        if path is None:
            path = self._ask_export_path(f"{lm.card.name}-L{k}.zip")
            if not path:
                return
        sample = self._export_sample(lm)

        def gen():
            from napari_unetpp.export.bioimageio import export_bioimageio

            return export_bioimageio(lm, path, depth=k, sample=sample)
            yield  # a generator for the worker

        def done(res: Any) -> None:
            msg = f"Exported {lm.card.id} at L{res.depth} to {res.path} (bioimage.io: TorchScript + ONNX)."
            show_info(msg)
            self._timing.value = msg

        def finished() -> None:
            self._export_btn.enabled = True

        self._export_btn.enabled = False
        self._timing.value = f"exporting {lm.card.id} L{k} ..."
        self._track(run_generator(gen, lambda p: None, done, self._error, finished))

    def _export_sample(self, lm: LoadedModel) -> np.ndarray | None:
        """The current slice (2D models) or volume (3D) of the selected grey image, else None (the package then
        uses a shipped sample of the model's domain)."""
        image = self._image.value
        if image is None or image.rgb:
            return None
        try:
            _, plane = self._plane(image, lm)
            data = self._source(image, lm)[0]
            return np.asarray(data[plane] if plane else data, dtype=np.float32)
        except (InputError, ValueError, IndexError):
            return None

    def _ask_export_path(self, default: str) -> str:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(
            self.native, "Export for bioimage.io", default, "bioimage.io package (*.zip)"
        )
        return str(path or "")

    def _error(self, message: str) -> None:
        show_error(message)
        self._timing.value = message[:80]


def _file_windows(layer: Any) -> list[Window]:
    """The HU windows the layer's file records (our DICOM reader's ``metadata["unetpp_windows"]``), else none."""
    found = getattr(layer, "metadata", {}).get("unetpp_windows", [])
    return [w for w in found if isinstance(w, Window)] if isinstance(found, (list, tuple)) else []


def _unproxied(layer: Any) -> Any:
    """The layer behind napari's proxy (a plugin's viewer hands out proxies of the layers it adds, which are never
    ``is`` the layers in ``viewer.layers``)."""
    return getattr(layer, "__wrapped__", layer)


def _forget(workers: list[Any], worker: Any) -> None:
    if worker in workers:
        workers.remove(worker)
