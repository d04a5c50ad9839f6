"""CT (and other medical volume) input and output with the geometry kept, and Hounsfield-unit windows.

Formats: a DICOM series (a folder), a single DICOM file, NIfTI (``.nii``, ``.nii.gz``). pydicom and nibabel are pure
Python (a few MB, no compiled code), which is why they were chosen over SimpleITK (one 50 MB binary wheel that also
reads NRRD/MHA); they are the ``[ct]`` extra.

**One array order for the model**: every volume is turned into a ``(Z, Y, X)`` array whose voxel axes point to the
patient's Left, Posterior and Superior (LPS, the DICOM patient axes). In napari that is the radiological view of an
axial series: anterior at the top, the patient's left on the right of the screen, the slider from feet to head. A
:class:`Geometry` remembers how the file's own voxel order maps to it, so a mask goes back to the file's order and
affine (:func:`nifti_image`, written by :func:`napari_unetpp.io.images.write_image`) and overlays the input in any
viewer.

Values are Hounsfield units: DICOM rescale slope and intercept are applied; NIfTI scaling (``scl_slope``) too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_unetpp.data.windows import Window
from napari_unetpp.errors import InputError, ReadError

__all__ = [
    "Geometry",
    "is_dicom_file",
    "is_ct_path",
    "is_nifti_name",
    "read_dicom",
    "read_nifti",
    "nifti_image",
    "save_nifti_temp",
    "NIFTI_SUFFIXES",
]

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
CANONICAL = ("L", "P", "S")  # voxel axes i, j, k of the canonical grid; the array is (k, j, i) = (Z, Y, X)


# ----------------------------------------------------------------------------------------------------- geometry
@dataclass
class Geometry:
    """Where a volume's voxels are in the patient, and how the file's voxel order maps to the canonical array.

    Attributes:
        affine: 4x4 voxel -> RAS+ millimetre matrix of the file's voxel array, as NIfTI stores it.
        file_shape: The file's spatial shape in its own voxel order (i, j, k).
        transform: nibabel orientation transform from the file's (i, j, k) to the canonical L, P, S axes.
        header: The NIfTI header to copy into outputs (None for DICOM input).
    """

    affine: np.ndarray
    file_shape: tuple[int, ...]
    transform: np.ndarray = field(repr=False)
    header: Any = field(default=None, repr=False)

    @classmethod
    def from_affine(cls, affine: np.ndarray, file_shape: Sequence[int], header: Any = None) -> Geometry:
        import nibabel.orientations as no

        affine = np.asarray(affine, dtype=np.float64)
        transform = no.ornt_transform(no.io_orientation(affine), no.axcodes2ornt(CANONICAL))
        return cls(affine, tuple(int(s) for s in file_shape), transform, header)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The canonical ``(Z, Y, X)`` shape."""
        i, j, k = self._canonical_ijk_shape()
        return (k, j, i)

    def _canonical_ijk_shape(self) -> tuple[int, int, int]:
        out = [0, 0, 0]
        for ax, (dest, _) in enumerate(self.transform):
            out[int(dest)] = self.file_shape[ax]
        return (out[0], out[1], out[2])

    @property
    def canonical_affine(self) -> np.ndarray:
        """Voxel -> RAS+ mm matrix of the canonical grid, in (i, j, k) = (X, Y, Z) voxel order."""
        import nibabel.orientations as no

        return self.affine @ no.inv_ornt_aff(self.transform, self.file_shape)

    @property
    def spacing(self) -> dict[str, float]:
        """Voxel size in mm of the canonical array, per axis letter."""
        sizes = np.sqrt((self.canonical_affine[:3, :3] ** 2).sum(axis=0))
        return {"X": float(sizes[0]), "Y": float(sizes[1]), "Z": float(sizes[2])}

    def to_canonical(self, ijk: np.ndarray) -> np.ndarray:
        """File voxel order (i, j, k, ...) -> canonical (Z, Y, X, ...)."""
        import nibabel.orientations as no

        out = no.apply_orientation(np.asarray(ijk), self.transform)
        return np.ascontiguousarray(np.swapaxes(out, 0, 2))

    def to_file(self, zyx: np.ndarray) -> np.ndarray:
        """Canonical (Z, Y, X) -> the file's voxel order (i, j, k); the inverse of :meth:`to_canonical`."""
        import nibabel.orientations as no

        if tuple(zyx.shape[:3]) != self.shape:
            raise InputError(f"an array of shape {tuple(zyx.shape)} does not fit a volume of shape {self.shape}.")
        back = no.ornt_transform(no.axcodes2ornt(CANONICAL), no.io_orientation(self.affine))
        return np.ascontiguousarray(no.apply_orientation(np.swapaxes(zyx, 0, 2), back))

    def axcodes(self) -> str:
        """The file's own orientation, e.g. ``LAS``."""
        import nibabel

        return "".join(nibabel.aff2axcodes(self.affine))


