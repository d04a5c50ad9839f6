"""What the Segment widget knows, without Qt, napari or magicgui: which plane of an image is on screen, the key a
result is cached under, the resampling to the model's pixel size, the normalisation statistics, the chosen model with
its HU window, the channel segmented, and what a slider move must compute.

An *image* here is a napari Image layer or anything with its attributes: ``data`` (a pyramid's levels when
``multiscale``), ``multiscale``, ``rgb``, ``scale``, ``units``, ``metadata``, ``unique_id`` and ``name``. A *position*
is a point in the layer's data coordinates (the widget passes ``layer.world_to_data(viewer.dims.point)``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import numpy as np

from napari_unetpp.data.axes import first_axis_channel, layer_axes, spatial_axes
from napari_unetpp.data.windows import WINDOWS, Window, parse_window
from napari_unetpp.errors import InputError
from napari_unetpp.inference.predict import normalization_stats
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.model.registry import list_models, load_model
from napari_unetpp.model.windowed import with_window
from napari_unetpp.napari.cache import PlaneResult, ResultCache, ResultKey
from napari_unetpp.napari.pixel_size import layer_pixel_size
from napari_unetpp.training.metrics import headline_score

__all__ = [
    "MODELS_WINDOW",
    "WINDOW_CHOICES",
    "PreviewPlan",
    "SegmentController",
    "card_summary",
    "file_windows",
    "image_axes",
    "normalization_key",
    "objects_for",
    "pixels",
    "result_shape",
    "scale_note",
]

log = logging.getLogger(__name__)

MODELS_WINDOW = "model's"
WINDOW_CHOICES = (MODELS_WINDOW, *WINDOWS, "dicom")


def pixels(image: Any) -> Any:
    """The layer's full-resolution array: the finest level of a multiscale (pyramid) layer, else its data. Lazy
    arrays (dask, zarr) stay lazy."""
    return image.data[0] if image.multiscale else image.data


def image_axes(image: Any, spatial_dims: int) -> str:
    """Axes of an Image layer's data for a model with ``spatial_dims`` (RGB layers carry a C axis last)."""
    return layer_axes(pixels(image).ndim, image.rgb, spatial_dims)


def result_shape(image: Any, lead: int = 0) -> tuple[int, ...]:
    """The shape of the image's masks and probabilities: its data's without the ``lead`` channel axis and colour."""
    shape = tuple(pixels(image).shape)[lead:]
    return shape[:-1] if image.rgb else shape


def file_windows(image: Any) -> list[Window]:
    """The HU windows the layer's file records (our DICOM reader's ``metadata["unetpp_windows"]``), else none."""
    found = getattr(image, "metadata", {}).get("unetpp_windows", [])
    return [w for w in found if isinstance(w, Window)] if isinstance(found, (list, tuple)) else []


def normalization_key(lm: LoadedModel) -> tuple:
    """The model's normalisation as a hashable key: results under one HU window are not another's."""
    return tuple(sorted(lm.card.normalization.items()))


def card_summary(lm: LoadedModel) -> tuple[str, str]:
    """What the widget says of a model: a short line of what it was trained on, and a tooltip with its scores,
    recommended depth and citations."""
    c = lm.card
    heads = {lv: headline_score(s) for lv, s in c.scores.items()}
    metric = next((h[0] for h in heads.values() if h), None)
    scores = " ".join(f"{lv} {h[1]:.3f}" for lv, h in heads.items() if h) or "no scores"
    line = f"{c.training.get('data', c.description)[:48]}..."
    tooltip = (
        f"{c.id}: {c.description}\nvalidation {metric or ''}: {scores}\nrecommended depth: "
        f"L{c.recommended_depth or lm.max_depth}\n" + "\n".join(c.training.get("citations", []))
    )
    return line, tooltip


def objects_for(lm: LoadedModel, objects: str) -> str:
    """The object split to offer with ``lm``: its learned split where it has a cue, the watershed where not."""
    has_cue = lm.module.config.has_cue
    if has_cue and objects == "watershed":
        return "learned"
    if not has_cue and objects == "learned":
        return "watershed"
    return objects


def scale_note(zoom: tuple[float, ...] | None, why: str) -> tuple[str, str]:
    """The "pixel size" line and its tooltip: resampled (by how much), or used as it is (and why)."""
    if zoom:
        value = f"resampled x{' x '.join(f'{z:.2f}' for z in zoom)}"
    else:
        refused = why.startswith("not resampled")
        value = "used as it is (pixel size far from the model's)" if refused else "used as it is"
    return value, why or (
        "The layer's pixel size matches the model's, or one of them is unknown (a layer in pixels): the image "
        "is segmented as it is."
    )


@dataclasses.dataclass
class PreviewPlan:
    """What a preview of the plane on screen needs.

    Attributes:
        key: The key the plane's result is cached under.
        plane: Index of the plane over the non-spatial axes (``()``: the whole image).
        data: The plane's pixels (lazy: prediction reads them tile by tile).
        axes: The plane's axes.
        stats: The image's normalisation statistics (of the whole image, not the plane).
        cached: The cached result when it holds the slider's level (show it, compute nothing), else None.
    """

    key: ResultKey
    plane: tuple[int, ...]
    data: Any
    axes: str
    stats: list
    cached: PlaneResult | None


class SegmentController:
    """The Segment widget's state and decisions, without a viewer.

    Args:
        warn: Called with one sentence the user should read once (default: the log); the widget passes napari's
            warning notification.
        load: Loads a model by registry id or path (default :func:`~napari_unetpp.model.registry.load_model`).
    """

    def __init__(
        self, warn: Callable[[str], None] | None = None, load: Callable[[str], LoadedModel] = load_model
    ) -> None:
        self.cache = ResultCache()
        self.live: LoadedModel | None = None  # a live training snapshot, held in a slot of its own (no registry id)
        self.files: list[str] = []  # models opened from files, listed after the registry's
        self._warn = warn or log.warning
        self._load = load
        self._loaded: dict[str, LoadedModel] = {}
        # (model, window) -> the model with that window (its own folded copy, runtime sessions): one per window, so
        # images that share a window share it, and a file's own ("dicom") window is that image's, never another's
        self._windowed: dict[tuple[str, Window], LoadedModel] = {}
        self._zoom_refused: set[tuple[Any, str]] = set()  # (image, model) pairs told once that they are not resampled
        # everything per layer is keyed by napari's layer.unique_id (never id(), which a new layer may reuse, nor the
        # name, which a new layer may share) and forgotten when the layer goes or its data changes
        self._stats: dict[ResultKey, list] = {}
        self._version: dict[Hashable, int] = {}  # image layer -> how many times its data was replaced
        self._shapes: dict[Hashable, tuple[int, ...]] = {}  # image layer -> the shape of its data when last seen

    # ----------------------------------------------------------------- models and windows
    def model_ids(self) -> list[str]:
        """The models to choose from: the registry's (shipped and the user's versions), then files opened."""
        return [r.id for r in list_models()] + self.files

    def open_file(self, path: str) -> str:
        """Load a model file and list it; returns its choice (the path). Raises ModelFileError for a bad file."""
        self._loaded[path] = self._load(path)
        if path not in self.files:
            self.files.append(path)
        return path

    def loaded(self, model_id: str | None) -> LoadedModel | None:
        """The model ``model_id`` if it is loaded already (never loads)."""
        return self._loaded.get(model_id) if model_id else None

    def model(self, model_id: str | None, window: str = MODELS_WINDOW, image: Any = None) -> LoadedModel | None:
        """The model ``model_id`` (loaded once) under the HU ``window`` chosen (a CT model's; ``"dicom"``: the
        ``image``'s own window), or None when no model is chosen.

        Raises:
            InputError: a window the image cannot give (``dicom`` for an image without one).
            ModelFileError: a model file that cannot be read.
        """
        if model_id is None:
            return None
        if model_id not in self._loaded:
            self._loaded[model_id] = self._load(model_id)
        lm = self._loaded[model_id]
        if lm.normalization.mode != "window" or str(window) == MODELS_WINDOW:
            return lm
        key = (model_id, parse_window(str(window), file_windows(image) if image is not None else []))
        if key not in self._windowed:
            self._windowed[key] = with_window(lm, key[1])
        return self._windowed[key]

    def windowed_models(self) -> dict[tuple[str, Window], LoadedModel]:
        """The windowed copies made so far, by (model, window)."""
        return dict(self._windowed)

    # ----------------------------------------------------------------- layers coming and going
    def watch(self, uid: Hashable, shape: tuple[int, ...]) -> None:
        """Remember the shape of a new image layer's data (a later data event tells whether it changed)."""
        self._shapes[uid] = tuple(shape)

    def forget(self, present: Iterable[Any], model_ids: Iterable[str], selected: str | None) -> None:
        """Drop what belongs to layers and models that went away: cached results, statistics, windowed copies.

        Args:
            present: The viewer's layers now.
            model_ids: The models that can still be chosen; loaded others (but ``selected``) are dropped.
            selected: The model chosen now.
        """
        present = list(present)
        uids = {ly.unique_id for ly in present}
        keep = set(model_ids) | set(self.files)
        for mid in [m for m in self._loaded if m not in keep and m != selected]:
            del self._loaded[mid]
        self.cache.keep_only(uids, {lm.fingerprint for lm in self._loaded.values()})
        self._stats = {k: v for k, v in self._stats.items() if k.layer in uids}
        in_use = set(WINDOWS.values()) | {w for ly in present for w in file_windows(ly)}
        self._windowed = {k: v for k, v in self._windowed.items() if k[0] in self._loaded and k[1] in in_use}
        self._version = {k: v for k, v in self._version.items() if k in uids}
        self._shapes = {k: v for k, v in self._shapes.items() if k in uids}

    def data_changed(self, uid: Hashable, shape: tuple[int, ...] | None) -> bool:
        """An image layer's data was replaced: its results and statistics are stale. Returns whether the shape
        changed (its result layers are then not written again)."""
        self._version[uid] = self._version.get(uid, 0) + 1
        self.cache.drop(layer=uid)
        self._stats = {k: v for k, v in self._stats.items() if k.layer != uid}
        changed = shape != self._shapes.get(uid)
        if changed and shape is not None:
            self._shapes[uid] = tuple(shape)
        return changed

    def is_current(self, key: ResultKey) -> bool:
        """Whether ``key`` is of its layer's current data (not of data since replaced)."""
        return key.version == self._version.get(key.layer, 0)

    # ----------------------------------------------------------------- channels
    def channel_choices(self, image: Any, lm: LoadedModel | None) -> list[tuple[str, int]]:
        """Channels along the first axis of a grey layer, for a 1-channel model: offered when the layer has two more
        dimensions than the model's (C and a stack axis: CZYX for a 2D model) and 2-8 entries along the first.
        napari's own multi-channel files open as one layer per channel instead."""
        if image is None or image.rgb or lm is None or lm.module.config.in_channels != 1:
            return []
        shape = pixels(image).shape
        dims = lm.module.config.spatial_dims
        if len(shape) < dims + 2 or not 2 <= shape[0] <= 8 or len(shape) - 1 > 4:
            return []
        return [(f"{c} of {shape[0]} (first axis)", c) for c in range(shape[0])]

    def lead(self, image: Any, lm: LoadedModel | None, channel: int | None) -> int:
        """1 when ``channel`` of the first axis is segmented (that axis is not in the results), else 0."""
        return 1 if channel is not None and channel in [v for _, v in self.channel_choices(image, lm)] else 0

    def source(self, image: Any, lm: LoadedModel, channel: int | None = None) -> tuple[Any, str]:
        """The pixels the model reads and their axes: the layer's, or the chosen channel of its first axis."""
        dims = lm.module.config.spatial_dims
        if channel is not None and self.lead(image, lm, channel):  # (only 1-channel models are offered one)
            return first_axis_channel(pixels(image), dims, channel)
        return pixels(image), image_axes(image, dims)

    # ----------------------------------------------------------------- where we are
    def plane(self, image: Any, lm: LoadedModel, channel: int | None, position: Any) -> tuple[str, tuple[int, ...]]:
        """(axes, index of the plane at ``position`` over the non-spatial axes): what a 2D model segments of a stack
        or time series, ``()`` for a 2D image or a 3D model's volume."""
        data, axes = self.source(image, lm, channel)
        n_loop = len([a for a in axes if a not in spatial_axes(lm.module.config.spatial_dims) + "C"])
        if n_loop == 0:
            return axes, ()
        pos = list(position)[self.lead(image, lm, channel) :]
        shape = data.shape
        idx = tuple(int(np.clip(round(float(p)), 0, shape[i] - 1)) for i, p in enumerate(pos[:n_loop]))
        return axes, idx

    def zoom(self, image: Any, lm: LoadedModel, channel: int | None = None) -> tuple[tuple[float, ...] | None, str]:
        """Resampling to the model's pixel size from the layer's scale, when the layer's units are lengths (what
        the readers set from the file: um for OME-Zarr and ImageJ TIFFs, mm for CT), and a note saying so. A pixel
        size too far from the model's is used as it is, and the user is told once per image and model."""
        from napari_unetpp.data.scale import ZoomError, zoom_for

        spatial = spatial_axes(lm.module.config.spatial_dims)
        try:
            lead = self.lead(image, lm, channel)
            size, unit = layer_pixel_size(image, self.source(image, lm, channel)[1], lead, spatial)
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
                self._warn(
                    f"'{image.name}' is segmented as it is, not resampled: {exc} In napari, the layer's scale and "
                    f"units (layer properties) are its pixel size."
                )
            return None, f"not resampled: {exc}"
        except ValueError:
            return None, ""

    def key(self, image: Any, lm: LoadedModel, plane: tuple[int, ...], channel: int | None = None) -> ResultKey:
        """Layer (unique id, shape, data version), weights (fingerprint), plane, channel, normalisation and zoom:
        never a stale result from a new layer that reuses an ``id()``, a layer whose data was replaced, or another
        file with the same ``name@vN``."""
        return ResultKey(
            layer=image.unique_id,
            shape=tuple(pixels(image).shape),
            fingerprint=lm.fingerprint,
            plane=tuple(plane),
            channel=int(channel) if channel is not None and self.lead(image, lm, channel) else None,
            normalization=normalization_key(lm),
            zoom=self.zoom(image, lm, channel)[0],
            version=self._version.get(image.unique_id, 0),
        )

    def stats(self, image: Any, lm: LoadedModel, channel: int | None = None) -> list:
        """The normalisation statistics of the whole image (the pixels the model reads), computed once per layer
        data, channel and normalisation.

        Raises:
            InputError, ValueError: an image the model cannot read (bad dimensions, NaN).
        """
        # statistics of the image as it is (no zoom), and not of the weights: a new snapshot of live training, or a
        # fine-tuned version, reads the same statistics as long as it reads the image alike (dims, channels, recipe)
        cfg = lm.module.config
        reads = f"{cfg.spatial_dims}d/{cfg.in_channels}ch"
        key = dataclasses.replace(self.key(image, lm, (), channel), zoom=None, fingerprint=reads)
        if key not in self._stats:
            data, axes = self.source(image, lm, channel)
            self._stats[key] = normalization_stats(data, lm, axes=axes)
        return self._stats[key]

    def has_stats(self, uid: Hashable | None = None) -> bool:
        """Whether statistics are kept (of the layer ``uid``, or of any)."""
        return any(uid is None or k.layer == uid for k in self._stats)

    # ----------------------------------------------------------------- what a slider move computes
    def preview_plan(self, image: Any, lm: LoadedModel, channel: int | None, position: Any, depth: int) -> PreviewPlan:
        """What showing the plane at ``position`` at ``depth`` takes: its cached result when that holds the level,
        else the plane's pixels and statistics to compute every level up to ``depth`` from.

        Raises:
            InputError, ValueError: an image the model cannot read.
        """
        axes, plane = self.plane(image, lm, channel, position)
        stats = self.stats(image, lm, channel)
        key = self.key(image, lm, plane, channel)
        res = self.cache.get(key)
        src = self.source(image, lm, channel)[0]
        data = src[plane] if plane else src  # read tile by tile by predict, never whole
        cached = res if res is not None and depth in res.probs else None
        return PreviewPlan(key, plane, data, axes[len(plane) :], stats, cached)

    def cached(self, image: Any, lm: LoadedModel, channel: int | None, position: Any, depth: int) -> PlaneResult | None:
        """The cached result of the plane at ``position`` when it holds ``depth``, else None (nothing to show)."""
        plane = self.plane(image, lm, channel, position)[1]
        res = self.cache.get(self.key(image, lm, plane, channel))
        return res if res is not None and depth in res.probs else None
