"""Put a :class:`~napari_unetpp.inference.Prediction` into a napari viewer: one probability layer per level, the
ensemble, and the mask as an editable Labels layer. Existing layers are updated in place, never duplicated."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from .inference import Prediction


def level_layer_name(image_name: str, level: int | str) -> str:
    """``"<image> [UNet++ L2]"``, ``"<image> [UNet++ ensemble]"``, ``"<image> [UNet++ mask]"``."""
    tag = f"L{level}" if isinstance(level, int) else level
    return f"{image_name} [UNet++ {tag}]"


def _geometry(image: Any) -> dict[str, Any]:
    """Scale/translate of the image's spatial axes, so results overlay correctly (channel axis dropped)."""
    return {"scale": tuple(image.scale), "translate": tuple(image.translate)}


def _upsert(viewer: "napari.Viewer", name: str, data: np.ndarray, kind: str, **kwargs: Any) -> Any:
    if name in viewer.layers:
        layer = viewer.layers[name]
        layer.data = data
        return layer
    add = viewer.add_image if kind == "image" else viewer.add_labels
    return add(data, name=name, **kwargs)


def show_prediction(viewer: "napari.Viewer", image: Any, pred: "Prediction", mask_name: str | None = None) -> dict:
    """Add or update the layers for ``pred`` computed from the Image layer ``image``.

    Returns the layers by key (``"L1"``..., ``"ensemble"``, ``"mask"``).
    """
    geo = _geometry(image)
    out = {}
    for lv, prob in sorted(pred.probabilities.items()):
        if prob.ndim != len(geo["scale"]):  # multi-class: show the foreground classes' summed probability
            prob = 1.0 - prob[0].astype(np.float32)
        out[f"L{lv}"] = _upsert(viewer, level_layer_name(image.name, lv), prob, "image", colormap="magma",
                                contrast_limits=(0, 1 if prob.dtype != np.uint8 else 255), blending="additive",
                                visible=lv == pred.depth, **geo)
    if pred.ensemble is not None:
        ens = pred.ensemble if pred.ensemble.ndim == len(geo["scale"]) else 1.0 - pred.ensemble[0]
        out["ensemble"] = _upsert(viewer, level_layer_name(image.name, "ensemble"), ens, "image", colormap="viridis",
                                  contrast_limits=(0, 1), blending="additive", visible=False, **geo)
    out["mask"] = _upsert(viewer, mask_name or level_layer_name(image.name, "mask"), pred.mask, "labels",
                          opacity=0.5, **geo)
    return out
