"""CT (and other medical volume) paths: which paths are one, and reading one with its geometry kept.

Formats: a DICOM series (a folder), a single DICOM file (:mod:`napari_unetpp.io.dicom`), NIfTI (``.nii``,
``.nii.gz``; :mod:`napari_unetpp.io.nifti`). Every volume comes out as a ``(Z, Y, X)`` array in the canonical LPS
orientation with a :class:`~napari_unetpp.io.geometry.Geometry` that maps outputs back to the file's voxel order
(see :mod:`napari_unetpp.io.geometry`). Values are Hounsfield units: DICOM rescale slope and intercept are applied;
NIfTI scaling (``scl_slope``) too. The Hounsfield windows are in :mod:`napari_unetpp.data.windows`.
"""

from __future__ import annotations

import os
from pathlib import Path

from napari_unetpp.io.dicom import dicom_files, is_dicom_file, read_dicom
from napari_unetpp.io.geometry import Volume
from napari_unetpp.io.nifti import is_nifti_name, read_nifti

__all__ = ["is_ct_path", "read_ct"]


def is_ct_path(path: str | os.PathLike[str]) -> bool:
    """True for paths this module reads: a NIfTI file, a DICOM file, or a folder holding DICOM files (a folder is
    checked up to its first DICOM file, not read whole)."""
    p = Path(path)
    if is_nifti_name(p):
        return True
    if p.is_dir():
        return next(dicom_files(p), None) is not None
    return p.is_file() and is_dicom_file(p)


def read_ct(path: str | os.PathLike[str]) -> Volume:
    """Read a NIfTI file, a DICOM file or a DICOM series folder as a canonical HU volume (see the module docstring).

    Raises:
        ReadError: the file or folder is not readable (one sentence naming it and what to do).
    """
    return read_nifti(path) if is_nifti_name(path) else read_dicom(path)
