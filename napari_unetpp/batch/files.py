"""Batch prediction: one file to one output, many files, and scale-out on dask.distributed.

:func:`predict_file` is what ``napari-unetpp predict`` does for one input (read, resample to the model's pixel size,
predict, write, atomically); the CLI calls it for a single file, and for many files on a cluster each dask worker
calls it too, so a distributed run writes exactly what a single process writes.

Scale-out (:func:`run_distributed`) goes through dask.distributed on any cluster: ``local[:N]`` starts a
``LocalCluster`` of N single-threaded worker processes; ``tcp://HOST:PORT`` connects to a running scheduler (for
example one that dask-jobqueue started on SLURM). Work is split into files; one OME-Zarr stack is split into blocks
of planes (2D models; each plane is independent, and every block uses the statistics of the whole stack), written
straight into the output's chunks. Each worker loads the model once and keeps it; GPU workers take one device each.

The workers need the inputs, the outputs' folder and the model file at the same paths (a shared file system, as
on any cluster), and napari-unetpp installed.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_unetpp.errors import InputError, UserError

__all__ = [
    "PredictOptions",
    "FileResult",
    "expand_inputs",
    "output_for",
    "predict_file",
    "run_distributed",
    "parse_scheduler",
    "SchedulerError",
]

IMAGE_SUFFIXES = (".tif", ".tiff", ".nii", ".nii.gz", ".zarr", ".dcm")


class SchedulerError(UserError, ConnectionError):
    """The dask scheduler cannot be reached or started."""


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
    from napari_unetpp.inference.predict import predict_iter
    from napari_unetpp.io.ct import spacing_note
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
    zoom, why = _zoom(loaded.card, spatial, img, opts)
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
        f"{res.device} in {res.seconds:.1f}s"
        + (f", foreground {fg:.1%}" if fg is not None else "")
        + (f", {window}" if window else "")
        + (f", {res.channels}" if res.channels else "")
        + (f", zoom {' x '.join(f'{z:.2f}' for z in zoom)}" if zoom else "")
        + (f", {res.objects_count} objects ({res.objects_method} split)" if res.objects is not None else "")
    )
    return FileResult(str(src), summary, notes, written, res.objects_count, res.seconds)


def _zoom(card: Any, spatial: str, img: Any, opts: PredictOptions) -> tuple[tuple[float, ...] | None, str]:
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


# ---------------------------------------------------------------------------------------------------- dask
def parse_scheduler(spec: str | None) -> tuple[str, Any]:
    """``None``/``"none"`` -> ``("none", None)``; ``"local"`` or ``"local:N"`` -> ``("local", N)``;
    ``"tcp://host:port"`` (or ``tls://``) -> ``("address", spec)``.

    Raises:
        ValueError: anything else.
    """
    if spec is None or spec == "none":
        return "none", None
    if spec == "local" or spec.startswith("local:"):
        n = spec.partition(":")[2]
        if n and (not n.isdigit() or int(n) < 1):
            raise ValueError(f"--scheduler local:N needs a worker count of 1 or more, got {n!r}.")
        return "local", int(n) if n else max(1, (os.cpu_count() or 2) // 2)
    if "://" in spec:
        return "address", spec
    raise ValueError(f"--scheduler takes local, local:N or an address such as tcp://host:8786, got {spec!r}.")


_WORKER_MODELS: dict[str, Any] = {}  # model file -> loaded model, per worker process (loaded once)


def _worker_model(ref: str) -> Any:
    from napari_unetpp.model.registry import load_model

    if ref not in _WORKER_MODELS:
        _set_worker_threads()
        _WORKER_MODELS[ref] = load_model(ref)
    return _WORKER_MODELS[ref]


def _set_worker_threads() -> None:
    """Torch threads in a dask worker: its share of the cores. dask starts workers with OMP_NUM_THREADS=1 (its
    pre-spawn environment), which left torch on one core: 0.73 s per 512 x 512 EM slice at L3 against 0.31 s in a
    plain process on 2 cores (benchmarks/bench_distributed.py). ``NAPARI_UNETPP_THREADS`` (set for a LocalCluster)
    wins; else the cores this process may use divided by the worker's task threads."""
    import torch

    n = os.environ.get("NAPARI_UNETPP_THREADS")
    if n and n.isdigit():
        torch.set_num_threads(max(1, int(n)))
        return
    try:
        from distributed import get_worker

        tasks = int(get_worker().state.nthreads)
    except Exception:  # not in a worker, or another distributed version: leave torch as it is
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, tasks)))


def _worker_device(device: str) -> str:
    """A GPU worker takes the GPU its rank names (worker k of a LocalCluster: GPU k mod the count)."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu" if device == "auto" else device
    try:
        from distributed import get_worker

        name = get_worker().name
        rank = int(name) if str(name).isdigit() else abs(hash(name))
    except (ImportError, ValueError):
        rank = 0
    return f"cuda:{rank % torch.cuda.device_count()}"


def _file_task(src: str, dst: str, model_ref: str, opts: dict[str, Any]) -> dict[str, Any]:
    import dask

    o = PredictOptions(**opts)
    o.device = _worker_device(o.device)
    with dask.config.set(scheduler="synchronous"):  # a lazy input is read in this worker, not sent to the cluster
        res = predict_file(src, dst, _worker_model(model_ref), o)
    return asdict(res)


def _block_task(
    src: str,
    tmp: str,
    folders: dict[str, str],
    model_ref: str,
    opts: dict[str, Any],
    lo: int,
    hi: int,
    stats: Any,
    zoom: Any,
    by_rows: bool = False,
) -> dict[str, Any]:
    """Planes ``lo:hi`` along the stack's first axis (or, ``by_rows``, rows ``lo:hi`` along the first spatial axis
    of a single volume or plane, with the tiles that touch them) -> the same part of the outputs (``folders``:
    output name -> its zarr folder in ``tmp``; class-first probabilities are written as such)."""
    import dask
    import zarr

    from napari_unetpp.inference.predict import predict
    from napari_unetpp.io.images import read_image

    o = PredictOptions(**opts)
    img = read_image(src)
    with dask.config.set(scheduler="synchronous"):  # read the tiles here, not through the cluster
        res = predict(
            img.data if by_rows else img.data[lo:hi],
            _worker_model(model_ref),
            axes=o.axes or img.axes,
            device=_worker_device(o.device),
            stats=stats,
            zoom=zoom,
            rows=(lo, hi) if by_rows else None,
            **o.predict_kwargs(),
        )
    arrays: dict[str, Any] = {"mask": res.mask, "objects": res.objects, "ensemble": res.ensemble}
    arrays.update({f"L{lv}": p for lv, p in res.probabilities.items()})
    for name, folder in folders.items():
        arr = arrays.get(name)
        if arr is None:
            continue
        target = zarr.open_array(str(Path(tmp) / folder / "0"), mode="r+")
        if arr.ndim == res.mask.ndim + 1:  # (classes, planes, ...)
            target[:, lo:hi] = arr
        else:
            target[lo:hi] = arr
    return {"lo": lo, "hi": hi, "objects": int(res.objects_count), "seconds": res.seconds}


def _offset_task(tmp: str, folder: str, lo: int, hi: int, offset: int) -> None:
    """Number a block's objects on from the blocks before it (as a single process numbers them)."""
    import zarr

    target = zarr.open_array(str(Path(tmp) / folder / "0"), mode="r+")
    lab = np.asarray(target[lo:hi])
    lab[lab > 0] += np.uint32(offset)
    target[lo:hi] = lab


