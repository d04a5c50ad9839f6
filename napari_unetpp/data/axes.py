"""Axes: which letter each dimension of an image is (T, C, Z, Y, X), and how an image maps onto a model.

A 2D model runs plane by plane over every axis but Y, X and C; a 3D model runs on Z, Y, X volumes for every T.
:func:`layout` checks an image against a model's spatial dimensions and gives the transposed view that prediction and
fine-tuning read: loop axes first, then the channel, then the spatial axes. The widgets use :func:`layer_axes` for
napari layers, and :func:`first_axis_channel` for the channel of a layer's first axis that they segment and train on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from napari_unetpp.errors import InputError

__all__ = [
    "AXES_LETTERS",
    "Layout",
    "check_axes",
    "first_axis_channel",
    "fit_channels",
    "guess_axes",
    "layer_axes",
    "layout",
    "spatial_axes",
]

AXES_LETTERS = "TCZYX"


def spatial_axes(spatial_dims: int) -> str:
    """``"YX"`` for 2D models, ``"ZYX"`` for 3D models."""
    return "ZYX" if spatial_dims == 3 else "YX"


def guess_axes(shape: Sequence[int], spatial_dims: int = 2) -> str:
    """Axes for an array without an explicit description: YX, ZYX, YXC (RGB) or TZYX.

    Raises:
        InputError: when the guess would be ambiguous (5-D, or 4-D with channels).
    """
    nd = len(shape)
    if nd == 2:
        return "YX"
    if nd == 3:
        return "YXC" if shape[-1] in (3, 4) and spatial_dims == 2 and shape[0] > 4 else "ZYX"
    if nd == 4:
        return "TZYX"
    raise InputError(f"cannot guess the axes of a {nd}-D image of shape {tuple(shape)}; pass axes such as 'TCZYX'.")


def check_axes(axes: str, shape: Sequence[int], spatial_dims: int) -> str:
    """Upper-cased ``axes`` after checking them against ``shape`` and the model's spatial dimensions.

    Raises:
        InputError: wrong count, repeated or unknown letters, or a missing spatial axis.
    """
    axes = axes.upper()
    if len(axes) != len(shape):
        raise InputError(f"axes {axes!r} do not match an image with {len(shape)} dimensions {tuple(shape)}.")
    if len(set(axes)) != len(axes) or any(a not in AXES_LETTERS for a in axes):
        raise InputError(f"axes {axes!r} must use each of the letters T, C, Z, Y, X at most once.")
    need = spatial_axes(spatial_dims)
    missing = [a for a in need if a not in axes]
    if missing:
        what = (
            "a 3D model needs a Z axis (a volume)"
            if spatial_dims == 3 and missing == ["Z"]
            else f"the image needs axes {need}"
        )
        raise InputError(f"{what}; this image has axes {axes!r}.")
    return axes


@dataclass
class Layout:
    """How an image's axes map onto the model.

    Attributes:
        axes: The image's axes.
        spatial: ``"YX"`` or ``"ZYX"``.
        loop: Axes looped over (every axis but the spatial ones and C), in the image's order.
        n_ch: Number of channels (1 without a C axis).
        src: The image transposed to (loop..., [C], spatial...): still lazy for memory maps and dask arrays.
    """

    axes: str
    spatial: str
    loop: list[str]
    n_ch: int
    src: Any

    @property
    def has_c(self) -> bool:
        """Whether the image has a channel axis."""
        return "C" in self.axes

    @property
    def out_axes(self) -> str:
        """The image's axes without C: the axes of masks and probabilities."""
        return "".join(a for a in self.axes if a != "C")


