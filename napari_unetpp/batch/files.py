"""Predicting files: one input to its outputs, and many inputs named by a folder or a pattern.

:func:`predict_file` is what ``napari-unetpp predict`` does for one input (read, resample to the model's pixel size,
predict, write, atomically); the CLI calls it for each input, and on a cluster each dask worker calls it too
(:mod:`napari_unetpp.batch.distributed`), so a distributed run writes exactly what a single process writes. "Batch"
here is files, not the batch size of the network (that is ``PredictOptions.batch_size``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_unetpp.errors import InputError

__all__ = ["PredictOptions", "FileResult", "expand_inputs", "output_for", "predict_file", "zoom_for_input"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".nii", ".nii.gz", ".zarr", ".dcm")


@dataclass
class PredictOptions:
    """The CLI's predict options, as plain values (they travel to dask workers)."""

    depth: int | None = None
    ensemble: bool = False
    all_levels: bool = False
    threshold: float = 0.5
    tile: int | None = None
    overlap: float = 0.125
    batch_size: int | None = None
    device: str = "auto"
    precision: str = "auto"
    runtime: str = "auto"
    objects: str = "none"
    axes: str | None = None
    channel: int | None = None
    window: str | None = None
    pixel_size: list[float] | None = None  # in the model's unit, per spatial axis or one for all
    diameter: float | None = None
    rescale: bool = True  # resample to the model's pixel size when the file records one

    def predict_kwargs(self) -> dict[str, Any]:
        """The arguments of :func:`~napari_unetpp.inference.predict.predict_iter` these options set (not ``axes``,
        ``device`` or ``zoom``, which the caller resolves)."""
        return {
            "depth": self.depth,
            "mode": "ensemble" if self.ensemble else "pruned",
            "levels": "all" if self.all_levels else (),
            "threshold": self.threshold,
            "tile": self.tile,
            "overlap": self.overlap,
            "batch_size": self.batch_size,
            "precision": self.precision,
            "runtime": self.runtime,
            "objects": self.objects,
            "channel": self.channel,
        }


@dataclass
class FileResult:
    """What :func:`predict_file` did: the summary line, notes for stderr, and the written paths."""

    source: str
    summary: str
    notes: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    objects: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------- inputs
def expand_inputs(spec: str) -> list[Path]:
    """The inputs a ``predict`` argument names: one file; an OME-Zarr; a DICOM series folder (one CT volume); a
    folder of images (its image files, sorted); or a glob pattern (``'data/*.tif'``, ``**`` for subfolders).

    Raises:
        InputError: nothing matches (one sentence naming the pattern or folder).
    """
    from napari_unetpp.io.ct import is_ct_path
    from napari_unetpp.io.zarr import is_zarr_path

    p = Path(spec)
    if p.exists() and (p.is_file() or is_zarr_path(p) or is_ct_path(p)):
        return [p]
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if _is_image(q))
        if not found:
            raise InputError(f"{p}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}) and no DICOM series.")
        return found
    if any(c in spec for c in "*?["):
        found = sorted(Path(m) for m in glob.glob(spec, recursive=True) if _is_image(Path(m)))
        if not found:
            raise InputError(f"no image matches {spec!r}; check the pattern (quote it so the shell leaves it alone).")
        return found
    raise InputError(f"{p}: no such file or folder.")


def _is_image(p: Path) -> bool:
    from napari_unetpp.io.ct import is_ct_path

    name = p.name.lower()
    if name.startswith("."):
        return False
    return name.endswith(IMAGE_SUFFIXES) or (p.is_dir() and is_ct_path(p))


def output_for(src: Path, out_dir: Path, objects: bool, fmt: str | None = None) -> Path:
    """``out_dir/<input name>_mask<ext>`` (``_objects`` with objects): the extension is ``fmt``, else the input's
    kind (TIFF -> ``.tif``, NIfTI and DICOM -> ``.nii.gz``, OME-Zarr -> ``.zarr``)."""
    name = src.name.rstrip("/")
    low = name.lower()
    stem = name
    for ext in (".nii.gz", ".ome.tiff", ".ome.tif", ".tiff", ".tif", ".nii", ".zarr", ".dcm"):
        if low.endswith(ext):
            stem = name[: -len(ext)]
            break
    if fmt is None:
        fmt = ".zarr" if low.endswith(".zarr") else ".tif" if low.endswith((".tif", ".tiff")) else ".nii.gz"
    return out_dir / f"{stem}_{'objects' if objects else 'mask'}{fmt}"


