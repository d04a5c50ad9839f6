"""What a bioimage.io package says about its model: the spec 0.5 description (``rdf.yaml``), the README with the
card (training data, citations, per-level scores, the recommended depth) and the cover image.
:func:`~napari_unetpp.export.bioimageio.export_bioimageio` writes the network and its test tensors and calls these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from napari_unetpp.inference.masks import mask_from

__all__ = ["UNETPP_CITATIONS", "cover_image", "readme_text", "model_description"]

UNETPP_CITATIONS = [
    (
        "Zhou Z, Rahman Siddiquee MM, Tajbakhsh N, Liang J. UNet++: A Nested U-Net Architecture for Medical Image "
        "Segmentation. DLMIA 2018.",
        "10.1007/978-3-030-00889-5_1",
    ),
    (
        "Zhou Z, Rahman Siddiquee MM, Tajbakhsh N, Liang J. UNet++: Redesigning Skip Connections to Exploit "
        "Multiscale Features in Image Segmentation. IEEE TMI 39(6), 2020.",
        "10.1109/TMI.2019.2959609",
    ),
]


def cover_image(x: np.ndarray, y: np.ndarray, path: Path) -> None:
    """Input and output side by side (2:1), the middle plane of a volume."""
    import imageio.v3 as iio

    def plane(a: np.ndarray) -> np.ndarray:
        a = a[0, 0] if a.ndim == 4 else a[0, 0, a.shape[2] // 2]
        lo, hi = np.percentile(a, [1, 99.8])
        return np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)

    n = y.shape[1]  # one class: its probabilities; several: the mask (predict's rule), classes spread over 0..1
    prob = y[0, 0] if n == 1 else mask_from(y[0], n) / max(n - 1, 1)
    if prob.ndim == 3:
        prob = prob[prob.shape[0] // 2]
    left = plane(x)
    right = np.clip(prob, 0, 1)
    img = np.concatenate([left, right], axis=1)
    rgb = np.stack([img, img, img], -1)
    rgb[:, left.shape[1] :, 0] = right  # output in magenta
    rgb[:, left.shape[1] :, 1] = right * 0.2
    iio.imwrite(path, (rgb * 255).astype(np.uint8))


def readme_text(model: Any, k: int, params: int, diffs: dict[str, float]) -> str:
    """The package's README.md: what level ``k`` is, its normalisation, the card's training and citations, the
    per-level scores and how closely the weights reproduce ``predict`` (``diffs`` per weights format)."""
    card = model.card
    tr = card.training or {}
    scores = "\n".join(f"| L{lv} | {json.dumps(s)} |" for lv, s in card.scores.items())
    lines = [
        f"# {card.id}: UNet++ L{k} (exported by napari-unetpp)",
        "",
        card.description or "",
        "",
        f"This package holds the depth-{k} sub-network of a UNet++ with deep supervision (Zhou et al. 2018/2020): "
        f"only the nodes X(i,j) with i + j <= {k} and head {k}, {params:,} parameters. "
        f"The recommended depth of this model is L{card.recommended_depth}.",
        "",
        "Output: probabilities (sigmoid of head k for one class, softmax over classes otherwise); threshold 0.5 for "
        "a mask. Input sides must be multiples of the network's pooling (see rdf.yaml).",
        "",
        f"Normalisation: {model.normalization.describe()} (the package's preprocessing).",
        "",
        "## Training",
        "",
        *(
            f"- {key}: {val}"
            for key, val in tr.items()
            if isinstance(val, (str, int, float)) and key not in ("script", "citations")
        ),
        "",
        "## Citations",
        "",
        *(f"- {t} (doi:{d})" for t, d in UNETPP_CITATIONS),
        *(f"- {c}" for c in _as_list(tr.get("citations"))),
        "",
        "## Validation scores per level (from the model card)",
        "",
        "| level | scores |",
        "|---|---|",
        scores,
        "",
        "## Reproduction",
        "",
        "The test output is napari-unetpp's own `predict` on the test input; the exported weights reproduce it to "
        + ", ".join(f"{w} {d:.1e}" for w, d in diffs.items())
        + " (largest absolute difference).",
        "",
    ]
    return "\n".join(lines)


def _as_list(value: Any) -> list[str]:
    """A card field that is a list, or a string holding a Python list's text, as a list of strings."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str) and value.startswith("["):
        import ast

        try:
            return [str(v) for v in ast.literal_eval(value)]
        except (ValueError, SyntaxError):
            return [value]
    return [value] if value else []


