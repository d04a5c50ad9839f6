"""Zoom as an adapter around the one sliding window: resample in, run, resample out.

:class:`Zoomed` resamples the image by the zoom factors (linearly, per plane, in float32, with the normalisation
statistics of the image as it is, so resampling does not move them) and says how to plan the run on the resampled
image; :meth:`Zoomed.around` wraps that run (the same
:func:`~napari_unetpp.inference.sliding_window.sliding_window` every prediction runs) and resamples its outputs back to
the image's shape and axis order: probabilities and cues linearly, the mask from the resampled probabilities
(:func:`~napari_unetpp.inference.masks.mask_from`), objects by nearest neighbour. The resampled image and the run's
float32 outputs are held in memory (checked first: :func:`~napari_unetpp.data.scale.check_zoom_fits`); planes are
announced done only at the end.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from napari_unetpp.data.axes import fit_channels, layout
from napari_unetpp.data.normalization import check_pixels
from napari_unetpp.data.scale import check_zoom_fits, resize_plane, zoomed_shape
from napari_unetpp.inference.masks import mask_from
from napari_unetpp.inference.plan import image_stats, kept_levels
from napari_unetpp.inference.result import Allocator, Prediction, Progress, empty_prediction
from napari_unetpp.inference.writer import as_prob
from napari_unetpp.model.registry import resolve_model

__all__ = ["Zoomed", "zooms"]


def zooms(zoom: Sequence[float] | None) -> bool:
    """Whether ``zoom`` resamples at all (a factor other than 1)."""
    return zoom is not None and any(abs(float(f) - 1.0) > 1e-6 for f in zoom)


class Zoomed:
    """``image`` resampled by ``zoom`` for ``model``, with the plan's arguments ``kw`` (those of
    :func:`~napari_unetpp.inference.plan.plan_prediction`, including ``axes``, ``channel``, ``depth`` and
    ``levels``).

    Attributes:
        image: The resampled image, float32, axes (loop..., [C], spatial...).
        plan_kwargs: The arguments to plan the run on :attr:`image` with (its axes, depth k, the levels the result
            needs, float32 probabilities, the image's statistics).

    Raises:
        ValueError: a zoom factor count that does not match the spatial axes.
        InputError: bad axes or channels, non-finite pixels.
        ZoomError: the resampled image and outputs would not fit in memory.
    """

    def __init__(self, image: Any, model: Any, zoom: Sequence[float], kw: dict[str, Any]) -> None:
        kw = dict(kw)
        self.model = loaded = resolve_model(model)
        cfg = loaded.module.config
        src, axes, _ = fit_channels(image, kw.pop("axes"), cfg.spatial_dims, cfg.in_channels, kw.pop("channel"))
        lay = layout(src, axes, cfg.spatial_dims)
        if len(zoom) != len(lay.spatial):
            raise ValueError(f"zoom needs {len(lay.spatial)} factors (axes {lay.spatial}), got {tuple(zoom)}.")
        norm = kw.get("normalization") or loaded.normalization
        if kw.get("stats") is None:
            kw["stats"] = image_stats(lay, norm)  # of the image as it is, so resampling does not move the statistics
        self.spatial = sp = tuple(int(lay.src.shape[len(lay.loop) + lay.has_c + i]) for i in range(len(lay.spatial)))
        zsp = zoomed_shape(sp, zoom)
        self.loop_shape = loop_shape = tuple(int(n) for n in lay.src.shape[: len(lay.loop)])
        chans = (lay.n_ch,) if lay.has_c else ()
        inner_axes = "".join(lay.loop) + ("C" if lay.has_c else "") + lay.spatial
        depth = kw.pop("depth")
        self.depth = k = loaded.module.check_depth(depth if depth is not None else loaded.card.recommended_depth)
        self.levels = kept_levels(kw.pop("levels"), k)
        self.mode = mode = kw["mode"]
        inner_levels = sorted(set(self.levels) | ({k} if mode == "pruned" else set()))
        # before allocating: the resampled image (float32 per channel) and what predict computes on it (float32
        # probabilities per class of each level kept and of the ensemble, the mask) must fit in memory
        n_maps = len(inner_levels) + (mode == "ensemble")
        check_zoom_fits((*loop_shape, *sp), zoom, 4 * lay.n_ch + 4 * cfg.num_classes * n_maps + 1)
        self.image = small = np.empty((*loop_shape, *chans, *zsp), np.float32)
        for pidx in self._planes():
            plane = np.asarray(lay.src[pidx] if pidx else lay.src, dtype=np.float32)
            check_pixels(plane, f" in plane {pidx}" if pidx else "")
            small[pidx] = resize_plane(plane, zsp, order=1)
        self.prob_dtype = kw.pop("prob_dtype")
        self.out_axes = lay.out_axes
        self.plan_kwargs = {**kw, "axes": inner_axes, "depth": k, "levels": inner_levels, "prob_dtype": "float32"}

    def _planes(self) -> list[tuple[int, ...]]:
        return list(np.ndindex(*self.loop_shape)) if self.loop_shape else [()]

    def around(
        self, run: Generator[Progress, None, Prediction], allocate: Allocator | None = None
    ) -> Generator[Progress, None, Prediction]:
        """Report ``run``'s progress (one step more: the resampling back), then resample its result back to the
        image: the :class:`~napari_unetpp.inference.result.Prediction` of the image, every plane announced done in
        the last :class:`~napari_unetpp.inference.result.Progress`."""
        try:
            while True:
                try:
                    p = next(run)
                except StopIteration as stop:
                    inner: Prediction = stop.value
                    break
                yield Progress(p.done, p.total + 1)  # the resampling back is the last step
        finally:
            run.close()
        res = self.back(inner, allocate)
        done = inner.tiles + 1
        yield Progress(done, done, [tuple(int(i) for i in p) for p in self._planes()], res)
        return res

    def back(self, inner: Prediction, allocate: Allocator | None = None) -> Prediction:
        """``inner`` (the run on :attr:`image`) at the image's shape and in its axis order."""
        sp, k, mode, prob_dtype = self.spatial, self.depth, self.mode, self.prob_dtype
        nc = self.model.module.config.num_classes
        out_axes = self.out_axes
        perm = [inner.axes.index(a) for a in out_axes]
        out_shape = tuple((*self.loop_shape, *sp)[i] for i in perm)
        res = empty_prediction(
            out_shape,
            nc,
            self.levels,
            mode,
            prob_dtype,
            cue=inner.cue is not None,
            objects=inner.objects is not None,
            allocate=allocate,
            depth=inner.depth,
            threshold=inner.threshold,
            axes=out_axes,
            ran_on=inner.ran_on,
            runtime=inner.runtime,
            tiles=inner.tiles,
            objects_method=inner.objects_method,
            channels=inner.channels,
            objects_count=inner.objects_count,
        )

        def view(arr: Any, classes: bool) -> Any:  # an output in (loop..., spatial...) order, as the inner arrays are
            order = [out_axes.index(a) for a in inner.axes]
            return arr.transpose([0, *[o + 1 for o in order]] if classes else order)

        chosen_src: Any = inner.ensemble if mode == "ensemble" else inner.probabilities[k]
        multi = nc > 1
        for pidx in self._planes():
            cix: tuple[Any, ...] = (slice(None), *pidx)
            for lv in self.levels:
                src_p = inner.probabilities[lv][cix] if multi else inner.probabilities[lv][pidx]
                dst = view(res.probabilities[lv], multi)
                dst[cix if multi else pidx] = as_prob(resize_plane(np.asarray(src_p), sp, 1), prob_dtype)
            if res.ensemble is not None and inner.ensemble is not None:
                e = resize_plane(np.asarray(inner.ensemble[cix] if multi else inner.ensemble[pidx]), sp, 1)
                view(res.ensemble, multi)[cix if multi else pidx] = as_prob(e, prob_dtype)
            c = resize_plane(np.asarray(chosen_src[cix] if multi else chosen_src[pidx], np.float32), sp, 1)
            view(res.mask, False)[pidx] = mask_from(c, c.shape[0] if multi else 1, inner.threshold)
            if res.cue is not None and inner.cue is not None:
                view(res.cue, False)[pidx] = as_prob(resize_plane(np.asarray(inner.cue[pidx]), sp, 1), prob_dtype)
            for lv, cu in res.cues.items():
                view(cu, False)[pidx] = as_prob(resize_plane(np.asarray(inner.cues[lv][pidx]), sp, 1), prob_dtype)
            if res.objects is not None and inner.objects is not None:
                view(res.objects, False)[pidx] = resize_plane(np.asarray(inner.objects[pidx]), sp, 0)
        return res
