"""The "UNet++ Segment" dock widget: a thin magicgui shell over :class:`~.controller.SegmentController` (planes, keys,
zoom, statistics, model and window), :class:`~.layers.ResultLayers` (the result layers) and :mod:`.jobs` (the
preview and whole-stack runs in thread workers). Its controls and their choices are :class:`~.controls.SegmentControls`;
this adds what they do: previews of the plane on screen, whole-stack runs, exports, and following the viewer's
layers."""

from __future__ import annotations

import dataclasses
import time
import weakref
from typing import Any

import napari
import numpy as np
from napari.layers import Image
from napari.utils.notifications import show_info, show_warning

from napari_unetpp.errors import InputError
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.napari.cache import PlaneResult, ResultKey
from napari_unetpp.napari.events import LayerHooks
from napari_unetpp.napari.segment import jobs
from napari_unetpp.napari.segment.controller import pixels
from napari_unetpp.napari.segment.controls import SegmentControls
from napari_unetpp.napari.segment.layers import ResultLayers, unproxied
from napari_unetpp.napari.segment.shown import planes_to_show, timing_line
from napari_unetpp.napari.workers import user_message

__all__ = ["SegmentWidget"]

_INSTANCES: list[weakref.ref] = []


class SegmentWidget(SegmentControls):
    """Segment the selected image with a UNet++ pruned to the depth on the slider.

    Args:
        napari_viewer: The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer)
        self.layers = ResultLayers(napari_viewer)
        self.jobs = jobs.Jobs()
        self._data_hooks = LayerHooks(self, "_on_data_changed", "data", lambda ly: isinstance(ly, Image))
        self._live = False  # after the first preview, scrolling through slices segments them too
        self._rendering = False  # our own layer writes must not re-enter through layer/choice events

        self._depth_slider.changed.connect(self._on_depth_changed)
        self._mode.changed.connect(self._on_depth_changed)
        for w in (self._threshold, self._instances, self._all_levels, self._disagreement):
            w.changed.connect(self._render_current)
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
        self.native.destroyed.connect(self.jobs.abandon)  # running workers stop and let go of the widget

    @classmethod
    def for_viewer(cls, viewer: napari.viewer.Viewer) -> SegmentWidget | None:
        """The Segment widget docked in ``viewer`` (the newest if several), or None."""
        # napari hands plugins a proxy of the viewer: compare the objects behind the proxies
        target = unproxied(viewer)
        found = [w for w in (r() for r in _INSTANCES) if w is not None and unproxied(w._viewer) is target]
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

    def show_live(self, lm: LoadedModel | None, image: Image | None = None) -> None:
        """Re-segment what the user looks at with a live training snapshot ``lm`` at the slider's depth (None: back
        to the chosen model). The snapshot is held in a slot of its own, not as a registry id."""
        if image is not None and image in self._viewer.layers and self._image.value is not image:
            with self._image.changed.blocked():
                self._image.value = image
        self.controller.live = lm
        if lm is not None:  # say what is shown: not the model chosen above
            steps = lm.card.training.get("live", {}).get("steps", "?")
            self._card.value, self._card.tooltip = f"live training snapshot (step {steps})", lm.card.description
        else:
            self._model_shown = None  # the chosen model's card again
            self._on_model_changed()
        self.preview()

    @property
    def busy(self) -> bool:
        """Whether a preview or a whole-stack run is going."""
        return self.jobs.preview is not None or self.jobs.stack is not None

    # ----------------------------------------------------------------- following the viewer and the choices
    def _on_layers_changed(self, event: Any = None) -> None:
        if self._rendering:
            return
        layers = list(self._viewer.layers)
        self.controller.forget(layers, self._model.choices, self._model.value)
        self.layers.forget({ly.unique_id for ly in layers})
        for ly in self._data_hooks.sync(layers):  # image layers that came: their data is watched
            self.controller.watch(ly.unique_id, tuple(pixels(ly).shape))
        self._update_channels()
        self.reset_choices()
        images = [c for c in self._image.choices if c is not None]
        if self._image.value is None and images:
            with self._image.changed.blocked():
                self._image.value = images[0]
            self._suggest_model()

    def _on_data_changed(self, uid: Any, event: Any = None) -> None:
        """An image layer's data was replaced: its results and statistics are stale; a whole-stack run on it stops
        (what it computes now is for the old data and is not kept). Data of another shape gets new result layers:
        the old ones stay in the viewer as they are (they may hold the user's corrections) and are never written
        again."""
        layer = self._data_hooks.layer(uid)
        if self.controller.data_changed(uid, tuple(pixels(layer).shape) if layer is not None else None):
            self.layers.forget_image(uid)
        if self.jobs.stack is not None and self.jobs.stack_layer == uid:
            self.cancel()

    def _on_image_changed(self, _=None) -> None:
        self._suggest_model()
        self._show_window()
        self._update_channels()
        self._show_scale()
        self._render_current()

    def _on_channel_changed(self, _=None) -> None:
        self._show_scale()
        if self._live:
            self.preview()

    def _on_window_changed(self, _=None) -> None:
        if self._show_window() and self._image.value is not None and self._live:
            self.preview()

    # ----------------------------------------------------------------- preview of the current slice
    def _position(self, image: Image) -> Any:
        return image.world_to_data(self._viewer.dims.point)

    def _on_depth_changed(self, _=None) -> None:
        if self._image.value is not None:
            self.preview()

    def _on_step(self, _=None) -> None:
        if self._image.value is None or self.model is None:
            return
        if self._live and self.jobs.stack is None:
            self.preview()
        else:
            self._render_current()

    def preview(self, _=None) -> None:
        """Segment what the user looks at (current slice; the whole image if 2D) at the slider's depth.

        Levels already computed for this slice are shown at once; otherwise the slice is computed in the background.
        """
        image, lm, channel = self._image.value, self.model, self._channel.value
        if image is None or lm is None:
            show_warning("Add or select an image layer to segment.")
            return
        k = self._depth_slider.value
        try:
            plan = self.controller.preview_plan(image, lm, channel, self._position(image), k)
        except (InputError, ValueError) as exc:
            self._error(user_message(exc))
            return
        self._live = True
        if plan.cached is not None:
            self._render(image, lm, plan.plane, plan.cached)
            return
        if self.jobs.preview is not None:  # one at a time; the newest request wins
            self.jobs.pending_preview = True
            return
        key = plan.key
        # (every widget value is read here, on the main thread: the worker reads none)
        runtime = "torch" if lm is self.controller.live else "auto"  # a snapshot: nothing exported or measured
        job = jobs.preview_job(plan.data, lm, plan.axes, k, self._device.value, plan.stats, key.zoom, runtime)

        def done(out: tuple[Any, float]) -> None:
            pred, seconds = out
            self._detected.value = pred.ran_on  # what ran this level, and why (PyTorch or ONNX Runtime, precision)
            if not self.controller.is_current(key):
                return  # the layer's data was replaced meanwhile: a result of the old data
            entry = self.controller.cache.put(key, pred.probabilities, {k: seconds}, pred.cues)
            if (
                self._shows(image, key)
                and self.controller.plane(image, lm, channel, self._position(image))[1] == key.plane
            ):
                self._render(image, lm, key.plane, entry)

        self._set_busy_preview(True)
        self.jobs.preview = self.jobs.start(job, lambda p: None, done, self._error, self._preview_finished)

    def _shows(self, image: Image, key: ResultKey) -> bool:
        """Whether a result under ``key`` is what the widget shows for its plane now: ``image`` is selected and the
        model, window, channel, zoom and data are those the result was computed with (a result that arrives after
        the user changed one of them is cached, never drawn)."""
        if self._image.value is not image:
            return False
        try:
            lm = self.model
            return lm is not None and self.controller.key(image, lm, key.plane, self._channel.value) == key
        except (InputError, ValueError):
            return False

    def _preview_finished(self) -> None:
        self.jobs.preview = None
        try:
            self._set_busy_preview(False)
        except RuntimeError:  # the dock widget was closed while the preview ran: nothing left to update
            self.jobs.pending_preview = False
            return
        if self.jobs.pending_preview:
            self.jobs.pending_preview = False
            self.preview()

    def _render_current(self, _=None) -> None:
        image, lm = self._image.value, self.model
        if image is None or lm is None:
            return
        channel, position = self._channel.value, self._position(image)
        try:
            plane = self.controller.plane(image, lm, channel, position)[1]
        except InputError:
            return
        res = self.controller.cached(image, lm, channel, position, self._depth_slider.value)
        if res is not None:
            self._render(image, lm, plane, res)

    def _render(
        self,
        image: Image,
        lm: LoadedModel,
        plane: tuple[int, ...],
        res: PlaneResult,
        mask: np.ndarray | None = None,
        lead: int | None = None,
    ) -> None:
        """Show the cached result of one plane at the slider's depth: mask, and levels if asked (``lead``: whether
        a whole-stack run segments a channel of the first axis; default: the selected channel's)."""
        display = self.display()
        shown = planes_to_show(res, lm, display, mask)
        if self._rendering or not shown:
            return  # (not computed: e.g. a whole-stack run at a shallower depth while the slider moved deeper)
        lead = self.controller.lead(image, lm, self._channel.value) if lead is None else lead
        self._rendering = True
        try:
            for s in shown:
                self.layers.write(image, plane, s, lead)
        finally:
            self._rendering = False
        line = timing_line(res, display)
        if line:
            self._timing.value = line

    def result_layer(self, image: Image, tag: str = "mask") -> Any:
        """The result layer (``"mask"``, ``"L2"``, ``"ensemble"``, ``"disagreement"``) this widget writes for the
        image layer ``image``, or None (see :meth:`~.layers.ResultLayers.get`)."""
        return self.layers.get(image, tag)

    # ----------------------------------------------------------------- whole stack
    def run_stack(self, _=None) -> None:
        """Segment every slice (or volume) in a worker, streaming planes into the layers as they complete."""
        image, lm, channel = self._image.value, self.model, self._channel.value
        if image is None or lm is None:
            show_warning("Add or select an image layer to segment.")
            return
        if self.jobs.stack is not None:
            show_info("A whole-stack run is already going; cancel it first.")
            return
        try:
            data, axes = self.controller.source(image, lm, channel)
            stats = self.controller.stats(image, lm, channel)
        except (InputError, ValueError) as exc:
            self._error(user_message(exc))
            return
        display = self.display()
        k = display.depth
        base_key = self.controller.key(image, lm, (), channel)
        lead = self.controller.lead(image, lm, channel)
        # (every widget value is read here, on the main thread: the worker reads none)
        runtime = "torch" if lm is self.controller.live else "auto"  # a snapshot: nothing exported or measured
        job = jobs.stack_job(data, lm, axes, display, self._device.value, stats, base_key.zoom, runtime)
        self._bar.value, self._bar.visible = 0, True
        t0 = time.perf_counter()
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
            same = display.mask_choices == self.display().mask_choices
            for plane, probs, cues, mask in planes:
                key = dataclasses.replace(base_key, plane=plane)
                self._store_plane(image, lm, key, probs, mask if same else None, cues, lead)

        def on_return(pred: Any) -> None:
            self._detected.value = pred.ran_on
            mps = pred.mask.size / 1e6 / max(pred.seconds, 1e-9)
            self._timing.value = f"whole stack L{k}: {time.perf_counter() - t0:.1f} s, {mps:.2f} MP/s"

        self._run_btn.enabled = False
        self._cancel_btn.enabled = True
        self.jobs.cancelled = False
        self.jobs.stack_layer = image.unique_id
        self.jobs.stack = self.jobs.start(job, on_yield, on_return, self._error, self._stack_finished)

    def _store_plane(
        self,
        image: Image,
        lm: LoadedModel,
        key: ResultKey,
        probs: dict[int, np.ndarray],
        mask: np.ndarray | None,
        cues: dict[int, np.ndarray] | None = None,
        lead: int | None = None,
    ) -> None:
        """Cache a whole-stack run's plane under the key the run started with, and draw it unless the user changed
        what the image is shown with since (model, window, channel: the result is then only cached). While another
        image is selected, the run keeps filling its own image's layers."""
        if not self.controller.is_current(key):
            return  # the layer's data was replaced: a result of the old data
        entry = self.controller.cache.put(key, probs, cues=cues)
        if self._image.value is not image or self._shows(image, key):
            self._render(image, lm, key.plane, entry, mask, lead)

    def _stack_finished(self) -> None:
        if self.jobs.cancelled:
            self._timing.value = "cancelled; the slices already shown are complete and kept"
        self.jobs.stack = self.jobs.stack_layer = None
        self._run_btn.enabled = True
        self._cancel_btn.enabled = False
        self._bar.visible = False

    def cancel(self, _=None) -> None:
        """Stop the whole-stack run at its next tile; planes already shown stay."""
        self.jobs.cancel_stack()

    # ----------------------------------------------------------------- export
    def export_model(self, _=None, path: str | None = None) -> None:
        """Export the selected model at the slider's depth as a bioimage.io package (asks where, unless ``path``),
        in a worker; the current slice of the selected image is the package's test input when it fits."""
        lm = self.model
        if lm is None:
            show_warning("Choose a model to export.")
            return
        k = self._depth_slider.value
        path = path or self._ask_export_path(f"{lm.card.name}-L{k}.zip")
        if not path:
            return

        def done(res: Any) -> None:
            msg = f"Exported {lm.card.id} at L{res.depth} to {res.path} (bioimage.io: TorchScript + ONNX)."
            show_info(msg)
            self._timing.value = msg

        self._export_btn.enabled = False
        self._timing.value = f"exporting {lm.card.id} L{k} ..."
        job = jobs.export_job(lm, path, k, self._export_sample(lm))
        self.jobs.start(job, lambda p: None, done, self._error, lambda: setattr(self._export_btn, "enabled", True))

    def _export_sample(self, lm: LoadedModel) -> np.ndarray | None:
        """The current slice (2D models) or volume (3D) of the selected grey image, else None (the package then
        uses a shipped sample of the model's domain)."""
        image, channel = self._image.value, self._channel.value
        if image is None or image.rgb:
            return None
        try:
            _, plane = self.controller.plane(image, lm, channel, self._position(image))
            data = self.controller.source(image, lm, channel)[0]
            return np.asarray(data[plane] if plane else data, dtype=np.float32)
        except (InputError, ValueError, IndexError):
            return None
