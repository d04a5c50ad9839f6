"""Export a pruned level to the bioimage.io model zoo format (spec 0.5).

:func:`export_bioimageio` writes a model package (a ``.zip``, or a folder) that any bioimage.io consumer runs
(bioimageio.core, deepImageJ, ilastik, the BioImage Model Zoo): the sub-network of depth k alone
(:meth:`~napari_unetpp.model.network.UNetPlusPlus.pruned`: only its parameters), as TorchScript and ONNX weights (our
own
safetensors files are not a bioimage.io weights format); the card's normalisation as the spec's preprocessing; a
test input of the model's own domain and the test output our :func:`~napari_unetpp.inference.predict.predict` computes
for
it; a cover image; and a README with the card (training data, citations, licence, per-level scores, the
recommended depth).

The exported network outputs probabilities (sigmoid of head k for a 1-class model, softmax over classes otherwise);
a learned instance cue is not exported. Inputs are one image (batch, channel, [z,] y, x) whose spatial sizes are
multiples of the network's pooling (the package says so). The percentile normalisation is computed per image by
consumers (per plane for a stack fed plane by plane); ``predict`` computes it once per stack, so results on a stack
can differ slightly from the tool's own.

Needs ``onnx`` and ``bioimageio.spec`` (``pip install "napari-unetpp[export]"``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_unetpp.errors import UserError
from napari_unetpp.model.network import PrunedUNetPlusPlus, probabilities
from napari_unetpp.paths import samples_dir

__all__ = ["export_bioimageio", "ExportResult", "ExportError", "exported_network"]

SAMPLES = samples_dir()
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


class ExportError(UserError, RuntimeError):
    """The model cannot be exported (a missing package, a failed trace, a package that does not validate)."""


@dataclass
class ExportResult:
    """What :func:`export_bioimageio` wrote: the package, the level, and how its weights reproduce ``predict``."""

    path: Path
    depth: int
    weights: list[str]
    max_abs_difference: dict[str, float]  # per weights format, against the test output
    parameters: int


class _Probabilities(nn.Module):
    """The pruned network with its output activation: what the package's weights compute."""

    def __init__(self, pruned: PrunedUNetPlusPlus, num_classes: int, has_cue: bool) -> None:
        super().__init__()
        self.net = pruned
        self.num_classes = num_classes
        self.has_cue = has_cue

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # without the pruned network's pad-and-crop (a trace would freeze its sizes): inputs are multiples of the
        # pooling, as the package declares; the classes only (a package holds no instance cue)
        logits = self.net(x, pad=False)[:, : self.num_classes]
        return probabilities(logits, self.num_classes, dim=1)


def exported_network(model: Any, depth: int) -> nn.Module:
    """The module the package holds: the depth-``depth`` sub-network (fp32, eval) with its output activation."""
    cfg = model.module.config
    return _Probabilities(model.module.pruned(depth).float().eval(), int(cfg.num_classes), bool(cfg.has_cue)).eval()


