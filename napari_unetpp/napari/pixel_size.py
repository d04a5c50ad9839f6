"""A napari layer's pixel size, read one way for the Segment widget's resampling and the Fine-tune widget's card
(no Qt: a layer is anything with ``scale`` and ``units``)."""

from __future__ import annotations

from typing import Any

from napari_unetpp.data.scale import short_unit, to_um

__all__ = ["layer_pixel_size"]


def layer_pixel_size(layer: Any, axes: str, lead: int = 0, spatial: str = "ZYX") -> tuple[dict[str, float], str]:
    """The pixel size of ``layer`` along its spatial axes, and their unit.

    napari keeps one scale and one unit per data axis; they are paired with ``axes`` after the first ``lead`` axes
    (1 when one channel of the layer's first axis is segmented: that axis is not in ``axes``, and its scale is no
    Z's). An RGB layer's colour axis has no scale, so ``axes`` may end with a ``C`` that pairs with nothing.

    Args:
        layer: A napari layer (or anything with ``scale`` and ``units`` per data axis).
        axes: Axis letters of the data the model reads (e.g. ``"ZYX"``, ``"YXC"``), without the ``lead`` axes.
        lead: How many leading data axes of the layer are not in ``axes``. Default 0.
        spatial: The axes to report, of ``"ZYX"`` (``"YX"``: a 2D model's plane). Default ``"ZYX"``.

    Returns:
        ``({axis: size}, unit)``: the unit (``"nm"``, ``"um"``, ``"mm"`` ...) when every reported axis is in a
        length unit, the sizes in um when those units differ; ``""`` when one is not a length (pixels, napari's
        default), the sizes then being the layer's bare numbers.
    """
    scale = [float(s) for s in layer.scale][lead:]
    units = [short_unit(u) for u in getattr(layer, "units", ())][lead:]
    size = {a: s for a, s in zip(axes, scale) if a in spatial}
    axis_units = {a: u for a, u in zip(axes, units) if a in spatial}
    found = set(axis_units.values())
    if len(axis_units) != len(size) or "" in found or not found:
        return size, ""
    if len(found) == 1:
        return size, found.pop()
    return {a: float(to_um(s, axis_units[a]) or s) for a, s in size.items()}, "um"
