"""Fresh networks for data no shipped model resembles, with the intensity recipe of their modality.

    lm = new_model("em", classes=["membrane"])          # an untrained UNet++ with its card
    fine_tune(lm, TrainingPair(image, labels), minutes=4)  # the scratch recipe is chosen for it

The architecture is the shipped models' (measured on this project's data: it trains to their scores in 20-30 CPU
minutes and fine-tunes at 0.4-2 s per step on a laptop CPU): 2D, five resolution levels of 16-256 features, batch
norm, transposed-convolution upsampling, deep supervision over four heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from napari_unetpp.data.normalization import Normalization
from napari_unetpp.model.card import ModelCard
from napari_unetpp.model.config import UNetPlusPlusConfig, anisotropic_pool
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.model.network import UNetPlusPlus

__all__ = ["MODALITIES", "new_model"]

MODALITIES: dict[str, dict[str, Any]] = {
    "fluorescence": {
        "normalization": Normalization("percentile", 1.0, 99.8),
        "why": "percentiles 1-99.8 of the stack: robust to a few saturated spots, dark background kept dark",
    },
    "brightfield": {
        "normalization": Normalization("percentile", 0.5, 99.5),
        "why": "percentiles 0.5-99.5 of the stack: transmitted light and phase/DIC contrast around a grey level",
    },
    "em": {
        "normalization": Normalization("percentile", 1.0, 99.8),
        "why": "percentiles 1-99.8 of the stack, as the shipped EM model",
    },
    "ct": {
        "normalization": Normalization("window", -160.0, 240.0, name="soft-tissue"),
        "why": "Hounsfield units clipped to the abdominal soft-tissue window W400 L40 (-160..240 HU) and scaled to "
        "0..1, the same for every scan",
    },
}

ARCHITECTURE = {"features": (16, 32, 64, 128, 256), "norm": "batch", "upsample": "transpose", "dropout": 0.0}


def new_model(
    modality: str = "fluorescence",
    *,
    classes: Sequence[str] = ("foreground",),
    in_channels: int = 1,
    spatial_dims: int = 2,
    name: str | None = None,
    seed: int = 0,
    spacing: Sequence[float] | None = None,
) -> LoadedModel:
    """An untrained UNet++ with the ``modality``'s normalisation, ready for :func:`~napari_unetpp.training.fine_tune`.

    Args:
        modality: ``"fluorescence"``, ``"brightfield"``, ``"em"`` or ``"ct"`` (picks the intensity recipe).
        classes: Foreground class names; one name gives a 1-class (sigmoid) model, more a softmax model with
            background as class 0.
        in_channels: Image channels.
        spatial_dims: 2 (planes) or 3 (volumes).
        name: Name to save under (default ``<modality>-new``).
        seed: Seed for the initial weights, so a run can be repeated.
        spacing: 3D only: voxel size per axis (Z, Y, X). Anisotropic voxels (a 2 mm or 5 mm Z axis under 1 mm
            pixels) are pooled only in-plane until they are nearly isotropic (:func:`~napari_unetpp.model.config.
            anisotropic_pool`, nnU-Net's rule), instead of halving Z like Y and X.

    Raises:
        ValueError: unknown modality, or no class names.
    """
    import torch

    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}.")
    classes = [c.strip() for c in classes if c.strip()]
    if not classes:
        raise ValueError("a new model needs at least one class name, e.g. 'nucleus'.")
    preset = MODALITIES[modality]
    depth = len(ARCHITECTURE["features"]) - 1  # type: ignore[arg-type]
    pool = None
    if spatial_dims == 3 and spacing is not None:
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing needs three positive voxel sizes (Z, Y, X), got {tuple(spacing)}.")
        factors = anisotropic_pool(tuple(spacing), depth)
        pool = None if all(f == (2, 2, 2) for f in factors) else factors
    config = UNetPlusPlusConfig(
        in_channels=in_channels,
        num_classes=1 if len(classes) == 1 else len(classes) + 1,
        spatial_dims=spatial_dims,
        pool=pool,
        **ARCHITECTURE,  # type: ignore[arg-type]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = UNetPlusPlus.from_config(config)
    module.eval()
    card = ModelCard(
        name=name or f"{modality}-new",
        architecture=config.to_dict(),
        normalization=preset["normalization"].to_dict(),
        classes=list(classes) if len(classes) == 1 else ["background", *classes],
        description=f"UNet++ trained from scratch on the user's {modality} images",
        training={
            "untrained": True,
            "modality": modality,
            "decision": {
                "architecture": "the shipped models' (2D/3D UNet++, 16-256 features, batch norm, four heads)",
                "normalization": preset["why"],
                **(
                    {
                        "pooling": f"voxels {' x '.join(f'{s:g}' for s in spacing)} (Z, Y, X): pooling factors per "
                        f"level {[list(f) for f in config.pool_factors]}, in-plane only while Z is more than twice "
                        "as long (nnU-Net's rule)"
                    }
                    if spatial_dims == 3 and spacing is not None
                    else {}
                ),
            },
        },
    )
    return LoadedModel(module, card)
