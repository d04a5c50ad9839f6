"""OME-Zarr (NGFF) input and output: lazy, chunked, bounded memory.

Reading opens the finest resolution level of an OME-Zarr image (NGFF 0.4 on zarr v2, or 0.5 on zarr v3) as a dask
array, so prediction reads only the chunks its tiles touch; the axes, pixel size and unit come from the
``multiscales`` metadata. A plain zarr array (no OME metadata) is read too, with guessed axes.

Writing creates OME-Zarr images (NGFF 0.4 on zarr v2: what napari-ome-zarr and ome-zarr-py read) in a temporary
folder beside the target, and :meth:`OmeZarrOutputs.publish` moves them into place when complete, so a failed or
cancelled run leaves whatever was at the target untouched. :class:`ArrayView` lets the prediction loop write rows of
planes straight into the zarr chunks (``view[plane][rows] = values``), so no output is ever held whole in memory.

zarr is imported here only, when a ``.zarr`` path is used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_unetpp.data.axes import guess_axes
from napari_unetpp.data.scale import NGFF_UNITS, short_unit
from napari_unetpp.errors import ReadError
from napari_unetpp.paths import move_all_into_place, partial_beside, remove_partial

__all__ = ["is_zarr_path", "read_ome_zarr", "OmeZarrOutputs", "ArrayView"]

_TYPES = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}


def is_zarr_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a zarr store: a name ending in ``.zarr``, or a folder with zarr metadata."""
    p = Path(path)
    if p.name.lower().rstrip("/").endswith(".zarr"):
        return True
    return p.is_dir() and any((p / m).exists() for m in (".zgroup", ".zarray", "zarr.json"))


def _zarr() -> Any:
    try:
        import zarr
    except ImportError:  # pragma: no cover - zarr is a dependency
        raise ReadError(
            ".zarr files need the zarr package (zarr 3, on Python 3.11 or newer): pip install zarr"
        ) from None
    return zarr


def read_ome_zarr(path: str | os.PathLike[str]) -> tuple[Any, str, dict[str, float], str, dict[str, Any]]:
    """The finest resolution level of an OME-Zarr image, lazily.

    Returns:
        ``(data, axes, scale, units, metadata)``: a dask array, axis letters from TCZYX, pixel size per spatial axis
        letter (in ``units``), the spatial unit (``"um"``, ``"nm"``, ``"mm"`` or ``""`` when the file says none),
        and what the file says about itself (NGFF version, dataset path, name).

    Raises:
        ReadError: not a zarr store, or one without an image array (one sentence).
    """
    import dask.array as da

    zarr = _zarr()
    p = Path(path)
    if not p.exists():
        raise ReadError(f"{p}: no such zarr store.")
    try:
        node = zarr.open(str(p), mode="r")
    except Exception as exc:  # zarr raises several types for a folder that is not a store
        raise ReadError(f"{p}: not a readable zarr store ({type(exc).__name__}: {exc}).") from None
    if hasattr(node, "shape"):  # a bare array
        arr = node
        return da.from_zarr(arr), guess_axes(arr.shape), {}, "", {"format": "zarr array"}
    attrs = dict(node.attrs)
    ome = attrs.get("ome", attrs)  # NGFF 0.5 nests everything under "ome"
    ms = ome.get("multiscales")
    if not ms:
        names = sorted(node.array_keys())
        if not names:
            raise ReadError(f"{p}: this zarr group holds no arrays and no OME-Zarr image; give the image's .zarr.")
        arr = node[names[0]]
        return da.from_zarr(arr), guess_axes(arr.shape), {}, "", {"format": "zarr group", "dataset": names[0]}
    first = ms[0]
    datasets = first.get("datasets") or []
    if not datasets:
        raise ReadError(f"{p}: the OME-Zarr metadata lists no datasets; the file is incomplete.")
    ds_path = datasets[0]["path"]
    try:
        arr = node[ds_path]
    except KeyError:
        raise ReadError(f"{p}: the OME-Zarr dataset {ds_path!r} is missing; the file is incomplete.") from None
    raw_axes = first.get("axes")
    axes, unit = _axes(raw_axes, tuple(arr.shape))
    scale = _scale(first, datasets[0], axes)
    meta = {
        "format": f"OME-Zarr {ome.get('version') or first.get('version', '?')}",
        "dataset": ds_path,
        "name": first.get("name", ""),
    }
    return da.from_zarr(arr), axes, scale, unit, meta