def layout(image: Any, axes: str | None, spatial_dims: int) -> Layout:
    """Check ``image`` (with ``axes``, guessed when None) against a model of ``spatial_dims`` and lay it out.

    Raises:
        InputError: bad or ambiguous axes.
    """
    shape = tuple(int(s) for s in image.shape)
    axes = check_axes(axes or guess_axes(shape, spatial_dims), shape, spatial_dims)
    spatial = spatial_axes(spatial_dims)
    loop = [a for a in axes if a not in spatial and a != "C"]
    n_ch = shape[axes.index("C")] if "C" in axes else 1
    order = (
        [axes.index(a) for a in loop] + ([axes.index("C")] if "C" in axes else []) + [axes.index(a) for a in spatial]
    )
    src = image.transpose(order) if order != list(range(len(axes))) else image
    return Layout(axes, spatial, loop, n_ch, src)


#: ITU-R BT.601 luma weights: how an RGB image becomes one grey channel for a 1-channel model.
LUMA = (0.299, 0.587, 0.114)


def fit_channels(
    image: Any, axes: str | None, spatial_dims: int, in_channels: int, channel: int | None = None
) -> tuple[Any, str, str]:
    """The image a model with ``in_channels`` inputs reads, its axes, and a note of what was done (or "").

    - ``channel=N``: channel N of the C axis, as a view (lazy for memory maps and dask arrays), for 1-channel models;
    - no ``channel``, a 1-channel model and an RGB(A) image (C last, 3 or 4 channels): its luminance
      (:data:`LUMA`, float32; alpha ignored);
    - otherwise the image unchanged.

    Raises:
        InputError: bad axes, a channel the image lacks, or a channel choice for a multi-channel model.
    """
    shape = tuple(int(s) for s in image.shape)
    axes = check_axes(axes or guess_axes(shape, spatial_dims), shape, spatial_dims)
    if channel is not None:
        if "C" not in axes:
            raise InputError(f"channel {channel} was asked for, but the image has no channel axis (axes {axes!r}).")
        ci, n = axes.index("C"), shape[axes.index("C")]
        if not 0 <= int(channel) < n:
            raise InputError(f"channel {channel} does not exist: the image has {n} channels (0 to {n - 1}).")
        if in_channels != 1:
            raise InputError(
                f"the model reads {in_channels} channels together; a channel choice is for 1-channel models."
            )
        return image[(slice(None),) * ci + (int(channel),)], axes.replace("C", ""), f"channel {channel} of {n}"
    if in_channels == 1 and axes.endswith("C") and shape[-1] in (3, 4):
        w = [float(x) for x in LUMA]
        grey = image[..., 0] * w[0] + image[..., 1] * w[1] + image[..., 2] * w[2]
        return grey.astype("float32"), axes[:-1], "RGB as grey (luminance)"
    return image, axes, ""


def layer_axes(ndim: int, rgb: bool, spatial_dims: int) -> str:
    """Axes of a napari Image layer's data (``ndim`` dimensions, RGB layers carry a C axis last).

    Raises:
        InputError: fewer than 2 or more than 4 non-channel dimensions, or a 2D image for a 3D model.
    """
    nd = ndim - (1 if rgb else 0)
    base = {2: "YX", 3: "ZYX", 4: "TZYX"}.get(nd)
    if base is None:
        raise InputError(f"the image has {nd} dimensions; UNet++ takes 2 to 4 (YX, ZYX or TZYX).")
    if spatial_dims == 3 and nd < 3:
        raise InputError("this is a 3D model and the image is 2D; pick a volume or a 2D model.")
    return base + ("C" if rgb else "")


def first_axis_channel(data: Any, spatial_dims: int, channel: int) -> tuple[Any, str]:
    """Channel ``channel`` of the first axis of a grey napari layer's ``data`` (its other axes as
    :func:`layer_axes` reads them) and those axes: what a 1-channel model reads of a CZYX stack (2D model) or a
    CTZYX series, as a view (lazy stays lazy). The Segment widget segments it and the Fine-tune widget trains on it.

    Raises:
        InputError: axes the layer cannot have, or a channel it lacks.
    """
    axes = "C" + layer_axes(data.ndim - 1, False, spatial_dims)
    data, axes, _ = fit_channels(data, axes, spatial_dims, 1, int(channel))
    return data, axes