def connect(spec: str) -> Any:
    """A dask.distributed ``Client`` for ``--scheduler`` (a new LocalCluster, or an existing scheduler).

    Raises:
        SchedulerError: distributed is not installed, or the scheduler cannot be reached (one sentence).
    """
    kind, value = parse_scheduler(spec)
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise SchedulerError("--scheduler needs dask.distributed: pip install 'napari-unetpp[distributed]'") from None
    import logging

    logging.getLogger("distributed").setLevel(logging.WARNING)  # its start and stop chatter
    if kind == "local":
        import dask

        threads = max(1, (os.cpu_count() or 2) // int(value))
        # the workers' statistical profiler samples every thread each 10 ms: it cost 12 % of a worker's speed here
        with dask.config.set({"distributed.worker.profile.enabled": False}):
            cluster = _local_cluster(LocalCluster, int(value), threads)
        return Client(cluster)
    try:
        return Client(value, timeout="5s")
    except (OSError, TimeoutError) as exc:
        raise SchedulerError(f"cannot reach the dask scheduler at {value} ({exc}); is it running?") from None


def _local_cluster(LocalCluster: Any, n: int, threads: int) -> Any:
    import logging

    return LocalCluster(
        silence_logs=logging.WARNING,
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        env={
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "NAPARI_UNETPP_THREADS": str(threads),
        },
    )


def run_distributed(
    jobs: Sequence[tuple[Path, Path]],
    model_ref: str,
    opts: PredictOptions,
    scheduler: str,
    on_done: Callable[[FileResult], None] | None = None,
    on_failed: Callable[[str, BaseException], None] | None = None,
) -> list[FileResult]:
    """Run ``(input, output)`` jobs on a dask cluster, one task per file (see the module docstring); results come
    back as they finish (``on_done``), failures are reported per file (``on_failed``) and do not stop the others.

    Raises:
        SchedulerError: the cluster cannot be started or reached.
    """
    from distributed import as_completed

    client = connect(scheduler)
    try:
        futures = {
            client.submit(
                _file_task, str(s), str(d), model_ref, asdict(opts), pure=False, key=f"unetpp-{i}-{s.name}"
            ): s
            for i, (s, d) in enumerate(jobs)
        }
        out: list[FileResult] = []
        for fut in as_completed(futures):
            try:
                res = FileResult(**fut.result())
            except Exception as exc:  # one bad file does not stop the others
                if on_failed is not None:
                    on_failed(str(futures[fut]), exc)
                continue
            out.append(res)
            if on_done is not None:
                on_done(res)
        return out
    finally:
        _close(client)


def predict_stack_distributed(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    model_ref: str,
    opts: PredictOptions,
    scheduler: str,
    block: int | None = None,
    on_block: Callable[[int, int], None] | None = None,
) -> FileResult:
    """One image split over a dask cluster and written into the ``.zarr`` output ``dst`` chunk by chunk.

    A stack is split into blocks of planes along its first axis (Z or T of a 2D model, T of a 3D one); objects are
    numbered on across blocks. A single volume (3D model) or plane (2D model) is split into blocks of rows along its
    first spatial axis, each block running the tiles of the whole image's tile plan that touch its rows (a halo of
    the tile overlap), so its rows equal the whole run's exactly (no objects or resampling there). Every block uses
    the whole image's normalisation statistics, so the output equals a single process's. ``block``: planes or rows
    per task (default: about four tasks per worker, and at least one tile of rows). ``on_block(done, total)``.

    Raises:
        InputError: C before the stack axis; objects or resampling for a split volume or plane;
        SchedulerError: the cluster cannot be started or reached.
    """
    import time
    from dataclasses import replace

    from distributed import as_completed

    from napari_unetpp.inference.predict import normalization_stats, plan_prediction
    from napari_unetpp.io.images import output_kind, read_image
    from napari_unetpp.io.zarr import OmeZarrOutputs
    from napari_unetpp.model.registry import load_model
    from napari_unetpp.runtimes.backends import resolve_runtime
    from napari_unetpp.runtimes.device import resolve_device

    t0 = time.perf_counter()
    dst = Path(dst)
    if output_kind(dst) != "zarr":
        raise InputError(f"splitting one stack over a cluster writes OME-Zarr; name the output {dst.stem}.zarr.")
    img = read_image(src)
    from napari_unetpp.model.windowed import with_window

    loaded = with_window(load_model(model_ref), opts.window, img.windows if img is not None else ())
    axes = opts.axes or img.axes
    cfg = loaded.module.config
    spatial = "ZYX" if cfg.spatial_dims == 3 else "YX"
    loop = [a for a in axes if a not in spatial + "C"]
    by_rows = not loop
    if loop and axes[0] != loop[0]:
        raise InputError(
            f"{src}: axes {axes} put C before the stack axis; split stacks whose first axis is Z or T, or run it "
            "without --scheduler."
        )
    zoom, why = _zoom(loaded.card, spatial, img, opts)
    if by_rows and (opts.objects != "none" or zoom is not None):
        raise InputError(
            f"{src} is one {'volume' if cfg.spatial_dims == 3 else 'plane'}: split by rows, it cannot be "
            + ("split into objects" if opts.objects != "none" else "resampled")
            + "; run it without --scheduler."
        )
    stats = normalization_stats(img.data, loaded, axes=axes, channel=opts.channel)
    kw = {k: v for k, v in opts.predict_kwargs().items() if k not in ("precision", "runtime")}  # the plan runs nothing
    plan = plan_prediction(img.data, loaded, axes=axes, device="cpu", stats=stats, **kw)
    if opts.runtime == "auto" and opts.device in ("auto", "cpu") and resolve_device(opts.device).type == "cpu":
        # one runtime for every block (the runtimes differ by float rounding): the whole run's choice
        chosen = resolve_runtime(
            loaded,
            plan.net,
            plan.depth,
            plan.device,
            opts.precision,
            plan.tiles.tile_shape,
            "auto",
            plan.batch_shape_tiles,
        )
        opts = replace(opts, runtime=chosen)
    out_axes = plan.lay.out_axes
    main = "objects" if plan.objects != "none" else "mask"
    publish = {main: ""}
    if opts.all_levels:
        publish.update({f"L{lv}": f"_L{lv}" for lv in plan.keep_levels})
        if plan.mode == "ensemble":
            publish["ensemble"] = "_ensemble"
    sink = OmeZarrOutputs(dst, out_axes, img.scale, img.units, publish)
    try:
        n = plan.spatial_shape[0] if by_rows else int(img.data.shape[0])
        client = connect(scheduler)
        try:
            workers = max(1, len(client.scheduler_info().get("workers", {})))
            least = plan.tiles.tile_shape[0] if by_rows else 1  # a block of rows costs its touching tile rows
            size = block or max(least, -(-n // (4 * workers)))
            # each block must own whole chunks: two workers writing rows of one chunk lose each other's rows
            sink.chunk_rows = size if by_rows else None
            result = plan.allocate(sink)
            bounds = [(lo, min(n, lo + size)) for lo in range(0, n, size)]
            folders = {name: sink.folders[name] for name in publish}
            if main == "objects":
                folders["objects"] = sink.folders["objects"]
            futs = [
                client.submit(
                    _block_task,
                    str(src),
                    str(sink.tmp),
                    folders,
                    model_ref,
                    asdict(opts),
                    lo,
                    hi,
                    stats,
                    zoom,
                    by_rows,
                    pure=False,
                    key=f"unetpp-block-{lo}",
                )
                for lo, hi in bounds
            ]
            counts: dict[int, int] = {}
            seconds = 0.0
            for i, fut in enumerate(as_completed(futs), start=1):
                r = fut.result()
                counts[r["lo"]] = r["objects"]
                seconds += r["seconds"]
                if on_block is not None:
                    on_block(i, len(futs))
            total_objects = 0
            if main == "objects":  # number each block's objects on from the blocks before it
                offs = []
                for lo, hi in bounds:
                    if total_objects and counts[lo]:
                        offs.append(
                            client.submit(_offset_task, str(sink.tmp), folders["objects"], lo, hi, total_objects)
                        )
                    total_objects += counts[lo]
                for f in offs:
                    f.result()
        finally:
            _close(client)
        written = [str(p) for p in sink.publish()]
    except BaseException:
        sink.discard()
        raise
    del result
    summary = (
        f"{src}: {out_axes} {plan.out_shape} with {loaded.card.id} at L{plan.depth} ({plan.mode}) on {workers} "
        f"dask worker(s), {len(bounds)} blocks of {'rows' if by_rows else 'planes'} in "
        f"{time.perf_counter() - t0:.1f}s ({seconds:.1f}s of prediction)"
        + (f", zoom {' x '.join(f'{z:.2f}' for z in zoom)}" if zoom else "")
        + (f", {total_objects} objects ({plan.objects} split)" if main == "objects" else "")
    )
    return FileResult(str(src), summary, [why] if why else [], written, total_objects, seconds)


def _close(client: Any) -> None:
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()