def _axes(raw: Any, shape: tuple[int, ...]) -> tuple[str, str]:
    """Axis letters and the spatial unit from NGFF ``axes`` (dicts since 0.4, plain names in 0.3)."""
    if not raw or len(raw) != len(shape):
        return guess_axes(shape), ""
    names = [(a["name"] if isinstance(a, dict) else str(a)).upper() for a in raw]
    units = {a.get("unit") for a in raw if isinstance(a, dict) and a.get("type") == "space" and a.get("unit")}
    axes = "".join(names)
    if any(a not in "TCZYX" for a in axes) or len(set(axes)) != len(axes):
        axes = guess_axes(shape)
    return axes, short_unit(units.pop()) if len(units) == 1 else ""


def _scale(multiscale: dict[str, Any], dataset: dict[str, Any], axes: str) -> dict[str, float]:
    """Pixel size per spatial axis: the dataset's scale transform times the multiscale's own (if any)."""
    s = np.ones(len(axes))
    for transforms in (dataset.get("coordinateTransformations"), multiscale.get("coordinateTransformations")):
        for t in transforms or []:
            if t.get("type") == "scale" and len(t.get("scale", [])) == len(axes):
                s = s * np.asarray(t["scale"], dtype=float)
    out = {a: float(v) for a, v in zip(axes, s) if a in "ZYX" and v > 0}
    return {} if all(v == 1.0 for v in out.values()) else out


def _chunks(shape: Sequence[int], axes: str) -> tuple[int, ...]:
    """One plane per chunk along T, C and Z (the prediction writes plane by plane, row band by row band), up to
    1024 x 1024 in-plane."""
    return tuple(min(int(n), 1024) if a in "YX" else 1 for n, a in zip(shape, axes))