# ------------------------------------------------------------------------------------------------------- DICOM
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


def _iter_dicom_files(folder: Path) -> Iterator[Path]:
    """The folder's DICOM files (not hidden ones), in directory order, read lazily."""
    return (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))


def is_nifti_name(path: str | os.PathLike[str]) -> bool:
    """True for a ``.nii`` or ``.nii.gz`` name (any case)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def is_ct_path(path: str | os.PathLike[str]) -> bool:
    """True for paths this module reads: a NIfTI file, a DICOM file, or a folder holding DICOM files (a folder is
    checked up to its first DICOM file, not read whole)."""
    p = Path(path)
    if is_nifti_name(p):
        return True
    if p.is_dir():
        return next(_iter_dicom_files(p), None) is not None
    return p.is_file() and is_dicom_file(p)


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:
        raise ReadError(
            "reading DICOM needs pydicom: pip install 'napari-unetpp[ct]' (or pip install pydicom)."
        ) from None
    return pydicom


def _nibabel() -> Any:
    try:
        import nibabel
    except ImportError:
        raise ReadError(
            "reading NIfTI needs nibabel: pip install 'napari-unetpp[ct]' (or pip install nibabel)."
        ) from None
    return nibabel


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


@dataclass
class Volume:
    """A canonical ``(Z, Y, X)`` volume with its geometry and what the file says about itself."""

    data: np.ndarray
    geometry: Geometry
    windows: list[Window] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> dict[str, float]:
        return self.geometry.spacing


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
    files = sorted(_iter_dicom_files(p)) if p.is_dir() else [p]
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


# ------------------------------------------------------------------------------------------------------- NIfTI
def read_nifti(path: str | os.PathLike[str]) -> Volume:
    """Read a NIfTI volume (``.nii``/``.nii.gz``) as a canonical ``(Z, Y, X)`` array with its geometry.

    A 2D image becomes one slice; a trailing axis of size 1 is dropped.

    Raises:
        ReadError: the file is missing, not NIfTI, or 4D with more than one volume.
    """
    nib = _nibabel()
    p = Path(path)
    if not p.is_file():
        raise ReadError(f"{p}: no such file.")
    try:
        img = nib.load(p)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises ImageFileError, ValueError, EOFError, zlib errors, ...
        raise ReadError(f"{p}: not a readable NIfTI file ({str(exc).splitlines()[0]}).") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise ReadError(f"{p}: a {data.ndim}D NIfTI of shape {data.shape}; open one 3D volume at a time.")
    geometry = Geometry.from_affine(img.affine, data.shape, header=img.header)
    return Volume(geometry.to_canonical(data), geometry, [], {"orientation": geometry.axcodes()})


def nifti_image(data: np.ndarray, geometry: Geometry | None = None, spacing: dict[str, float] | None = None) -> Any:
    """A NIfTI image of a canonical ``(Z, Y, X)`` array (or ``(C, Z, Y, X)``: channels go last in the file).

    With ``geometry`` the image has the input's voxel order, shape, affine and header (so a mask overlays the input in
    any viewer); without it, a diagonal affine from ``spacing`` (mm; default 1) in the canonical LPS order.
    """
    nib = _nibabel()
    arr = np.asarray(data)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)  # NIfTI float16 is not read by every viewer
    if arr.ndim == 2:
        arr = arr[None]
    channels = arr.ndim == 4
    vols = list(arr) if channels else [arr]
    if geometry is None or tuple(vols[0].shape) != geometry.shape:
        sp = spacing or {}
        affine = np.diag([-sp.get("X", 1.0), -sp.get("Y", 1.0), sp.get("Z", 1.0), 1.0])  # canonical LPS in RAS
        geometry = Geometry.from_affine(affine, (vols[0].shape[2], vols[0].shape[1], vols[0].shape[0]))
    out = [geometry.to_file(v) for v in vols]
    ijk = np.stack(out, axis=-1) if channels else out[0]
    header = geometry.header.copy() if geometry.header is not None else None
    img = nib.Nifti1Image(ijk, geometry.affine, header=header)
    img.set_data_dtype(ijk.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if header is None:
        img.set_qform(geometry.affine, code=1)
        img.set_sform(geometry.affine, code=1)
    return img


def save_nifti_temp(target: Path, img: Any) -> str:
    """Save ``img`` to a temporary file beside ``target`` (same extension, so ``.nii.gz`` is compressed); the caller
    renames it into place."""
    nib = _nibabel()
    suffix = ".nii.gz" if target.name.lower().endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial" + suffix, dir=target.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


# ------------------------------------------------------------------------------------------------ models and CT
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
    from napari_unetpp.data.scale import to_um

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
