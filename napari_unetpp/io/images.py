"""Image input and output with axes and pixel size; outputs are written atomically (no partial files).

One reader for every format: TIFF here, and CT volumes (a DICOM series folder, a DICOM file, NIfTI) through
:mod:`napari_unetpp.io.ct`, which keeps their geometry so outputs overlay the input. The output format follows the
output path's extension (``.tif``/``.tiff``, ``.nii``/``.nii.gz``), whatever the input's."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from napari_unetpp.data.axes import guess_axes
from napari_unetpp.data.scale import short_unit
from napari_unetpp.errors import ReadError
from napari_unetpp.interrupts import ctrl_c_held

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
        geometry: For CT volumes, the :class:`~napari_unetpp.io.ct.Geometry` that maps outputs back to the file's voxel
            order and affine.
        windows: The DICOM file's own Hounsfield windows (:class:`~napari_unetpp.io.ct.Window`), if any.
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
    ``.nii``/``.nii.gz``) as a ``ZYX`` array in the canonical orientation of :mod:`napari_unetpp.io.ct`, in Hounsfield
    units, with its spacing in mm and its geometry.

    Raises:
        ReadError: the file is missing or not readable (one sentence naming the file and what to do).
    """
    p = Path(path)
    from napari_unetpp.io.ct import is_ct_path, is_nifti_name
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
    from napari_unetpp.io.ct import is_nifti_name, read_dicom, read_nifti

    vol = read_nifti(p) if is_nifti_name(p) else read_dicom(p)
    return ImageData(vol.data, "ZYX", vol.spacing, "mm", vol.geometry, vol.windows, vol.metadata)


def output_kind(path: str | os.PathLike[str]) -> str:
    """``"tiff"``, ``"nifti"`` or ``"zarr"`` from the output path's extension.

    Raises:
        ValueError: another extension (the message lists the ones that work).
    """
    from napari_unetpp.io.ct import is_nifti_name

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
    """Write ``data`` atomically: to a temporary file beside ``path``, renamed when complete.

    Args:
        path: Target path (its folder must exist); ``.tif``/``.tiff`` writes a TIFF, ``.nii``/``.nii.gz`` NIfTI,
            ``.zarr`` an OME-Zarr image (NGFF 0.4).
        data: The array (uint8/uint16/float16/float32 ...).
        axes: Axis letters recorded in a TIFF's metadata.
        scale: Pixel size per axis letter (TIFF: X/Y stored as resolution; NIfTI: the voxel size when there is no
            geometry).
        geometry: NIfTI only: the input's :class:`~napari_unetpp.io.ct.Geometry`, so a ``ZYX`` (or ``CZYX``) array is
            written in the input's voxel order with its affine.
        units: Unit of ``scale`` (``"um"``, ``"nm"``, ``"mm"``), recorded in OME-Zarr metadata.
    """
    return write_images([(path, data, axes, scale)], geometry=geometry, units=units)[0]


def write_images(
    outputs: Sequence[tuple[str | os.PathLike[str], np.ndarray, str | None, dict[str, float] | None]],
    geometry: Any = None,
    units: str = "",
) -> list[Path]:
    """Write several images as one unit: all to temporary files first, then all renamed into place.

    If any write fails (disk full, Ctrl-C), every temporary file is removed and no target is touched: files the
    user had at those paths stay as they were. The renames run with Ctrl-C held back, so they are not split.

    Args:
        outputs: ``(path, data, axes, scale)`` per file, as for :func:`write_image`.
        geometry: As for :func:`write_image`; used by the NIfTI outputs.
        units: As for :func:`write_image`; used by the OME-Zarr outputs.

    Returns:
        The written paths.
    """
    from napari_unetpp.io.zarr import OmeZarrOutputs

    temps: list[tuple[Any, Path]] = []
    try:
        for path, data, axes, scale in outputs:
            p = Path(path)
            if output_kind(p) == "zarr":
                temps.append((_write_zarr_temp(p, data, axes, scale, units), p))
            elif output_kind(p) == "nifti":
                from napari_unetpp.io.ct import nifti_image, save_nifti_temp

                temps.append((save_nifti_temp(p, nifti_image(data, geometry, scale)), p))
            else:
                temps.append((_write_temp(p, data, axes, scale), p))
    except BaseException:
        for tmp, _ in temps:
            _remove(tmp)
        raise
    for tmp, p in temps:
        if not isinstance(tmp, OmeZarrOutputs):
            _give_mode(tmp, p)
    with ctrl_c_held():
        for tmp, p in temps:
            if isinstance(tmp, OmeZarrOutputs):
                tmp.publish()
            else:
                os.replace(tmp, p)
    return [p for _, p in temps]


def _remove(tmp: Any) -> None:
    if hasattr(tmp, "discard"):
        tmp.discard()
    else:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _write_zarr_temp(p: Path, data: Any, axes: str | None, scale: dict[str, float] | None, units: str) -> Any:
    """An OME-Zarr image of ``data``, not yet published (see :class:`~napari_unetpp.io.zarr.OmeZarrOutputs`)."""
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


def _give_mode(tmp: str, target: Path) -> None:
    """The permissions a plain ``open()`` would have given (temporary files are private, 0600): the replaced file's
    own, else 0666 less the umask."""
    try:
        mode = os.stat(target).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    with contextlib.suppress(OSError):
        os.chmod(tmp, mode)


def _write_temp(p: Path, data: np.ndarray, axes: str | None, scale: dict[str, float] | None) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".partial", dir=p.parent)
    os.close(fd)
    try:
        kw: dict[str, Any] = {"metadata": {"axes": axes} if axes else None, "photometric": "minisblack"}
        if scale and "X" in scale and "Y" in scale:
            kw["resolution"] = (1.0 / scale["X"], 1.0 / scale["Y"])
        tifffile.imwrite(tmp, np.asarray(data), **kw)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp
