"""napari-unetpp: prunable UNet++ segmentation for microscopy and CT stacks, in napari, Python and the CLI.

The public API is imported lazily so that ``import napari_unetpp`` stays cheap (no torch until needed).

Where things live (everything but ``napari`` is the core, which imports no Qt, napari or magicgui):
- ``model``: UNet++ (nodes ``x_i_j``, heads ``head_j``, ``forward(x, depth=k)`` runs only i + j <= k), cards, registry;
- ``data``: axes and channels, normalisation, Hounsfield windows, pixel size; ``io``: TIFF, OME-Zarr, DICOM, NIfTI;
- ``inference``: ``predict_iter`` / ``predict`` through one sliding-window loop; ``runtimes``: device, precision,
  PyTorch / ONNX Runtime / OpenVINO / int8; ``training``: ``fine_tune_iter`` / ``fine_tune`` on a steppable engine;
- ``batch``: many files and clusters; ``cli``; ``export``: bioimage.io; ``paths``, ``interrupts``, ``jobs``, ``errors``;
- ``napari``: the widgets, reader, samples and demo. See docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "UNetPlusPlus": "napari_unetpp.model.network",
    "UNetPlusPlusConfig": "napari_unetpp.model.config",
    "PrunedUNetPlusPlus": "napari_unetpp.model.network",
    "predict": "napari_unetpp.inference.predict",
    "predict_iter": "napari_unetpp.inference.predict",
    "Prediction": "napari_unetpp.inference.result",
    "Progress": "napari_unetpp.inference.result",
    "Normalization": "napari_unetpp.data.normalization",
    "load_model": "napari_unetpp.model.registry",
    "save_model": "napari_unetpp.model.registry",
    "list_models": "napari_unetpp.model.registry",
    "ModelCard": "napari_unetpp.model.card",
    "LoadedModel": "napari_unetpp.model.loaded",
    "read_image": "napari_unetpp.io.images",
    "write_image": "napari_unetpp.io.images",
    "resolve_device": "napari_unetpp.runtimes.device",
    "fine_tune": "napari_unetpp.training",
    "fine_tune_iter": "napari_unetpp.training",
    "TrainingPair": "napari_unetpp.training",
    "FineTuneConfig": "napari_unetpp.training",
    "FineTuneResult": "napari_unetpp.training",
    "TrainProgress": "napari_unetpp.training",
    "new_model": "napari_unetpp.model.modalities",
    "LiveTrainer": "napari_unetpp.training.live",
    "correction_order": "napari_unetpp.inference.review",
    "WINDOWS": "napari_unetpp.data.windows",
    "parse_window": "napari_unetpp.data.windows",
    "window_normalization": "napari_unetpp.data.normalization",
    "UserError": "napari_unetpp.errors",
    "InputError": "napari_unetpp.errors",
    "ModelFileError": "napari_unetpp.errors",
    "ReadError": "napari_unetpp.errors",
    "TrainingDataError": "napari_unetpp.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'napari_unetpp' has no attribute {name!r}")
