"""Image input and output with axes and pixel size; outputs are written atomically (no partial files).

One reader for every format: TIFF here, and CT volumes (a DICOM series folder, a DICOM file, NIfTI) through
:mod:`napari_unetpp.io.ct`, which keeps their geometry so outputs overlay the input. The output format follows the
output path's extension (``.tif``/``.tiff``, ``.nii``/``.nii.gz``), whatever the input's."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from napari_unetpp.data.axes import guess_axes
from napari_unetpp.data.scale import short_unit
from napari_unetpp.errors import ReadError
from napari_unetpp.io.nifti import is_nifti_name, nifti_image, nifti_suffix, save_nifti
from napari_unetpp.paths import move_all_into_place, partial_beside, remove_partial, usual_mode

__all__ = ["ImageData", "read_image", "write_image", "write_images", "ReadError", "OUTPUT_SUFFIXES", "output_kind"]

OUTPUT_SUFFIXES = (".tif", ".tiff", ".nii", ".nii.gz", ".zarr")

# tifffile series axes -> ours (TCZYX); I and Q (image sequence, unknown) are read as Z, S (samples) as C
_AXIS_MAP = {"T": "T", "C": "C", "S": "C", "Z": "Z", "Y": "Y", "X": "X", "I": "Z", "Q": "Z"}


@dataclass
class ImageData:
    """An image read from disk.

    Attributes:
        data: numpy array, read-only memmap (uncompressed TIFFs are memory-mapped, not loaded) or dask array
            (OME-Zarr: read chunk by chunk).
        axes: Letters from TCZYX, one per dimension.
        scale: Pixel size per axis letter when the file records it (e.g. ``{"Z": 0.05, "Y": 0.004}``).
        units: Unit of ``scale`` when known: ``"um"``, ``"nm"`` or ``"mm"`` (CT volumes); ``""`` when the file
            does not say.
        geometry: For CT volumes, the :class:`~napari_unetpp.io.geometry.Geometry` that maps outputs back to the
            file's voxel order and affine.
        windows: The DICOM file's own Hounsfield windows (:class:`~napari_unetpp.data.windows.Window`), if any.
        metadata: What the file says about itself (modality, series description, orientation ...).
    """

    data: Any
    axes: str
    scale: dict[str, float] = field(default_factory=dict)
    units: str = ""
    geometry: Any = None
    windows: list[Any] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def read_image(path: str | os.PathLike[str]) -> ImageData:
    """Read an image with its axes and pixel size: a TIFF (memory-mapped when possible), an OME-Zarr image (the
    finest resolution level, as a lazy dask array), or a CT volume (a DICOM series folder, a DICOM file,
    ``.nii``/``.nii.gz``) as a ``ZYX`` array in the canonical orientation of :mod:`napari_unetpp.io.geometry`, in
    Hounsfield units, with its spacing in mm and its geometry.

    Raises:
        ReadError: the file is missing or not readable (one sentence naming the file and what to do).
    """
    p = Path(path)
    from napari_unetpp.io.ct import is_ct_path
    from napari_unetpp.io.zarr import is_zarr_path, read_ome_zarr

    if is_zarr_path(p):
        z = read_ome_zarr(p)
        return ImageData(z[0], z[1], z[2], z[3], metadata=z[4])
    if p.exists() and is_ct_path(p) or is_nifti_name(p):
        return _read_ct(p)
    if p.is_dir():
        raise ReadError(f"{p}: a folder without DICOM files; give an image file or a DICOM series folder.")
    if not p.is_file():
        raise ReadError(f"{p}: no such file.")
    try:
        with tifffile.TiffFile(p) as tf:
            series = tf.series[0]
            raw_axes = series.axes
            scale, units = _scale(tf, raw_axes)
        data: Any
        try:
            data = tifffile.memmap(p, mode="r")
        except (ValueError, OSError, tifffile.TiffFileError):
            data = tifffile.imread(p)
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError) as exc:
        raise ReadError(f"{p}: not a readable TIFF image ({exc}).") from None
    axes = "".join(_AXIS_MAP.get(a, "?") for a in raw_axes)
    data = _squeeze_to(data, series.shape)
    if "?" in axes or len(set(axes)) != len(axes) or len(axes) != data.ndim:
        data = np.squeeze(data) if data.ndim > 2 else data
        axes = guess_axes(data.shape)
    scale = {k: v for k, v in scale.items() if k in axes}
    return ImageData(data, axes, scale, units if scale else "")


def _read_ct(p: Path) -> ImageData:
    from napari_unetpp.io.ct import read_ct

    vol = read_ct(p)
    return ImageData(vol.data, "ZYX", vol.spacing, "mm", vol.geometry, vol.windows, vol.metadata)


def output_kind(path: str | os.PathLike[str]) -> str:
    """``"tiff"``, ``"nifti"`` or ``"zarr"`` from the output path's extension.

    Raises:
        ValueError: another extension (the message lists the ones that work).
    """
    if is_nifti_name(path):
        return "nifti"
    if Path(path).name.lower().rstrip("/").endswith(".zarr"):
        return "zarr"
    if Path(path).name.lower().endswith((".tif", ".tiff")):
        return "tiff"
    raise ValueError(f"the output {path} must end in {', '.join(OUTPUT_SUFFIXES)}.")


def _squeeze_to(data: Any, shape: tuple[int, ...]) -> Any:
    return data.reshape(shape) if tuple(data.shape) != tuple(shape) and data.size == int(np.prod(shape)) else data


def _scale(tf: tifffile.TiffFile, raw_axes: str) -> tuple[dict[str, float], str]:
    """Pixel size per axis letter and its unit (``""`` when the file does not name one)."""
    out: dict[str, float] = {}
    unit = ""
    try:
        page = tf.pages[0]
        tags = page.tags  # type: ignore[union-attr]  # a TiffFrame has none: caught below
        for tag, ax in (("XResolution", "X"), ("YResolution", "Y")):
            if tag in tags:
                num, den = tags[tag].value
                if num:
                    out[ax] = den / num
        ij = tf.imagej_metadata or {}
        if "spacing" in ij:
            out["Z"] = float(ij["spacing"])
        if ij.get("unit"):
            unit = short_unit(ij["unit"])
        elif "ResolutionUnit" in tags and int(tags["ResolutionUnit"].value) == 3 and out:  # pixels per cm
            out = {a: v * 1e4 for a, v in out.items()}
            unit = "um"
    except Exception:  # metadata is a nicety; never fail a read over it
        return {}, ""
    if out.get("X") == 1.0 and out.get("Y") == 1.0 and "Z" not in out:
        return {}, ""
    return out, unit


def write_image(
    path: str | os.PathLike[str],
    data: np.ndarray,
    axes: str | None = None,
    scale: dict[str, float] | None = None,
    geometry: Any = None,
    units: str = "",
) -> Path:
    """Write ``data`` atomically: to a partial file beside ``path``, moved into place when complete (see
    :func:`write_images`).

    Args:
        path: Target path (its folder must exist); ``.tif``/``.tiff`` writes a TIFF, ``.nii``/``.nii.gz`` NIfTI,
            ``.zarr`` an OME-Zarr image (NGFF 0.4).
        data: The array (uint8/uint16/float16/float32 ...).
        axes: Axis letters recorded in a TIFF's metadata.
        scale: Pixel size per axis letter (TIFF: X/Y stored as resolution; NIfTI: the voxel size when there is no
            geometry).
        geometry: NIfTI only: the input's :class:`~napari_unetpp.io.geometry.Geometry`, so a ``ZYX`` (or ``CZYX``)
            array is written in the input's voxel order with its affine.
        units: Unit of ``scale`` (``"um"``, ``"nm"``, ``"mm"``), recorded in OME-Zarr metadata.
    """
    return write_images([(path, data, axes, scale)], geometry=geometry, units=units)[0]


def write_images(
    outputs: Sequence[tuple[str | os.PathLike[str], np.ndarray, str | None, dict[str, float] | None]],
    geometry: Any = None,
    units: str = "",
) -> list[Path]:
    """Write several images as one unit: all to partial files beside their targets first
    (:func:`~napari_unetpp.paths.partial_beside`), then all moved into place together
    (:func:`~napari_unetpp.paths.move_all_into_place`, Ctrl-C held off, so the moves are not split).

    If any write fails (disk full, Ctrl-C), every partial file is removed and no target is touched: files the user
    had at those paths stay as they were. Outputs get the permissions a plain ``open()`` gives (a replaced file keeps
    its own), not the partial files' private ones.

    Args:
        outputs: ``(path, data, axes, scale)`` per file, as for :func:`write_image`.
        geometry: As for :func:`write_image`; used by the NIfTI outputs.
        units: As for :func:`write_image`; used by the OME-Zarr outputs.

    Returns:
        The written paths.
    """
    partials: list[Path] = []
    zarrs: list[Any] = []
    moves: list[tuple[Path, Path]] = []
    try:
        for path, data, axes, scale in outputs:
            p = Path(path)
            kind = output_kind(p)
            if kind == "zarr":
                zarrs.append(_zarr_image(p, data, axes, scale, units))
                moves += zarrs[-1].moves()
                continue
            # .<name>.<random>.partial, and .partial.nii(.gz) for NIfTI (nibabel compresses by the name's ending)
            partials.append(partial_beside(p, nifti_suffix(p) if kind == "nifti" else ""))
            if kind == "nifti":
                save_nifti(nifti_image(data, geometry, scale), partials[-1])
            else:
                _write_tiff(partials[-1], data, axes, scale)
            with contextlib.suppress(OSError):  # a file system without permissions
                os.chmod(partials[-1], usual_mode(p))
            moves.append((partials[-1], p))
        move_all_into_place(moves)
    except BaseException:
        for tmp in partials:
            remove_partial(tmp)  # those not moved yet
        for z in zarrs:
            z.discard()
        raise
    for z in zarrs:
        z.discard()  # the emptied temporary folders
    return [Path(path) for path, *_ in outputs]


def _zarr_image(p: Path, data: Any, axes: str | None, scale: dict[str, float] | None, units: str) -> Any:
    """An OME-Zarr image of ``data`` in a temporary folder, not yet moved into place (see
    :class:`~napari_unetpp.io.zarr.OmeZarrOutputs`)."""
    from napari_unetpp.io.zarr import OmeZarrOutputs

    arr = np.asarray(data)
    ax = axes if axes and len(axes) == arr.ndim else guess_axes(arr.shape)
    out = OmeZarrOutputs(p, ax, scale, units)
    try:
        out(arr.shape, arr.dtype.str, "mask").target[...] = arr
    except BaseException:
        out.discard()
        raise
    return out


def _write_tiff(tmp: Path, data: np.ndarray, axes: str | None, scale: dict[str, float] | None) -> None:
    kw: dict[str, Any] = {"metadata": {"axes": axes} if axes else None, "photometric": "minisblack"}
    if scale and "X" in scale and "Y" in scale:
        kw["resolution"] = (1.0 / scale["X"], 1.0 / scale["Y"])
    tifffile.imwrite(tmp, np.asarray(data), **kw)