# ---------------------------------------------------------------------------------------------------- one file
def predict_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    model: Any,
    opts: PredictOptions,
    progress: Callable[[Any], None] | None = None,
) -> FileResult:
    """Segment one input and write its outputs (see ``napari-unetpp predict``): the mask (or instance labels), and
    with ``all_levels`` the probabilities of levels 1..k of the depth that runs beside it. ``.zarr`` outputs are
    written chunk by chunk as the prediction goes (bounded memory); other formats when the run is complete. Nothing
    is written on failure.

    Raises:
        UserError / ValueError: bad input or options (one sentence); MemoryError; RuntimeError (device problems).
    """
    from napari_unetpp.data.scale import spacing_note
    from napari_unetpp.inference.predict import predict_iter
    from napari_unetpp.io.images import output_kind, read_image, write_images
    from napari_unetpp.io.zarr import OmeZarrOutputs
    from napari_unetpp.jobs import run_to_end
    from napari_unetpp.model.registry import resolve_model

    dst = Path(dst)
    kind = output_kind(dst)
    img = read_image(src)
    from napari_unetpp.model.windowed import with_window

    loaded = with_window(resolve_model(model), opts.window, img.windows if img is not None else ())
    dims = loaded.module.config.spatial_dims
    spatial = "ZYX" if dims == 3 else "YX"
    notes: list[str] = []
    zoom, why = zoom_for_input(loaded.card, spatial, img, opts)
    if why:
        notes.append(why)
    if not opts.rescale and opts.pixel_size is None and opts.diameter is None:  # as it is: say if it differs
        training = loaded.card.training
        note = spacing_note(training.get("spacing"), img.scale, img.units, spatial, training.get("spacing_unit", ""))
        if note:
            notes.append(note)
    axes = opts.axes or img.axes
    out_axes = axes.replace("C", "")  # the outputs have no channel axis (probabilities of classes get one back)
    sink = None
    if kind == "zarr":
        publish = {"objects" if opts.objects != "none" else "mask": ""}
        if opts.all_levels:
            levels = range(1, loaded.max_depth + 1)  # those computed are published
            publish.update({f"L{lv}": f"_L{lv}" for lv in levels} | {"ensemble": "_ensemble"})
        sink = OmeZarrOutputs(dst, out_axes, img.scale, img.units, publish)
    try:
        gen = predict_iter(
            img.data, loaded, axes=axes, device=opts.device, zoom=zoom, allocate=sink, **opts.predict_kwargs()
        )
        res = run_to_end(gen, progress)
        nc = loaded.card.architecture.get("num_classes", 1)
        fg = _foreground(res.mask) if nc == 1 else None  # read before a zarr output moves into place
        if sink is not None:
            written = [str(p) for p in sink.publish()]
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    if opts.objects == "learned" and res.objects_method != "learned":
        notes.append(f"{loaded.card.id} has no learned object cue; objects were split with the watershed instead")
    if sink is None:
        scale = {k: v for k, v in img.scale.items() if k in res.axes}
        main = res.mask if res.objects is None else _compact(res.objects)
        outputs: list[tuple[Path, Any]] = [(dst, main)]
        if opts.all_levels:
            outputs += [(_beside(dst, f"_L{lv}"), p) for lv, p in res.probabilities.items()]
            if res.ensemble is not None:
                outputs.append((_beside(dst, "_ensemble"), res.ensemble))
        try:
            write_images(
                [(p, a, res.axes if a.ndim == len(res.axes) else "C" + res.axes, scale) for p, a in outputs],
                geometry=img.geometry if res.axes == "ZYX" else None,
                units=img.units,
            )
        except OSError as exc:
            raise OSError(
                f"could not write {exc.filename or dst}: {exc.strerror or exc}; nothing was written."
            ) from None
        written = [str(p) for p, _ in outputs]
    window = loaded.normalization.describe() if loaded.normalization.mode == "window" else ""
    summary = (
        f"{src}: {res.axes} {tuple(res.mask.shape)} with {loaded.card.id} at L{res.depth} ({res.mode}) on "
        f"{res.ran_on} in {res.seconds:.1f}s"
        + (f", foreground {fg:.1%}" if fg is not None else "")
        + (f", {window}" if window else "")
        + (f", {res.channels}" if res.channels else "")
        + (f", zoom {' x '.join(f'{z:.2f}' for z in zoom)}" if zoom else "")
        + (f", {res.objects_count} objects ({res.objects_method} split)" if res.objects is not None else "")
    )
    return FileResult(str(src), summary, notes, written, res.objects_count, res.seconds)


def zoom_for_input(card: Any, spatial: str, img: Any, opts: PredictOptions) -> tuple[tuple[float, ...] | None, str]:
    """The resampling to the model's scale from ``--diameter``, ``--pixel-size``, or the file's pixel size (only
    when the file names its unit), and a note saying what was done. Only the file's pixel size is bounded (a zoom
    beyond :data:`~napari_unetpp.data.scale.MAX_ZOOM` is refused); a diameter or pixel size the user gives is taken at
    its word, and only the memory the resampled image needs is checked."""
    from napari_unetpp.data.scale import zoom_for

    if opts.diameter is not None:
        return zoom_for(card, spatial, diameter=opts.diameter, max_zoom=None)
    if opts.pixel_size is not None:
        ps = list(opts.pixel_size)
        if len(ps) == 1:
            ps = ps * len(spatial) if len(spatial) == 2 else [img.scale.get("Z", ps[0]), ps[0], ps[0]]
        if len(ps) != len(spatial):
            raise ValueError(f"--pixel-size takes one value or {len(spatial)} ({', '.join(spatial)}), got {len(ps)}.")
        return zoom_for(card, spatial, dict(zip(spatial, ps)), "", max_zoom=None)
    if opts.rescale and img.scale and img.units:
        return zoom_for(card, spatial, img.scale, img.units)
    return None, ""


def _foreground(mask: Any) -> float:
    """Foreground fraction, plane by plane (a zarr output is never read whole)."""
    n = int(np.prod(mask.shape))
    if isinstance(mask, np.ndarray):
        return float(mask.mean())
    total = 0
    for i in range(mask.shape[0]):
        total += int(np.count_nonzero(np.asarray(mask[i])))
    return total / max(n, 1)


def _compact(labels: Any) -> Any:
    """Instance labels as uint16 when the IDs fit (what most readers expect), else uint32."""
    return labels.astype(np.uint16) if int(labels.max(initial=0)) < 2**16 else labels


def _beside(out: Path, tag: str) -> Path:
    """``mask.nii.gz`` + ``_L2`` -> ``mask_L2.nii.gz`` (compound extensions kept whole)."""
    name = out.name
    ext = ".nii.gz" if name.lower().endswith(".nii.gz") else out.suffix
    return out.with_name(name[: len(name) - len(ext)] + tag + ext)
