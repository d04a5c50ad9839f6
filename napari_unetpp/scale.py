"""Pixel size: bring the input to the scale the model was trained at, and the result back.

A model card records the pixel size of its training data (``training.spacing`` per axis letter, in
``training.spacing_unit``) and, for object models, the typical object diameter in its pixels
(``training.object_diameter``). :func:`zoom_for` turns what is known about the input (its pixel size from the file
or the napari layer, or an object diameter the user measured, as in cellpose) into one zoom factor per spatial axis:
the input is resampled by it before the network and the outputs are resampled back
(:func:`~napari_unetpp.prediction.predict_iter` ``zoom=``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["zoom_for", "ZOOM_TOLERANCE", "to_um", "short_unit", "NGFF_UNITS", "resize_plane", "zoomed_shape"]

# factors within this of 1 are not worth a resampling (it costs time and blurs)
ZOOM_TOLERANCE = 0.1
# short unit -> micrometres; the one table of length units (files, napari layers, cards)
_UM = {"nm": 1e-3, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}
# short unit -> its NGFF (UDUNITS-2) name, as OME-Zarr and napari's pint units spell it
NGFF_UNITS = {"nm": "nanometer", "um": "micrometer", "mm": "millimeter", "cm": "centimeter", "m": "meter"}
_SPELLINGS = {
    **{long: short for short, long in NGFF_UNITS.items()},
    "micron": "um",
    "microns": "um",
    "\u00b5m": "um",
}


def short_unit(name: object) -> str:
    """Our short unit (``"nm"``, ``"um"``, ``"mm"``, ``"cm"``, ``"m"``) for any spelling a file or napari uses
    (``micron``, ``\u00b5m``, ``micrometer`` ...), or ``""`` for pixels and units that are not lengths."""
    n = str(name).strip().lower()
    return n if n in _UM else _SPELLINGS.get(n, "")


def to_um(value: float, unit: str) -> float | None:
    """``value`` in ``unit`` (any spelling, see :func:`short_unit`) as micrometres, or None for an unknown unit."""
    f = _UM.get(short_unit(unit))
    return None if f is None else float(value) * f


def zoom_for(
    card: Any,
    spatial: str,
    pixel_size: dict[str, float] | None = None,
    units: str = "",
    diameter: float | None = None,
) -> tuple[tuple[float, ...] | None, str]:
    """Zoom factors per spatial axis that bring the input to the model's scale, and a sentence saying why.

    Args:
        card: The model's :class:`~napari_unetpp.registry.ModelCard`.
        spatial: The model's spatial axes (``"YX"`` or ``"ZYX"``).
        pixel_size: The input's pixel size per axis letter (from the file, the layer, or ``--pixel-size``).
        units: Unit of ``pixel_size`` (``"um"``, ``"nm"``, ``"mm"``); ``""``: the same unit as the card's.
        diameter: Typical object diameter in the input's pixels (takes precedence over ``pixel_size``).

    Returns:
        ``(None, "")`` when nothing is to be done (factors within :data:`ZOOM_TOLERANCE` of 1, or the card or the
        input does not say), ``(None, reason)`` when the units cannot be compared, else ``(factors, reason)``; a
        factor above 1 enlarges the input.

    Raises:
        ValueError: a diameter or pixel size of 0 or less, or a diameter for a model that records none.
    """
    training = getattr(card, "training", {}) or {}
    if diameter is not None:
        if diameter <= 0:
            raise ValueError(f"the object diameter must be positive, got {diameter}.")
        trained = training.get("object_diameter")
        if not trained:
            raise ValueError(
                f"{getattr(card, 'id', 'this model')} records no object diameter; give the pixel size instead."
            )
        f = float(trained) / float(diameter)
        factors = tuple(f if a in "YX" else 1.0 for a in spatial)
        why = f"objects of {diameter:g} px resampled to the model's {float(trained):g} px"
        return _worth(factors, why)
    trained_px = training.get("spacing") or {}
    if not pixel_size or not trained_px:
        return None, ""
    t_unit = str(training.get("spacing_unit", ""))
    factors_l = []
    for a in spatial:
        g, t = pixel_size.get(a), trained_px.get(a)
        if g is None or t is None:
            factors_l.append(1.0)
            continue
        if g <= 0:
            raise ValueError(f"the pixel size must be positive, got {g} along {a}.")
        g_um, t_um = (to_um(g, units), to_um(t, t_unit)) if units and t_unit else (g, t)
        if g_um is None or t_um is None:
            return None, f"pixel size units differ ({units or '?'} vs {t_unit or '?'}); not resampled"
        factors_l.append(float(g_um) / float(t_um))
    factors = tuple(factors_l)
    u = f" {t_unit}" if t_unit else ""
    why = "pixels of " + " x ".join(
        f"{pixel_size[a] * (to_um(1, units) or 1) / (to_um(1, t_unit) or 1):.3g}" for a in spatial if a in pixel_size
    )
    why += f"{u} resampled to the model's " + " x ".join(f"{trained_px[a]:.3g}" for a in spatial if a in trained_px)
    return _worth(factors, why + u)


def _worth(factors: tuple[float, ...], why: str) -> tuple[tuple[float, ...] | None, str]:
    if all(abs(f - 1.0) <= ZOOM_TOLERANCE for f in factors):
        return None, ""
    return factors, f"{why} (zoom {' x '.join(f'{f:.2f}' for f in factors)})"


def zoomed_shape(shape: Sequence[int], factors: Sequence[float]) -> tuple[int, ...]:
    """The spatial shape after zooming by ``factors`` (at least 1 pixel per axis)."""
    return tuple(max(1, int(round(n * f))) for n, f in zip(shape, factors))


def resize_plane(block: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resample the trailing ``len(shape)`` axes of ``block`` to ``shape``: linear (``order=1``, antialiased when
    shrinking) for images and probabilities, nearest (``order=0``) for labels; the dtype is kept."""
    from skimage.transform import resize

    shape = tuple(int(s) for s in shape)
    lead = block.shape[: block.ndim - len(shape)]
    if tuple(block.shape[block.ndim - len(shape) :]) == shape:
        return block
    shrink = any(n > s for n, s in zip(block.shape[block.ndim - len(shape) :], shape))
    flat = block.reshape((-1, *block.shape[len(lead) :]))
    out = np.stack(
        [
            resize(
                p,
                shape,
                order=order,
                preserve_range=True,
                anti_aliasing=bool(order and shrink),
                mode="reflect" if order else "edge",
            ).astype(block.dtype if order == 0 else np.float32, copy=False)
            for p in flat
        ]
    )
    return out.reshape((*lead, *shape)).astype(block.dtype, copy=False)
