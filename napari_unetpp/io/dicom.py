"""DICOM input: a series (a folder of slices) or a single (possibly multi-frame) file, as a canonical ``(Z, Y, X)``
volume in Hounsfield units with its geometry (see :mod:`napari_unetpp.io.geometry`) and the file's own windows.

Slices are sorted by their position along the slice normal; the rescale slope and intercept are applied. pydicom is
pure Python (a few MB, no compiled code), which is why it was chosen over SimpleITK; it is the ``[ct]`` extra.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from napari_unetpp.data.windows import Window
from napari_unetpp.errors import ReadError
from napari_unetpp.io.geometry import Geometry, Volume

__all__ = ["is_dicom_file", "dicom_files", "read_dicom"]

log = logging.getLogger(__name__)


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True when the file starts with the DICOM preamble (``DICM`` at byte 128) or is named ``*.dcm``."""
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path) -> Iterator[Path]:
    """The folder's DICOM files (not hidden ones), in directory order, read lazily."""
    return (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:
        raise ReadError(
            "reading DICOM needs pydicom: pip install 'napari-unetpp[ct]' (or pip install pydicom)."
        ) from None
    return pydicom


def _windows_of(ds: Any) -> list[Window]:
    """The file's own windows (WindowCenter/WindowWidth, possibly several), named by their explanation."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return []
    centers = ds.WindowCenter if ds["WindowCenter"].VM > 1 else [ds.WindowCenter]
    widths = ds.WindowWidth if ds["WindowWidth"].VM > 1 else [ds.WindowWidth]
    names = ds.get("WindowCenterWidthExplanation", None)
    names = list(names) if names is not None and ds["WindowCenterWidthExplanation"].VM > 1 else [names]
    out = []
    for n, (c, w) in enumerate(zip(centers, widths)):
        label = names[n] if n < len(names) and names[n] else f"dicom{n + 1}"
        if float(w) > 0:
            out.append(Window(f"dicom {label}", float(w), float(c)))
    return out


def _hu(ds: Any, where: Path) -> np.ndarray:
    """The pixels in Hounsfield units (modality LUT: slope and intercept)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ReadError(
            f"{where}: this DICOM file has no pixel data (a report, a DICOMDIR or a header-only file); "
            "open the image files of the series."
        )
    try:
        raw = ds.pixel_array
    except Exception as exc:  # missing decoder for a compressed transfer syntax, truncated data
        raise ReadError(f"{where}: the pixel data cannot be decoded ({str(exc).splitlines()[0]}).") from None
    slope = float(ds.get("RescaleSlope", 1) or 1)
    inter = float(ds.get("RescaleIntercept", 0) or 0)
    if slope == 1 and inter == int(inter):
        out = raw.astype(np.int32) + int(inter)
        if out.min() >= np.iinfo(np.int16).min and out.max() <= np.iinfo(np.int16).max:
            return out.astype(np.int16)
        return out
    return (raw.astype(np.float32) * np.float32(slope) + np.float32(inter)).astype(np.float32)


def read_dicom(path: str | os.PathLike[str]) -> Volume:
    """Read a DICOM series (a folder) or a single DICOM file as a canonical HU volume.

    The slices of a folder are sorted by their position along the slice normal (not by file name or instance
    number); the Z spacing is the distance between positions (not SliceThickness, which can differ).

    Raises:
        ReadError: no DICOM files, several series in one folder, a file without pixel data, slices of different
            size or orientation, or two slices at one position (each one sentence naming what to do).
    """
    pydicom = _pydicom()
    p = Path(path)
    files = sorted(dicom_files(p)) if p.is_dir() else [p]
    if not files:
        raise ReadError(f"{p}: no DICOM files in this folder.")
    datasets = []
    for f in files:
        try:
            datasets.append((f, pydicom.dcmread(f)))
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise ReadError(f"{f}: not a readable DICOM file ({str(exc).splitlines()[0]}).") from None
    datasets = [(f, ds) for f, ds in datasets if ds.get("SOPClassUID", "") != "1.2.840.10008.1.3.10"]  # DICOMDIR
    series = Counter(_series_uid(ds) for _, ds in datasets)
    if len(series) > 1:
        first_of: dict[str, Any] = {}
        for _, ds in datasets:
            first_of.setdefault(_series_uid(ds), ds)
        desc = "; ".join(
            f"{n} file{'s' if n > 1 else ''} " + _series_group(uid, first_of[uid]) for uid, n in series.most_common()
        )
        raise ReadError(
            f"{p} holds {len(series)} DICOM series ({desc}); move each series into its own folder and open one."
        )
    if not datasets:
        raise ReadError(f"{p}: no DICOM image files in this folder.")
    first = datasets[0][1]
    if len(datasets) == 1 and int(first.get("NumberOfFrames", 1) or 1) > 1:
        return _multiframe(first, datasets[0][0])
    iop = np.array([float(v) for v in first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    positions = []
    for f, ds in datasets:
        o = np.array([float(v) for v in ds.get("ImageOrientationPatient", iop)])
        if not np.allclose(o, iop, atol=1e-3):
            raise ReadError(f"{f}: its slice orientation differs from the other files; this is not one series.")
        positions.append(np.array([float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])]))
    if not any("ImagePositionPatient" in ds for _, ds in datasets):  # no geometry (secondary captures): by number
        step = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
        numbers = [int(ds.get("InstanceNumber", n) or n) for n, (_, ds) in enumerate(datasets)]
        rank = np.argsort(np.argsort(numbers, kind="stable"), kind="stable")
        positions = [normal * step * float(r) for r in rank]
    order = np.argsort([float(pos @ normal) for pos in positions], kind="stable")
    along = np.array([float(positions[i] @ normal) for i in order])
    if len(along) > 1 and np.min(np.diff(along)) < 1e-3:
        dup = int(order[int(np.argmin(np.diff(along)))])
        raise ReadError(
            f"{datasets[dup][0]}: two slices at the same position; the folder mixes acquisitions of one series "
            "(move one of them elsewhere)."
        )
    if len(along) > 2:
        gaps = np.diff(along)
        if gaps.max() > 1.1 * gaps.min():
            log.warning(
                "%s: slice spacing varies from %.2f to %.2f mm; using %.2f",
                p,
                gaps.min(),
                gaps.max(),
                float(np.median(gaps)),
            )
    dz = float(np.median(np.diff(along))) if len(along) > 1 else float(first.get("SliceThickness", 1) or 1)
    slices: list[np.ndarray] = []
    for i in order:
        f, ds = datasets[i]
        px = _hu(ds, f)
        if slices and px.shape != slices[0].shape:
            raise ReadError(f"{f}: its size {px.shape} differs from the other slices' {slices[0].shape}.")
        slices.append(px)
    kji = np.stack(slices)
    if kji.dtype != slices[0].dtype or any(s.dtype != kji.dtype for s in slices):
        kji = kji.astype(np.float32)
    dy, dx = (float(v) for v in first.get("PixelSpacing", [1.0, 1.0]))
    lps = np.eye(4)
    lps[:3, 0] = row_cos * dx
    lps[:3, 1] = col_cos * dy
    lps[:3, 2] = normal * dz
    lps[:3, 3] = positions[int(order[0])]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS, as NIfTI stores it
    geometry = Geometry.from_affine(affine, (kji.shape[2], kji.shape[1], kji.shape[0]))
    data = geometry.to_canonical(np.transpose(kji, (2, 1, 0)))
    return Volume(data, geometry, _windows_of(first), _dicom_metadata(first, len(slices)))


def _multiframe(ds: Any, f: Path) -> Volume:
    frames = _hu(ds, f)
    if frames.ndim == 2:
        frames = frames[None]
    dy, dx = (float(v) for v in ds.get("PixelSpacing", [1.0, 1.0]))
    dz = float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0)
    affine = np.diag([-dx, -dy, dz, 1.0])
    geometry = Geometry.from_affine(affine, (frames.shape[2], frames.shape[1], frames.shape[0]))
    data = geometry.to_canonical(np.transpose(frames, (2, 1, 0)))
    return Volume(data, geometry, _windows_of(ds), _dicom_metadata(ds, frames.shape[0]))


def _series_uid(ds: Any) -> str:
    """The file's SeriesInstanceUID, ``""`` when it has none (missing or empty)."""
    return str(ds.get("SeriesInstanceUID", "") or "")


def _series_group(uid: str, ds: Any) -> str:
    """``of 'CT Body'``, or ``without a SeriesInstanceUID ('CT Body')`` for files without one."""
    if uid:
        return f"of '{_series_label(ds)}'"
    label = str(ds.get("SeriesDescription", "") or ds.get("SeriesNumber", "") or "")
    return "without a SeriesInstanceUID" + (f" ('{label}')" if label else "")


def _series_label(ds: Any) -> str:
    return str(ds.get("SeriesDescription", "") or ds.get("SeriesNumber", "") or ds.get("SeriesInstanceUID", "?"))


def _dicom_metadata(ds: Any, n: int) -> dict[str, Any]:
    keys = ("Modality", "SeriesDescription", "Manufacturer", "KVP", "ConvolutionKernel", "SliceThickness")
    meta: dict[str, Any] = {k: str(ds.get(k)) for k in keys if ds.get(k) not in (None, "")}
    meta["slices"] = n
    return meta
