"""The Segment widget's result layers: written plane by plane, in place (a layer that exists gets its data set,
else it is added), named so a user can read them (``image [UNet++ mask]``, ``image [UNet++ L2]``), found by the
image layer's identity (never by name), and never overwritten once the user painted on them."""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
from napari.utils.notifications import show_info

from napari_unetpp.napari.events import WeakHandler
from napari_unetpp.napari.segment.controller import pixels, result_shape
from napari_unetpp.napari.segment.shown import Shown, layer_name

__all__ = ["ResultLayers", "blank", "unproxied"]


def blank(shape: tuple[int, ...], dtype: Any, like: Any) -> np.ndarray:
    """Zeros for a result layer: in memory when the image is an in-memory array, else (dask, zarr, pyramids)
    a memory map on an anonymous temporary file, so results of stacks larger than memory do not fill it."""
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dtype)
    return np.memmap(tempfile.TemporaryFile(prefix="napari-unetpp-"), dtype=dtype, mode="w+", shape=shape)


def unproxied(layer: Any) -> Any:
    """The layer behind napari's proxy (a plugin's viewer hands out proxies of the layers it adds, which are never
    ``is`` the layers in ``viewer.layers``)."""
    return getattr(layer, "__wrapped__", layer)


class ResultLayers:
    """The result layers one Segment widget writes into ``viewer``, per image layer and tag.

    Args:
        viewer: The napari viewer.
    """

    def __init__(self, viewer: Any) -> None:
        self._viewer = viewer
        self._results: dict[tuple[Any, str], Any] = {}  # (image layer, tag) -> the result layer we write
        self._edited: set[Any] = set()  # mask layers the user painted on
        self._next_label: dict[Any, int] = {}  # mask layer -> next free object id (unique across the stack)

    def get(self, image: Any, tag: str = "mask") -> Any:
        """The result layer (``"mask"``, ``"L2"``, ``"ensemble"``, ``"disagreement"``) written for the image layer
        ``image``, or None. Found by the layer's identity, never its name: the results of a closed ``a.tif`` are
        never written for another ``a.tif``."""
        layer = self._results.get((image.unique_id, tag))
        return layer if layer is not None and layer in self._viewer.layers else None

    def is_edited(self, layer: Any) -> bool:
        """Whether the user painted on ``layer`` (it is theirs then, and never written again)."""
        return layer.unique_id in self._edited

    def forget(self, present: set[Any]) -> None:
        """Drop the links of image and result layers not in ``present`` (unique ids): the result layers of a removed
        image stay in the viewer, the user's now, and are never written again."""
        self._results = {k: v for k, v in self._results.items() if k[0] in present and v.unique_id in present}
        self._edited &= present
        self._next_label = {k: v for k, v in self._next_label.items() if k in present}

    def forget_image(self, uid: Any) -> None:
        """The image's data changed shape: its next results go to new layers (the old ones stay as they are)."""
        gone = {v.unique_id for k, v in self._results.items() if k[0] == uid}
        self._results = {k: v for k, v in self._results.items() if k[0] != uid}
        self._next_label = {k: v for k, v in self._next_label.items() if k not in gone}

    def free_name(self, image: str, tag: str) -> str:
        """``"<image> [UNet++ <tag>]"``, or ``<tag> 2``, ``<tag> 3`` ... when a layer has that name (the user's edited
        mask, or the results of a closed image of the same name)."""
        name, n = layer_name(image, tag), 2
        while name in self._viewer.layers:
            name, n = layer_name(image, f"{tag} {n}"), n + 1
        return name

    def write(self, image: Any, plane: tuple[int, ...], shown: Shown, lead: int = 0) -> None:
        """Write one plane into its result layer (made when missing), and redraw it if it is on screen.

        Args:
            image: The image layer the result is of.
            plane: Index of the plane over the non-spatial axes.
            shown: The plane and its layer's tag and style.
            lead: 1 when a channel of the image's first axis was segmented (that axis is not in the results).
        """
        values = shown.values
        dtype = values.dtype if shown.labels else np.float16
        layer = self._layer_for(image, shown, dtype, lead)
        if shown.labels and values.dtype == np.uint32 and values.any():  # objects: ids unique across the whole stack
            start = self._next_label.get(layer.unique_id, 0)
            values = np.where(values > 0, values + np.uint32(start), 0).astype(np.uint32)
            self._next_label[layer.unique_id] = int(values.max())
        layer.data[plane] = values
        if self.on_screen(layer, plane):  # planes off screen are read when the user moves there
            layer.refresh()

    def on_screen(self, layer: Any, plane: tuple[int, ...]) -> bool:
        """Whether ``plane`` of ``layer`` is what the viewer shows now (always, in 3D display). A whole-stack run
        refreshed the layer for every finished plane; re-slicing for planes nobody sees cost 0.1 s each."""
        if not plane or self._viewer.dims.ndisplay == 3:
            return True
        try:
            point = layer.world_to_data(self._viewer.dims.point)
        except Exception:  # pragma: no cover - napari API drift: refresh, as before
            return True
        return tuple(int(round(float(v))) for v in list(point)[: len(plane)]) == tuple(plane)

    def _layer_for(self, image: Any, shown: Shown, dtype: Any, lead: int) -> Any:
        shape = result_shape(image, lead)
        geo = {
            "scale": tuple(image.scale)[lead:][: len(shape)],
            "translate": tuple(image.translate)[lead:][: len(shape)],
            # a CT image's geometry travels with its results, so a mask saved to NIfTI overlays the scan
            "metadata": {k: v for k, v in image.metadata.items() if k == "unetpp_geometry"},
        }
        tag = shown.tag
        layer = self.get(image, tag)
        if layer is not None and tuple(layer.data.shape) != shape:
            layer = None  # a result of the whole layer, and now of one channel (or back): a layer of its own
        if shown.labels:
            if layer is not None and self.is_edited(layer):
                name = self.free_name(image.name, tag)
                show_info(f"'{layer.name}' has your edits and is kept; the new result is in '{name}'.")
                layer = None
            if layer is None:
                layer = self._viewer.add_labels(
                    blank(shape, dtype, pixels(image)), name=self.free_name(image.name, tag), opacity=0.5, **geo
                )
                layer = unproxied(layer)
                layer.events.paint.connect(WeakHandler(self, "_on_mask_painted", layer.unique_id))
                self._results[(image.unique_id, tag)] = layer
            elif layer.data.dtype != dtype and np.dtype(dtype).itemsize > layer.data.dtype.itemsize:
                layer.data = layer.data.astype(dtype)
            return layer
        if layer is not None:
            return layer
        layer = self._viewer.add_image(
            blank(shape, np.float16, pixels(image)),
            name=self.free_name(image.name, tag),
            colormap=shown.style.get("colormap", "magma"),
            blending="additive",
            opacity=0.5,
            contrast_limits=shown.style.get("contrast", (0, 1)),
            visible=shown.visible,
            **geo,
        )
        layer = unproxied(layer)
        self._results[(image.unique_id, tag)] = layer
        return layer

    def _on_mask_painted(self, uid: Any, event: Any) -> None:
        """The user painted on one of our mask layers: it is theirs now, and never overwritten."""
        self._edited.add(uid)
