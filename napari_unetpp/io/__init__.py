"""Reading and writing images: TIFF, OME-Zarr, DICOM series and NIfTI volumes."""
