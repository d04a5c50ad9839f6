"""Export a pruned level to the bioimage.io model zoo format (spec 0.5).

:func:`export_bioimageio` writes a model package (a ``.zip``, or a folder) that any bioimage.io consumer runs
(bioimageio.core, deepImageJ, ilastik, the BioImage Model Zoo): the sub-network of depth k alone
(:meth:`~napari_unetpp.model.network.UNetPlusPlus.pruned`: only its parameters), as TorchScript and ONNX weights
(our own safetensors files are not a bioimage.io weights format); the card's normalisation as the spec's
preprocessing; a test input of the model's own domain and the test output our
:func:`~napari_unetpp.inference.predict.predict` computes for it; a cover image; and a README with the card
(training data, citations, licence, per-level scores, the recommended depth). The description, README and cover are
written by :mod:`napari_unetpp.export.description`; the package is moved into place complete.

The exported network outputs probabilities (sigmoid of head k for a 1-class model, softmax over classes otherwise);
a learned instance cue is not exported. Inputs are one image (batch, channel, [z,] y, x) whose spatial sizes are
multiples of the network's pooling (the package says so). The percentile normalisation is computed per image by
consumers (per plane for a stack fed plane by plane); ``predict`` computes it once per stack, so results on a stack
can differ slightly from the tool's own.

Needs ``onnx`` and ``bioimageio.spec`` (``pip install "napari-unetpp[export]"``).
"""

from __future__ import annotations

import contextlib
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
from napari_unetpp.export.description import cover_image, model_description, readme_text
from napari_unetpp.model.network import PrunedUNetPlusPlus, probabilities, run_nodes
from napari_unetpp.paths import move_into_place, remove_partial, samples_dir

__all__ = ["export_bioimageio", "ExportResult", "ExportError", "exported_network"]

SAMPLES = samples_dir()


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
        # the nodes and head k alone, without the pruned network's pad-and-crop (a trace would freeze its sizes):
        # inputs are multiples of the pooling, as the package declares; the instance cue is not computed at all (a
        # package holds none), rather than computed and sliced off
        net: PrunedUNetPlusPlus = self.net
        top = run_nodes(net.nodes, x, net.depth, net.pools)[0, net.depth]
        return probabilities(net.head(top), self.num_classes, dim=1)


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
        bounds = [norm.bounds(x[0, c]) for c in range(x.shape[1])]
        xn = np.stack([norm.apply(x[0, c], b) for c, b in enumerate(bounds)])[None]
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
        cover_image(x, y, work / "cover.png")
        (work / "README.md").write_text(readme_text(loaded, k, params, diffs), encoding="utf-8")
        with _stage("the bioimage.io description"):
            descr = model_description(bio, loaded, k, work, x, y, authors)
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _write_package(descr: Any, out: Path, save_zip: Callable[..., Any], save_folder: Callable[..., Any]) -> None:
    """Write the package under the partial name ``.<name>.partial`` beside ``out`` (first removing one a killed
    export left there) and move it into place complete; on any failure the partial file or folder is removed and
    ``out`` is as it was (an empty folder stays empty).

    Raises:
        ExportError: it could not be written (the message names ``out`` and why).
    """
    tmp = out.with_name(f".{out.name}.partial")
    remove_partial(tmp)  # what a killed export left
    try:
        if out.suffix.lower() == ".zip":
            save_zip(descr, output_path=tmp)
        else:
            save_folder(descr, output_path=tmp)
            if out.is_dir():
                out.rmdir()  # empty (checked before the export); a folder cannot be renamed over one everywhere
        move_into_place(tmp, out)
    except BaseException as exc:
        remove_partial(tmp)
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