class OmeZarrOutputs:
    """OME-Zarr images made in a temporary folder beside ``target`` and moved into place by :meth:`publish`.

    Called as ``outputs(shape, dtype, name)`` it creates an empty image (fill 0) and returns an :class:`ArrayView` of
    it: the ``allocate`` hook of :func:`~napari_unetpp.inference.predict.predict_iter`, so the prediction writes rows
    straight into chunks. Names listed in ``publish`` become ``target`` with that suffix (``"mask": ""`` is
    ``target`` itself; ``"L2": "_L2"`` is ``mask_L2.zarr`` beside it); the others are scratch (e.g. the mask a split
    into objects reads back) and are removed with the temporary folder.

    Args:
        target: The ``.zarr`` folder to create (its parent must exist).
        axes: Axis letters of the outputs without channels; arrays with one more dimension get a leading ``C``.
        scale: Pixel size per spatial axis letter; ``units`` its unit (``"um"``, ``"nm"``, ``"mm"``).
        publish: Output name -> suffix.
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        axes: str,
        scale: dict[str, float] | None = None,
        units: str = "",
        publish: dict[str, str] | None = None,
    ) -> None:
        self.zarr = _zarr()
        self.target = Path(target)
        self.axes, self.scale, self.units = axes, dict(scale or {}), units
        self.names = dict(publish if publish is not None else {"mask": ""})
        self.tmp = partial_beside(self.target, folder=True)
        self.arrays: dict[str, Any] = {}
        self.folders: dict[str, str] = {}  # output name -> its folder in ``tmp``
        self.chunk_rows: int | None = None  # chunk along the first spatial axis (blocks of rows own whole chunks)

    def __call__(self, shape: tuple[int, ...], dtype: str, name: str = "mask") -> ArrayView:
        axes = self.axes if len(shape) == len(self.axes) else "C" + self.axes
        if len(axes) != len(shape):
            axes = guess_axes(shape)
        folder = self.tmp / (_name(self.target, self.names[name]) if name in self.names else f"scratch-{name}.zarr")
        group = self.zarr.open_group(str(folder), mode="w", zarr_format=2)
        chunks = list(_chunks(shape, axes))
        first = next((i for i, a in enumerate(axes) if a in "ZYX"), None)
        if self.chunk_rows and first is not None:
            chunks[first] = min(int(shape[first]), int(self.chunk_rows))
        arr = group.create_array("0", shape=shape, dtype=dtype, chunks=tuple(chunks), fill_value=0)
        group.attrs["multiscales"] = [_multiscale(folder.stem, axes, self.scale, self.units)]
        self.arrays[name] = arr
        self.folders[name] = folder.name
        return ArrayView(arr)

    def moves(self) -> list[tuple[Path, Path]]:
        """``(complete image in the temporary folder, its target)`` for every published name that was written."""
        out = []
        for name, suffix in self.names.items():
            src = self.tmp / _name(self.target, suffix)
            if name in self.arrays and src.exists():
                out.append((src, self.target.parent / _name(self.target, suffix)))
        return out

    def publish(self) -> list[Path]:
        """Move the complete images into place together (:func:`~napari_unetpp.paths.move_all_into_place`: an old
        folder is removed only once the new one is in place), then remove the temporary folder with the scratch
        arrays."""
        moves = self.moves()
        move_all_into_place(moves)
        self.discard()
        return [dst for _, dst in moves]

    def discard(self) -> None:
        """Remove the temporary folder and what is still in it (all of it after a failed or cancelled run: the
        targets stay as they were)."""
        remove_partial(self.tmp)


def _name(target: Path, suffix: str) -> str:
    stem = target.name[: -len(".zarr")] if target.name.lower().endswith(".zarr") else target.name
    return f"{stem}{suffix}.zarr"


def _multiscale(name: str, axes: str, scale: dict[str, float], units: str) -> dict[str, Any]:
    ax = []
    for a in axes:
        d: dict[str, Any] = {"name": a.lower(), "type": _TYPES[a]}
        if a in "ZYX" and units in NGFF_UNITS:
            d["unit"] = NGFF_UNITS[units]
        ax.append(d)
    return {
        "version": "0.4",
        "name": name,
        "axes": ax,
        "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [scale.get(a, 1.0) for a in axes]}]}
        ],
    }


class ArrayView:
    """A writable view of a zarr (or any sliceable) array under basic indexing and transposition.

    ``view[i][a:b] = v`` writes into the target as ``target[i, a:b] = v`` would into a numpy array, chunk by chunk;
    ``np.asarray(view)`` reads the part it covers. Integers and step-1 slices only (what the prediction loop uses).
    """

    def __init__(self, target: Any, base: list[Any] | None = None, dims: list[int] | None = None) -> None:
        self.target = target
        self.base = base if base is not None else [slice(0, int(n)) for n in target.shape]
        self.dims = dims if dims is not None else list(range(len(target.shape)))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base[d].stop - self.base[d].start for d in self.dims)

    @property
    def ndim(self) -> int:
        return len(self.dims)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.target.dtype)

    def transpose(self, order: Sequence[int]) -> ArrayView:
        return ArrayView(self.target, self.base, [self.dims[o] for o in order])

    def _compose(self, key: Any) -> tuple[list[Any], list[int]]:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > self.ndim:
            raise IndexError(f"too many indices ({len(key)}) for a view of {self.ndim} dimensions")
        base, dims = list(self.base), []
        for vi, d in enumerate(self.dims):
            b: slice = self.base[d]
            n = b.stop - b.start
            k = key[vi] if vi < len(key) else slice(None)
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    raise IndexError("ArrayView takes step-1 slices only")
                base[d] = slice(b.start + start, b.start + max(start, stop))
                dims.append(d)
            else:
                i = int(k)
                i = i + n if i < 0 else i
                if not 0 <= i < n:
                    raise IndexError(f"index {k} out of range for an axis of {n}")
                base[d] = b.start + i
        return base, dims

    def __getitem__(self, key: Any) -> ArrayView:
        base, dims = self._compose(key)
        return ArrayView(self.target, base, dims)

    def __setitem__(self, key: Any, value: Any) -> None:
        base, dims = self._compose(key)
        shape = tuple(base[d].stop - base[d].start for d in dims)
        v = np.broadcast_to(np.asarray(value, dtype=self.dtype), shape)
        order = sorted(dims)
        self.target[tuple(base)] = np.ascontiguousarray(v.transpose([dims.index(d) for d in order]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = np.asarray(self.target[tuple(self.base)])
        order = sorted(self.dims)
        data = data.transpose([order.index(d) for d in self.dims])
        return data.astype(dtype) if dtype is not None else data
