"""What runs inside a dask worker for :mod:`napari_unetpp.batch.distributed`: one file, one block of a split stack,
and the renumbering of a block's objects. Each worker loads a model once and keeps it, gives torch its share of the
cores, and a GPU worker takes the GPU its rank names.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from napari_unetpp.batch.files import PredictOptions, predict_file

__all__ = ["file_task", "block_task", "offset_task", "worker_device"]

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


def worker_device(device: str) -> str:
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


def file_task(src: str, dst: str, model_ref: str, opts: dict[str, Any]) -> dict[str, Any]:
    """:func:`~napari_unetpp.batch.files.predict_file` in a worker; the result as a dict (it travels back)."""
    import dask

    o = PredictOptions(**opts)
    o.device = worker_device(o.device)
    with dask.config.set(scheduler="synchronous"):  # a lazy input is read in this worker, not sent to the cluster
        res = predict_file(src, dst, _worker_model(model_ref), o)
    return asdict(res)


def block_task(
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
            device=worker_device(o.device),
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


def offset_task(tmp: str, folder: str, lo: int, hi: int, offset: int) -> None:
    """Number a block's objects on from the blocks before it (as a single process numbers them)."""
    import zarr

    target = zarr.open_array(str(Path(tmp) / folder / "0"), mode="r+")
    lab = np.asarray(target[lo:hi])
    lab[lab > 0] += np.uint32(offset)
    target[lo:hi] = lab
