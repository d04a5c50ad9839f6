"""The training pair the Fine-tune widget hands to :func:`~napari_unetpp.training.fine_tune_iter`: the image layer's
pixels (lazy stays lazy), a snapshot of the corrected labels, which slices count as ground truth, the pixels the user
changed, and the layer's pixel size. No Qt: layers are anything with napari's attributes."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_unetpp.data.axes import first_axis_channel
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.napari.finetune.edits import EditTracker
from napari_unetpp.napari.pixel_size import layer_pixel_size
from napari_unetpp.napari.segment.controller import image_axes, pixels
from napari_unetpp.training import TrainingPair, parse_slices

__all__ = ["TRUTH", "layer_spacing", "training_pair"]

TRUTH = ("edited slices", "listed slices", "all slices")


def layer_spacing(image: Any, axes: str, lead: int = 0) -> tuple[dict[str, float] | None, str]:
    """The pixel size the Segment widget reads from the layer (:func:`~napari_unetpp.napari.pixel_size.
    layer_pixel_size`, after its ``lead`` axes: a channel segmented on its own), for the card, and its unit; None
    for napari's default scale of ones in pixels (the layer says nothing: the base's pixel size stays)."""
    spacing, unit = layer_pixel_size(image, axes, lead)
    if not spacing or (not unit and all(abs(s - 1.0) <= 1e-9 for s in spacing.values())):
        return None, ""
    return spacing, unit


def training_pair(
    image: Any,
    labels: Any,
    base: LoadedModel,
    truth: str = TRUTH[0],
    listed: str = "",
    edits: EditTracker | None = None,
    channel: int | None = None,
) -> TrainingPair:
    """The pair to fine-tune ``base`` on.

    Args:
        image: The image layer (or None).
        labels: The labels layer with the user's corrections (or None).
        base: The model to fine-tune (its spatial dimensions read the image).
        truth: Which slices are ground truth: one of :data:`TRUTH`.
        listed: For ``"listed slices"``: e.g. ``"3, 7, 10-12"``.
        edits: The edits followed on the labels layer (for ``"edited slices"``).
        channel: The channel of the image's first axis the Segment widget segments (its masks lack that axis).

    Raises:
        ValueError: no image or labels, shapes that do not match, no edited or listed slices (one sentence).
    """
    if image is None or labels is None:
        raise ValueError("Choose an image and the labels layer with your corrections.")
    dims = base.module.config.spatial_dims
    axes = image_axes(image, dims)
    data = pixels(image)  # lazy (dask, zarr) stays lazy: the worker reads the slices it trains on
    shape = tuple(data.shape[:-1]) if image.rgb else tuple(data.shape)
    lead = 0  # leading axes of the layer that are not in the pair (its scale and units are not theirs)
    if channel is not None and tuple(labels.data.shape) == shape[1:]:
        # a mask the Segment widget made from one channel of the first axis: train on that channel
        data, axes = first_axis_channel(data, dims, channel)
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
    slices: Any
    if truth == "edited slices":
        ed = edits.edited_slices(labels) if edits is not None else []
        if not ed:
            raise ValueError(
                "No edited slices: correct some slices with the paint tools first, or choose "
                "'listed slices' or 'all slices'."
            )
        slices = "all" if ed == [()] else list(ed)
        focus = edits.focus(labels, ed) if edits is not None else None
    elif truth == "listed slices":
        slices = parse_slices(listed)
        if slices is None:
            raise ValueError("List the corrected slices, e.g. 3, 7, 10-12.")
    else:
        slices = "all"
    spacing, unit = layer_spacing(image, axes, lead)
    return TrainingPair(
        data,
        lab,
        axes=axes,
        slices=slices,
        known=None,
        focus=focus,
        name=f"{image.name} / {labels.name}",
        spacing=spacing,
        spacing_unit=unit,
    )
