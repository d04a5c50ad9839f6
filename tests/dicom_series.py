"""A real-looking CT DICOM series written with pydicom from the shipped CT sample, so the DICOM tests run everywhere.

The shipped sample (``napari_unetpp/_samples/ct_abdomen.tif``, Hounsfield units, 20 x 352 x 512) is rows 144-495 of
the abdominal series in ``../shared/data/ct-abdomen``; :func:`write_ct_series` writes it back as that series looked:
one file per slice (named without an extension, as PACS exports are), uint16 stored values with rescale intercept
-1024, 2 mm apart along +Z but numbered from the head down, 0.9765625 mm pixels, the scanner's two windows, one
SeriesInstanceUID and SeriesDescription. :func:`write_ct_labels` writes the sample's organ labels as a NIfTI in the
LAS orientation (as TotalSegmentator writes them) over the same grid. Nothing here uses napari_unetpp's own writers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

SAMPLES = Path(__file__).resolve().parents[1] / "napari_unetpp" / "_samples"
SPACING = (2.0, 0.9765625, 0.9765625)  # Z, Y, X in mm
ORIGIN = (-249.51171875, -296.89453125, -804.5)  # LPS position of the first voxel of the lowest slice
WINDOWS = ((300.0, 40.0), (1500.0, 300.0))  # (width, level): what the scanner stored
DESCRIPTION = "CT Body 3.0"


@dataclass
class Series:
    """A DICOM series folder and what a reader must find in it."""

    folder: Path
    hu: np.ndarray  # (Z, Y, X) in the canonical LPS order, feet to head
    labels: Path | None = None  # organ labels (NIfTI, LAS) on the same grid
    label_values: np.ndarray | None = None  # the labels in the canonical order


def sample_hu() -> np.ndarray:
    """The shipped CT sample: int16 Hounsfield units, (Z, Y, X) feet to head, 2 x 0.98 x 0.98 mm."""
    return tifffile.imread(SAMPLES / "ct_abdomen.tif")


def sample_labels() -> np.ndarray:
    """The shipped sample's organ labels (TotalSegmentator numbers: 1 spleen, 5 liver, 6 stomach, 7 pancreas)."""
    return tifffile.imread(SAMPLES / "ct_abdomen_labels.tif")


def write_ct_series(folder: Path, hu: np.ndarray | None = None, description: str = DESCRIPTION) -> Series:
    """Write ``hu`` ((Z, Y, X) int16 Hounsfield units feet to head; default: the shipped sample) into ``folder`` as
    one DICOM file per slice, with positions, spacing, windows, a SeriesInstanceUID and instance numbers."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    hu = sample_hu() if hu is None else np.asarray(hu)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    nz, ny, nx = hu.shape
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Manufacturer, ds.KVP, ds.ConvolutionKernel = "CT", "SIEMENS", 120, "Br38f"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesDescription, ds.SeriesNumber, ds.PatientPosition = description, 3, "HFS"
        ds.InstanceNumber = 267 + (nz - 1 - k)  # numbered from the head down: file order is not slice order
        z = ORIGIN[2] + SPACING[0] * k
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = z
        ds.SliceThickness = 3  # the reconstruction's, not the 2 mm between slices
        ds.PixelSpacing = [SPACING[1], SPACING[2]]
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter = [level for _, level in WINDOWS]
        ds.WindowWidth = [width for width, _ in WINDOWS]
        ds.WindowCenterWidthExplanation = ["WINDOW1", "WINDOW2"]
        stored = (hu[k].astype(np.int32) + 1024).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        pydicom.dcmwrite(folder / f"CT.{ds.SOPInstanceUID}", ds, enforce_file_format=True)
    return Series(folder, hu)


def write_ct_labels(path: Path, labels: np.ndarray | None = None) -> np.ndarray:
    """Write ``labels`` ((Z, Y, X) canonical order; default: the sample's) as a LAS NIfTI over the grid of
    :func:`write_ct_series`: the file's j axis runs anterior, so its voxel order differs from the canonical one.
    Returns the labels as given (canonical order)."""
    import nibabel as nib

    labels = sample_labels() if labels is None else np.asarray(labels)
    nz, ny, nx = labels.shape
    dz, dy, dx = SPACING
    ox, oy, oz = ORIGIN
    # voxel (i, j, k) of the file is canonical (x = i, y = ny - 1 - j, z = k); RAS = (-L, -P, S)
    affine = np.array(
        [[-dx, 0, 0, -ox], [0, dy, 0, -(oy + (ny - 1) * dy)], [0, 0, dz, oz], [0, 0, 0, 1]], dtype=np.float64
    )
    ijk = np.ascontiguousarray(np.transpose(labels, (2, 1, 0))[:, ::-1, :]).astype(np.uint8)
    img = nib.Nifti1Image(ijk, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return labels


def ct_series(folder: Path) -> Series:
    """The sample written as a DICOM series in ``folder / "dicom"``, with its labels beside it."""
    series = write_ct_series(folder / "dicom")
    series.labels = folder / "labels.nii.gz"
    series.label_values = write_ct_labels(series.labels)
    return series
