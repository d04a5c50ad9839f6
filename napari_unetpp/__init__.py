"""napari-unetpp: prunable UNet++ segmentation for microscopy and CT stacks, in napari, Python and the CLI.

The public API is imported lazily so that ``import napari_unetpp`` stays cheap (no torch until needed).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "UNetPlusPlus": "napari_unetpp.model",
    "UNetPlusPlusConfig": "napari_unetpp.model",
    "PrunedUNetPlusPlus": "napari_unetpp.model",
    "predict": "napari_unetpp.inference",
    "predict_iter": "napari_unetpp.inference",
    "Prediction": "napari_unetpp.inference",
    "Progress": "napari_unetpp.inference",
    "Normalization": "napari_unetpp.normalization",
    "load_model": "napari_unetpp.models",
    "save_model": "napari_unetpp.models",
    "list_models": "napari_unetpp.models",
    "ModelCard": "napari_unetpp.models",
    "LoadedModel": "napari_unetpp.models",
    "ModelFileError": "napari_unetpp.models",
    "read_image": "napari_unetpp.io",
    "write_image": "napari_unetpp.io",
    "resolve_device": "napari_unetpp.device",
    "fine_tune": "napari_unetpp.training",
    "run_fine_tune": "napari_unetpp.training",
    "TrainingPair": "napari_unetpp.training",
    "FineTuneConfig": "napari_unetpp.training",
    "FineTuneResult": "napari_unetpp.training",
    "TrainProgress": "napari_unetpp.training",
    "TrainingDataError": "napari_unetpp.training",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'napari_unetpp' has no attribute {name!r}")
