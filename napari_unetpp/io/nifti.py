"""NIfTI (``.nii``, ``.nii.gz``) input and output: a volume read as a canonical ``(Z, Y, X)`` array with its geometry
(see :mod:`napari_unetpp.io.geometry`), and an array written back in the input's voxel order, affine and header.

Values are as stored times the file's scaling (``scl_slope``). nibabel is pure Python; it is the ``[ct]`` extra.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from napari_unetpp.errors import ReadError
from napari_unetpp.io.geometry import Geometry, Volume

__all__ = ["NIFTI_SUFFIXES", "is_nifti_name", "nifti_suffix", "read_nifti", "nifti_image", "save_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_name(path: str | os.PathLike[str]) -> bool:
    """True for a ``.nii`` or ``.nii.gz`` name (any case)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def nifti_suffix(path: str | os.PathLike[str]) -> str:
    """``.nii.gz`` or ``.nii``: the extension nibabel reads the format (and compression) from."""
    return ".nii.gz" if Path(path).name.lower().endswith(".nii.gz") else ".nii"


def _nibabel() -> Any:
    try:
        import nibabel
    except ImportError:
        raise ReadError(
            "reading NIfTI needs nibabel: pip install 'napari-unetpp[ct]' (or pip install nibabel)."
        ) from None
    return nibabel


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


def save_nifti(img: Any, path: str | os.PathLike[str]) -> None:
    """Save ``img`` to ``path`` (its extension says whether it is compressed: see :func:`nifti_suffix`)."""
    _nibabel().save(img, str(path))