def _sample_for(model: Any) -> np.ndarray:
    """A test image of the model's own domain from the shipped samples: CT for HU windows, nuclei for nuclei
    models, EM otherwise."""
    import tifffile

    norm, name = model.normalization, model.card.name.lower()
    if norm.mode == "window":
        ct = tifffile.imread(SAMPLES / "ct_abdomen.tif")
        return ct[len(ct) // 2]
    if "nucle" in name or "fluor" in str(model.card.training.get("data", "")).lower():
        return tifffile.imread(SAMPLES / "cells3d_nuclei_z40-47.tif")[0]
    return tifffile.imread(SAMPLES / "isbi2012_z25-29.tif")[0]


def _test_input(model: Any, sample: np.ndarray | None, size: int) -> np.ndarray:
    """``(1, C, *spatial)`` float32 test input: a centred crop of ``sample`` whose sides are multiples of the
    network's pooling."""
    cfg = model.module.config
    dims = cfg.spatial_dims
    img = np.asarray(_sample_for(model) if sample is None else sample, dtype=np.float32)
    if dims == 2 and img.ndim == 3 and cfg.in_channels == 1 and img.shape[0] > 4:
        img = img[img.shape[0] // 2]  # a stack: its middle plane
    if img.ndim == dims:
        img = img[None]
    if img.ndim != dims + 1 or img.shape[0] != cfg.in_channels:
        raise ExportError(
            f"the test image must be {'(C, ' if cfg.in_channels > 1 else '('}{'Z, ' if dims == 3 else ''}Y, X) for "
            f"this model, got shape {img.shape}."
        )
    mult = cfg.multiple if isinstance(cfg.multiple, tuple) else (cfg.multiple,) * dims
    box = []
    for n, m in zip(img.shape[1:], mult):
        want = max(m, min(size, n) // m * m)
        if n < want:
            raise ExportError(f"the test image is smaller ({img.shape[1:]}) than the network's pooling ({mult}).")
        a = (n - want) // 2
        box.append(slice(a, a + want))
    return np.ascontiguousarray(img[(slice(None), *box)][None])


def export_bioimageio(
    model: Any,
    output: str | os.PathLike[str],
    depth: int | None = None,
    sample: np.ndarray | None = None,
    size: int = 256,
    authors: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write a bioimage.io model package (spec 0.5) of one pruned level.

    Args:
        model: A :class:`~napari_unetpp.model.registry.LoadedModel`, a model name or a file.
        output: ``NAME.zip`` (a package) or a folder (unzipped; created, must not exist or be empty).
        depth: The level k (default: the card's recommended depth).
        sample: The test image (``(Y, X)``, ``(C, Y, X)``, a stack (its middle plane), or ``(Z, Y, X)`` for 3D
            models); default: a shipped sample of the model's domain.
        size: Largest side of the test crop (rounded down to the network's pooling).
        authors: Author names (default: "napari-unetpp developers").
        progress: Called with a short line per stage.

    Raises:
        ExportError: a missing package (onnx, bioimageio.spec), an export that fails, or weights that do not
            reproduce ``predict`` (one sentence).
    """
    from napari_unetpp.inference.predict import predict
    from napari_unetpp.model.registry import resolve_model

    say = progress or (lambda s: None)
    try:
        import onnx  # noqa: F401
        from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder
        from bioimageio.spec.model import v0_5 as bio
    except ImportError as exc:
        raise ExportError(
            f"export needs {exc.name or 'onnx and bioimageio.spec'}: pip install 'napari-unetpp[export]'"
        ) from None
    loaded = resolve_model(model)
    cfg = loaded.module.config
    k = loaded.module.check_depth(depth if depth is not None else loaded.card.recommended_depth)
    out = Path(output)
    if out.suffix.lower() != ".zip" and out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is a folder that is not empty; give a new folder or a .zip name.")
    work = Path(tempfile.mkdtemp(prefix="unetpp-export-"))
    try:
        say(f"test input and output (L{k}) with predict")
        x = _test_input(loaded, sample, size)
        dims = cfg.spatial_dims
        axes = "CZYX" if dims == 3 else "CYX"
        pred = predict(
            x[0] if cfg.in_channels > 1 else x[0, 0],
            loaded,
            axes=axes if cfg.in_channels > 1 else axes[1:],
            depth=k,
            levels=[k],
            prob_dtype="float32",
            precision="fp32",
            device="cpu",
            tile=max(x.shape[2:]),
        )
        y = pred.probabilities[k]
        y = (y[None] if cfg.num_classes == 1 else y)[None].astype(np.float32)  # (1, classes, *spatial)
        np.save(work / "test_input.npy", x)
        np.save(work / "test_output.npy", y)
        net = exported_network(loaded, k)
        params = sum(p.numel() for p in net.parameters())
        say(f"TorchScript and ONNX weights of UNet++ L{k} ({params:,} parameters)")
        norm = loaded.normalization  # what the package's preprocessing does (per image, as predict does here)
        stats = [norm.compute_stats(x[0, c]) for c in range(x.shape[1])]
        xn = np.stack([norm.apply(x[0, c], st) for c, st in enumerate(stats)])[None]
        xt = torch.from_numpy(xn)
        diffs: dict[str, float] = {}
        with _stage(f"the TorchScript export of L{k}"):
            with torch.inference_mode():
                traced = torch.jit.trace(net, xt, check_trace=False)
            traced.save(str(work / "weights.torchscript.pt"))
            with torch.inference_mode():
                diffs["torchscript"] = float((traced(xt).numpy() - y).__abs__().max())
        names = ["batch", "channel", *(["z"] if dims == 3 else []), "y", "x"]
        with _stage(f"the ONNX export of L{k}"):
            torch.onnx.export(
                net,
                (xt,),
                str(work / "weights.onnx"),
                input_names=["raw"],
                output_names=["probabilities"],
                opset_version=17,
                dynamo=False,
                dynamic_axes={
                    "raw": {0: "batch", **{i: n for i, n in enumerate(names) if i >= 2}},
                    "probabilities": {0: "batch", **{i: n for i, n in enumerate(names) if i >= 2}},
                },
            )
            diffs["onnx"] = _onnx_difference(work / "weights.onnx", xn, y)
        worst = max(diffs.values())
        if worst > 1e-3:
            raise ExportError(f"the exported weights differ from predict by up to {worst:.2g}; not written.")
        say("cover, README and rdf.yaml")
        _cover(x, y, work / "cover.png")
        (work / "README.md").write_text(_readme(loaded, k, params, diffs), encoding="utf-8")
        with _stage("the bioimage.io description"):
            descr = _description(bio, loaded, k, work, x, y, authors)
        say(f"writing {out}")
        _write_package(descr, out, save_bioimageio_package, save_bioimageio_package_as_folder)
        return ExportResult(out, k, ["torchscript", "onnx"], diffs, params)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _stage(what: str) -> Iterator[None]:
    """Turn a failure of a third-party step (torch.jit, torch.onnx, onnxruntime) into one sentence naming it."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # TorchScript and ONNX raise anything from RuntimeError to their own errors
        raise ExportError(f"{what} failed ({_first_line(exc)}); nothing was written.") from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _write_package(descr: Any, out: Path, save_zip: Callable[..., Any], save_folder: Callable[..., Any]) -> None:
    """Write the package under a temporary name beside ``out`` and move it into place complete; on any failure
    the temporary file or folder is removed and ``out`` is as it was (an empty folder stays empty).

    Raises:
        ExportError: it could not be written (the message names ``out`` and why).
    """
    tmp = out.with_name(f".{out.name}.partial")
    _remove(tmp)  # what a killed export left
    try:
        if out.suffix.lower() == ".zip":
            save_zip(descr, output_path=tmp)
            os.replace(tmp, out)
        else:
            save_folder(descr, output_path=tmp)
            if out.is_dir():
                out.rmdir()  # empty (checked before the export); a folder cannot be renamed over one everywhere
            os.replace(tmp, out)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, UserError) or not isinstance(exc, Exception):
            raise
        raise ExportError(f"could not write {out}: {_first_line(exc)}; nothing was written.") from None


def _onnx_difference(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Largest difference of the ONNX weights' output from ``y`` (onnxruntime when installed; else unchecked, 0)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return 0.0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float(np.abs(sess.run(None, {"raw": x})[0] - y).max())


def _cover(x: np.ndarray, y: np.ndarray, path: Path) -> None:
    """Input and output side by side (2:1), the middle plane of a volume."""
    import imageio.v3 as iio

    def plane(a: np.ndarray) -> np.ndarray:
        a = a[0, 0] if a.ndim == 4 else a[0, 0, a.shape[2] // 2]
        lo, hi = np.percentile(a, [1, 99.8])
        return np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)

    prob = y[0, 0] if y.shape[1] == 1 else np.argmax(y[0], axis=0) / max(y.shape[1] - 1, 1)
    if prob.ndim == 3:
        prob = prob[prob.shape[0] // 2]
    left = plane(x)
    right = np.clip(prob, 0, 1)
    img = np.concatenate([left, right], axis=1)
    rgb = np.stack([img, img, img], -1)
    rgb[:, left.shape[1] :, 0] = right  # output in magenta
    rgb[:, left.shape[1] :, 1] = right * 0.2
    iio.imwrite(path, (rgb * 255).astype(np.uint8))


def _readme(model: Any, k: int, params: int, diffs: dict[str, float]) -> str:
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


def _description(bio: Any, model: Any, k: int, work: Path, x: np.ndarray, y: np.ndarray, authors: Any) -> Any:
    """The spec 0.5 ModelDescr."""
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
    import torch as _torch

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
                source=work / "weights.torchscript.pt", pytorch_version=bio.Version(_torch.__version__.split("+")[0])
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
