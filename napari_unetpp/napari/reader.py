"""napari reader and writer for CT volumes and OME-Zarr: a DICOM series folder, a DICOM file or a NIfTI file opens as
one volume with its voxel spacing as the layer's scale; an OME-Zarr image opens lazily (its finest level) with its
pixel size and unit, so the Segment widget resamples it to the model's pixel size; a Labels layer saves to NIfTI over
the geometry of the image it came from. TIFF and other formats are left to napari's own readers (this reader
declines them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_unetpp.errors import UserError
from napari_unetpp.io.ct import is_ct_path

LayerData = tuple[Any, dict[str, Any], str]
MAX_LABEL_VALUES = 256


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader hook: a function for CT and OME-Zarr paths, None for anything else (so other readers take it)."""
    from napari_unetpp.io.zarr import is_zarr_path

    paths = [path] if isinstance(path, str) else list(path)
    if len(paths) != 1 or not (is_ct_path(paths[0]) or is_zarr_path(paths[0])):
        return None
    return read_layers


def read_layers(path: str | list[str]) -> list[LayerData]:
    """The volume as one layer: an image in Hounsfield units with its first window as contrast limits, or a labels
    layer when the file holds a few integer values (an organ mask)."""
    from napari_unetpp.io.images import read_image

    p = Path(path if isinstance(path, str) else path[0])
    try:
        img = read_image(p)
    except UserError as exc:
        raise ValueError(str(exc)) from None  # napari shows the sentence in its notification
    data = img.data
    name = p.name[: -len(".nii.gz")] if p.name.lower().endswith(".nii.gz") else p.stem if p.is_file() else p.name
    scale = tuple(img.scale.get(a, 1.0) for a in img.axes)
    meta = {"unetpp_geometry": img.geometry, "unetpp_windows": img.windows, "source": str(p), **img.metadata}
    kw: dict[str, Any] = {"name": name, "scale": scale, "metadata": meta, "units": img.units or None}
    if img.metadata.get("format", "").startswith(("OME-Zarr", "zarr")):  # lazy: never read whole to guess
        name = p.name[: -len(".zarr")] if p.name.lower().endswith(".zarr") else p.name
        kw["name"] = name
        if "C" in img.axes:
            kw["channel_axis"] = img.axes.index("C")
            kw["scale"] = tuple(s for s, a in zip(scale, img.axes) if a != "C")
            kw["units"] = img.units or None
        labels = data.dtype.kind in "iub" and any(t in name.lower() for t in ("mask", "label", "object"))
        return [(data, {**kw, "opacity": 0.5} if labels else kw, "labels" if labels else "image")]
    if _looks_like_labels(data):
        return [(data, {**kw, "opacity": 0.5}, "labels")]
    window = img.windows[0] if img.windows else None
    if window is None and meta.get("Modality", "CT") == "CT" and data.min() < -500:  # HU without a window of its own
        from napari_unetpp.data.windows import WINDOWS

        window = WINDOWS["soft-tissue"]
    if window is not None:
        kw["contrast_limits"] = (window.low, window.high)
        meta["unetpp_window"] = window.describe()
    return [(data, {**kw, "colormap": "gray"}, "image")]


def _looks_like_labels(data: np.ndarray) -> bool:
    if data.dtype.kind not in "iub" or data.min() < 0:
        return False
    return len(np.unique(data[:: max(1, data.shape[0] // 8)])) <= MAX_LABEL_VALUES and int(data.max()) < 2**16


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 writer hook: a Labels layer to ``.nii``/``.nii.gz``. A layer made from a CT image (by this plugin's
    reader, sample or Segment widget) is written over that image's grid, so it overlays the scan in any viewer;
    any other layer gets a diagonal affine from its scale."""
    from napari_unetpp.io.images import write_image

    arr = np.asarray(data)
    geometry = (meta.get("metadata") or {}).get("unetpp_geometry")
    if geometry is not None and tuple(arr.shape) != geometry.shape:
        geometry = None
    scale = meta.get("scale")
    spacing = dict(zip("ZYX", [float(s) for s in scale][-3:])) if scale is not None and arr.ndim == 3 else None
    if arr.max(initial=0) <= 255:
        arr = arr.astype(np.uint8)
    elif arr.max(initial=0) < 2**16:
        arr = arr.astype(np.uint16)
    return [str(write_image(path, arr, scale=spacing, geometry=geometry))]
