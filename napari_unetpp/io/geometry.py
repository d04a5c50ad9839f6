"""Where a medical volume's voxels are in the patient: :class:`Geometry`, and :class:`Volume` (a canonical array with
its geometry), shared by the DICOM and NIfTI readers.

**One array order for the model**: every volume is turned into a ``(Z, Y, X)`` array whose voxel axes point to the
patient's Left, Posterior and Superior (LPS, the DICOM patient axes). In napari that is the radiological view of an
axial series: anterior at the top, the patient's left on the right of the screen, the slider from feet to head. A
:class:`Geometry` remembers how the file's own voxel order maps to it, so a mask goes back to the file's order and
affine (:func:`napari_unetpp.io.nifti.nifti_image`, written by :func:`napari_unetpp.io.images.write_image`) and
overlays the input in any viewer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_unetpp.data.windows import Window
from napari_unetpp.errors import InputError

__all__ = ["CANONICAL", "Geometry", "Volume"]

CANONICAL = ("L", "P", "S")  # voxel axes i, j, k of the canonical grid; the array is (k, j, i) = (Z, Y, X)


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
