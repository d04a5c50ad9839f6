"""Pixel size: bring the input to the scale the model was trained at, and the result back.

A model card records the pixel size of its training data (``training.spacing`` per axis letter, in
``training.spacing_unit``) and, for object models, the typical object diameter in its pixels
(``training.object_diameter``). :func:`zoom_for` turns what is known about the input (its pixel size from the file
or the napari layer, or an object diameter the user measured, as in cellpose) into one zoom factor per spatial axis:
the input is resampled by it before the network and the outputs are resampled back
(:func:`~napari_unetpp.inference.predict.predict_iter` ``zoom=``). When a model is applied as it is, without
resampling, :func:`spacing_note` says so in one sentence if the input's pixel size is far from the training data's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_unetpp.errors import InputError

__all__ = [
    "zoom_for",
    "ZOOM_TOLERANCE",
    "MAX_ZOOM",
    "ZoomError",
    "check_zoom_fits",
    "to_um",
    "short_unit",
    "NGFF_UNITS",
    "resize_plane",
    "zoomed_shape",
    "spacing_note",
    "SPACING_TOLERANCE",
]

# factors within this of 1 are not worth a resampling (it costs time and blurs)
ZOOM_TOLERANCE = 0.1
# :func:`zoom_for` resamples by at most this factor either way: farther means a wrong pixel size or the wrong model
# (a CT volume in mm given to an EM model trained at 4 nm asked for a zoom of 175,000)
MAX_ZOOM = 8.0
_NO_RESCALE = "segment it as it is with --no-rescale (API: rescale=False)"


class ZoomError(InputError):
    """Resampling to the model's pixel size is refused: too far (beyond :data:`MAX_ZOOM`) or too large for memory."""


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
    max_zoom: float | None = MAX_ZOOM,
) -> tuple[tuple[float, ...] | None, str]:
    """Zoom factors per spatial axis that bring the input to the model's scale, and a sentence saying why.

    Args:
        card: The model's :class:`~napari_unetpp.model.registry.ModelCard`.
        spatial: The model's spatial axes (``"YX"`` or ``"ZYX"``).
        pixel_size: The input's pixel size per axis letter (from the file, the layer, or ``--pixel-size``).
        units: Unit of ``pixel_size`` (``"um"``, ``"nm"``, ``"mm"``); ``""``: the same unit as the card's.
        diameter: Typical object diameter in the input's pixels (takes precedence over ``pixel_size``).
        max_zoom: The farthest resampling either way (default :data:`MAX_ZOOM`, 8x); None: no bound.

    Returns:
        ``(None, "")`` when nothing is to be done (factors within :data:`ZOOM_TOLERANCE` of 1, or the card or the
        input does not say), ``(None, reason)`` when the units cannot be compared, else ``(factors, reason)``; a
        factor above 1 enlarges the input.

    Raises:
        ZoomError: a factor beyond ``max_zoom`` either way (the message names both pixel sizes, or diameters, and
            what to do).
        ValueError: a diameter or pixel size of 0 or less, or a diameter for a model that records none.
    """
    model = getattr(card, "id", "this model")
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
        if _too_far(factors, max_zoom):
            raise ZoomError(
                f"objects of {diameter:g} px would be resampled {_times(f)} to {model}'s {float(trained):g} px, "
                f"beyond the {max_zoom:g}x this tool resamples by; give the objects' diameter in the image's pixels "
                f"(--diameter; API: diameter=), or {_NO_RESCALE}."
            )
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
    if _too_far(factors, max_zoom):
        axes = [a for a in spatial if a in pixel_size and a in trained_px]
        mine = " x ".join(f"{pixel_size[a]:.3g}" for a in axes) + f" {units or t_unit or '(unitless)'}"
        theirs = " x ".join(f"{trained_px[a]:.3g}" for a in axes) + f" {t_unit or units or '(unitless)'}"
        worst = max(factors, key=lambda f: max(f, 1 / f))
        in_unit = t_unit or "the model's unit"
        raise ZoomError(
            f"the image's pixel size ({mine}, {''.join(axes)}) is {_times(worst)} {model}'s ({theirs}), beyond the "
            f"{max_zoom:g}x this tool resamples by; if the image's pixel size is wrong give the right one in "
            f"{in_unit} with --pixel-size (API: pixel_size=), use a model made "
            f"for this pixel size (`napari-unetpp models` lists them), or {_NO_RESCALE}."
        )
    u = f" {t_unit}" if t_unit else ""
    why = "pixels of " + " x ".join(
        f"{pixel_size[a] * (to_um(1, units) or 1) / (to_um(1, t_unit) or 1):.3g}" for a in spatial if a in pixel_size
    )
    why += f"{u} resampled to the model's " + " x ".join(f"{trained_px[a]:.3g}" for a in spatial if a in trained_px)
    return _worth(factors, why + u)