def model_description(bio: Any, model: Any, k: int, work: Path, x: np.ndarray, y: np.ndarray, authors: Any) -> Any:
    """The spec 0.5 ``ModelDescr`` of level ``k`` (``bio``: ``bioimageio.spec.model.v0_5``): axes, the card's
    normalisation as preprocessing, the test tensors, README, cover and weights found in ``work``."""
    from napari_unetpp import __version__

    cfg = model.module.config
    dims = cfg.spatial_dims
    spatial = ["z", "y", "x"] if dims == 3 else ["y", "x"]
    mult = cfg.multiple if isinstance(cfg.multiple, tuple) else (cfg.multiple,) * dims
    in_axes: list[Any] = [
        bio.BatchAxis(),
        bio.ChannelAxis(channel_names=[bio.Identifier(f"channel{c}") for c in range(cfg.in_channels)]),
    ]
    in_axes += [
        bio.SpaceInputAxis(id=bio.AxisId(a), size=bio.ParameterizedSize(min=int(m), step=int(m)))
        for a, m in zip(spatial, mult)
    ]
    norm = model.normalization
    pre: list[Any] = [bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32"))]
    if norm.mode == "percentile":
        pre.append(
            bio.ScaleRangeDescr(
                kwargs=bio.ScaleRangeKwargs(
                    axes=[bio.AxisId(a) for a in spatial],
                    min_percentile=float(norm.low),
                    max_percentile=float(norm.high),
                    eps=1e-6,
                )
            )
        )
    elif norm.mode == "window":
        gain = 1.0 / (norm.high - norm.low)
        pre.append(bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=gain, offset=-norm.low * gain)))
        pre.append(bio.ClipDescr(kwargs=bio.ClipKwargs(min=0.0, max=1.0)))
    classes = (
        list(model.card.classes)
        if cfg.num_classes > 1
        else [model.card.classes[0] if model.card.classes else "foreground"]
    )
    out_axes: list[Any] = [
        bio.BatchAxis(),
        bio.ChannelAxis(channel_names=[bio.Identifier(_ident(c)) for c in classes]),
    ]
    out_axes += [
        bio.SpaceOutputAxis(
            id=bio.AxisId(a), size=bio.SizeReference(tensor_id=bio.TensorId("raw"), axis_id=bio.AxisId(a))
        )
        for a in spatial
    ]
    import torch

    descr = bio.ModelDescr(
        name=f"napari-unetpp {model.card.name} L{k}"[:128],
        description=(
            f"UNet++ L{k} (pruned from a depth-{model.module.max_depth} UNet++ with deep supervision) from "
            f"napari-unetpp: {model.card.description or model.card.name}. Recommended depth L"
            f"{model.card.recommended_depth}."
        )[:1000],
        authors=[bio.Author(name=a) for a in (authors or ["napari-unetpp developers"])],
        cite=[bio.CiteEntry(text=t, doi=bio.Doi(d)) for t, d in UNETPP_CITATIONS],
        license=bio.LicenseId("BSD-3-Clause"),
        documentation=bio.FileDescr(source=work / "README.md"),
        covers=[bio.FileDescr(source=work / "cover.png")],
        tags=["unet++", "segmentation", "pytorch", f"{dims}d", "napari-unetpp", *(_ident(c) for c in classes)],
        inputs=[
            bio.InputTensorDescr(
                id=bio.TensorId("raw"),
                axes=in_axes,
                test_tensor=bio.FileDescr(source=work / "test_input.npy"),
                preprocessing=pre,
            )
        ],
        outputs=[
            bio.OutputTensorDescr(
                id=bio.TensorId("probabilities"),
                axes=out_axes,
                test_tensor=bio.FileDescr(source=work / "test_output.npy"),
                data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
            )
        ],
        weights=bio.WeightsDescr(
            torchscript=bio.TorchscriptWeightsDescr(
                source=work / "weights.torchscript.pt", pytorch_version=bio.Version(torch.__version__.split("+")[0])
            ),
            onnx=bio.OnnxWeightsDescr(source=work / "weights.onnx", opset_version=17),
        ),
        version=bio.Version(str(model.card.version or 1)),
        config={
            "napari-unetpp": {
                "model": model.card.id,
                "depth": k,
                "max_depth": model.module.max_depth,
                "recommended_depth": model.card.recommended_depth,
                "exported_with": __version__,
                "normalization": model.normalization.describe(),
            }
        },
    )
    return descr


def _ident(name: str) -> str:
    """A bioimage.io identifier from a class name (letters, digits, _ and -)."""
    out = "".join(c if c.isalnum() or c in "_-" else "_" for c in str(name)).strip("_")
    return out or "class"
