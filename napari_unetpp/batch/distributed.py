"""Scale-out on dask.distributed: many files, or one OME-Zarr image split into blocks, on any cluster.

``--scheduler`` (:func:`parse_scheduler`): ``local[:N]`` starts a ``LocalCluster`` of N single-threaded worker
processes; ``tcp://HOST:PORT`` connects to a running scheduler (for example one that dask-jobqueue started on SLURM).
Work is split into files (:func:`run_distributed`); one OME-Zarr stack is split into blocks of planes (2D models; each
plane is independent, and every block uses the statistics of the whole stack), and a single volume or plane into
blocks of rows (:func:`predict_stack_distributed`), written straight into the output's chunks. What the workers run
is in :mod:`napari_unetpp.batch.tasks`: each loads the model once and keeps it; GPU workers take one device each.

The workers need the inputs, the outputs' folder and the model file at the same paths (a shared file system, as
on any cluster), and napari-unetpp installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from napari_unetpp.batch.files import FileResult, PredictOptions, zoom_for_input
from napari_unetpp.batch.tasks import block_task, file_task, offset_task
from napari_unetpp.errors import InputError, UserError

__all__ = [
    "SchedulerError",
    "parse_scheduler",
    "connect",
    "local_cluster",
    "run_distributed",
    "predict_stack_distributed",
]


class SchedulerError(UserError, ConnectionError):
    """The dask scheduler cannot be reached or started."""


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


def connect(spec: str) -> Any:
    """A dask.distributed ``Client`` for ``--scheduler`` (a new :func:`local_cluster`, or an existing scheduler).

    Raises:
        SchedulerError: distributed is not installed, or the scheduler cannot be reached (one sentence).
    """
    kind, value = parse_scheduler(spec)
    try:
        from distributed import Client
    except ImportError:
        raise SchedulerError("--scheduler needs dask.distributed: pip install 'napari-unetpp[distributed]'") from None
    import logging

    logging.getLogger("distributed").setLevel(logging.WARNING)  # its start and stop chatter
    if kind == "local":
        return Client(local_cluster(int(value)))
    try:
        return Client(value, timeout="5s")
    except (OSError, TimeoutError) as exc:
        raise SchedulerError(f"cannot reach the dask scheduler at {value} ({exc}); is it running?") from None


def local_cluster(n: int, threads: int | None = None) -> Any:
    """A ``LocalCluster`` of ``n`` single-threaded worker processes (what ``--scheduler local:N`` starts), each
    running torch on ``threads`` cores (default: its share of this machine's), without a dashboard or the workers'
    profiler. Close it when done (a ``Client`` of it closes only itself)."""
    import logging

    import dask
    from distributed import LocalCluster

    threads = threads or max(1, (os.cpu_count() or 2) // n)
    # the workers' statistical profiler samples every thread each 10 ms: it cost 12 % of a worker's speed here
    with dask.config.set({"distributed.worker.profile.enabled": False}):
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
            client.submit(file_task, str(s), str(d), model_ref, asdict(opts), pure=False, key=f"unetpp-{i}-{s.name}"): s
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
    from napari_unetpp.runtimes import resolve_device, resolve_runtime

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
    zoom, why = zoom_for_input(loaded.card, spatial, img, opts)
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
        chosen, chosen_precision = resolve_runtime(
            loaded,
            plan.net,
            plan.depth,
            plan.device,
            opts.precision,
            plan.tiles.tile_shape,
            "auto",
            plan.batch_shape_tiles,
        )
        opts = replace(opts, runtime=chosen, precision=chosen_precision)
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
                    block_task,
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
                            client.submit(offset_task, str(sink.tmp), folders["objects"], lo, hi, total_objects)
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