def _too_far(factors: Sequence[float], max_zoom: float | None) -> bool:
    return max_zoom is not None and any(not 1.0 / max_zoom <= f <= max_zoom for f in factors)


def _times(f: float) -> str:
    """``250000x the size of`` / ``1/40 the size of``: how far a factor is, for people."""
    return f"{f:,.3g}x the size of" if f >= 1 else f"1/{1 / f:,.3g} the size of"


def check_zoom_fits(
    shape: Sequence[int], factors: Sequence[float], bytes_per_voxel: float, available: int | None = None
) -> None:
    """Refuse, before allocating, a resampled image (and what is computed on it) that would not fit in memory.

    Args:
        shape: Voxels of the image without its spatial axes' zoom: ``(*loop, *spatial)`` (channels folded into
            ``bytes_per_voxel``).
        factors: Zoom per spatial axis (the trailing ``len(factors)`` axes of ``shape``).
        bytes_per_voxel: Bytes held per resampled voxel (the image's channels and the outputs computed on it).
        available: Free memory in bytes (default: what the system reports; unknown means no check).

    Raises:
        ZoomError: it needs more than the free memory (the message says how much, and what to do).
    """
    n_sp = len(factors)
    zshape = (*(int(n) for n in shape[: len(shape) - n_sp]), *zoomed_shape(shape[len(shape) - n_sp :], factors))
    need = float(np.prod(np.asarray(zshape, dtype=np.float64))) * float(bytes_per_voxel)
    free = available_memory() if available is None else available
    if free is not None and need > free:
        raise ZoomError(
            f"resampling to the model's pixel size (zoom {' x '.join(f'{f:.3g}' for f in factors)}, "
            f"{' x '.join(map(str, zshape))} voxels) needs about {_bytes(need)} and {_bytes(free)} is free; "
            f"crop the image, give its true pixel size with --pixel-size (API: pixel_size=), or {_NO_RESCALE}."
        )


def available_memory() -> int | None:
    """Bytes of memory available for new allocations (psutil's ``available``, else Linux's ``MemAvailable``, which
    counts the page cache that can be dropped, as psutil does), or None when the system does not say (then nothing
    is refused)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # not installed, or an unusual platform
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


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


# a model applied as it is (no resampling): say when the input's pixel size is far from the training data's
SPACING_TOLERANCE = 0.25


def spacing_note(
    trained: dict[str, float] | None,
    given: dict[str, float],
    units: str = "",
    axes: str = "YX",
    trained_units: str | None = None,
) -> str | None:
    """One sentence when the input's pixel size along ``axes`` (in-plane for 2D models; ``"ZYX"`` for 3D ones)
    differs from the training data's by more than 25 % (predictions do not resample), else None. Either side
    unknown: None.

    Args:
        trained: The model's training pixel size per axis (in ``trained_units``).
        given: The input's pixel size per axis (in ``units``).
        units: The input's unit (``""``: unknown, taken to be the model's).
        axes: The axes to compare.
        trained_units: The model's unit (None: the same as ``units``); both lengths: compared in one unit.
    """
    if not trained or not given:
        return None
    t_unit = units if trained_units is None else trained_units
    g_um, t_um = to_um(1.0, units), to_um(1.0, t_unit)
    f = g_um / t_um if g_um is not None and t_um is not None else 1.0  # input units -> model units
    far = [a for a in axes if a in trained and a in given and abs(given[a] * f / trained[a] - 1) > SPACING_TOLERANCE]
    if not far:
        return None
    u, tu = (f" {units}" if units else ""), (f" {t_unit}" if t_unit else "")
    a = far[0]
    return (
        f"this model was trained on {trained[a]:.3g}{tu} pixels and the input has {given[a]:.3g}{u} (axis {a}); "
        "it is applied without resampling, so objects look "
        + ("larger" if given[a] * f < trained[a] else "smaller")
        + " to it than in training: resample the image to the model's pixel size for the best result."
    )
