"""The training data the engine samples from at every step, and the ways it changes between steps.

A :class:`BatchSource` holds the current :class:`~napari_unetpp.training.data.TrainingSet` and what makes its
batches (:func:`batch_maker`: sampled and augmented on the CPU; on CUDA in a background thread, with the intensity
jitter left to the GPU).
:meth:`BatchSource.replace` swaps the data between two steps: the batches made for the old data are dropped and the
next step samples the new. The refit phase is one such swap (:func:`with_validation_trained`); a trainer whose data
grows (the user paints more) is another.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from napari_unetpp.training.augment import Prefetcher, augment_batch, sample_batch
from napari_unetpp.training.data import TrainingSet, pad_item

__all__ = ["BatchSource", "batch_maker", "statistics_batches", "with_validation_trained"]


def batch_maker(ds: TrainingSet, rng: np.random.Generator, cfg: Any, mirror: bool, dev: torch.device) -> Prefetcher:
    """What makes each training batch of ``ds`` (``cfg`` gives the focus and foreground fractions): sampled and
    augmented on the CPU, in line; on CUDA in a :class:`~.augment.Prefetcher` thread with its own generator, so the
    GPU does not wait for the CPU between steps, and there the thread samples, flips and turns, pins the batch for
    an asynchronous upload and leaves the intensity jitter to the GPU
    (:func:`~.augment.intensity_on_device`)."""
    pin = dev.type == "cuda" and torch.cuda.is_available()

    def make(gen: np.random.Generator, on_device: bool) -> Callable[[int, tuple[int, ...]], tuple]:
        def one(batch: int, patch: tuple[int, ...]) -> tuple:
            picked = sample_batch(ds, gen, batch, patch, cfg.focus_fraction, cfg.foreground_fraction)
            out = augment_batch(*picked, gen, mirror, intensity_later=on_device)
            return tuple(torch.from_numpy(a).pin_memory() for a in out[:3]) + out[3:] if pin else out

        return one

    if dev.type == "cuda":
        return Prefetcher(make(np.random.default_rng(rng.integers(2**63)), True))
    return Prefetcher(make(rng, False), threaded=False)


def statistics_batches(
    ds: TrainingSet, rng: np.random.Generator, batch: int, patch: Sequence[int], dev: torch.device, fmt: Any
) -> Iterator[torch.Tensor]:
    """Un-augmented patches of the user's images (labels unused) for re-estimating batch-norm statistics: enough
    to see every training pixel about once, 4-16 batches."""
    n = int(np.clip(math.ceil(ds.n_train / (batch * float(np.prod(patch)))), 4, 16))
    for _ in range(n):
        xb, _, _ = sample_batch(ds, rng, batch, patch, 0.0, 0.0)
        yield torch.from_numpy(xb).to(dev).contiguous(memory_format=fmt)


def with_validation_trained(ds: TrainingSet) -> TrainingSet:
    """The same data with its validation pixels trained on too (the refit phase); the validation masks stay, so
    validation still reports on them. The items are new (the images shared): ``ds`` is unchanged."""
    items = []
    for it in ds.items:
        new = dataclasses.replace(it, train=it.train | it.val)
        new.index()
        items.append(new)
    return TrainingSet(items, ds.spatial_dims, ds.summary)


class BatchSource:
    """The data the engine trains on, and its batches.

    Args:
        data: The prepared data.
        rng: The run's random generator (in-line batches use it; a background thread gets a generator seeded from
            it).
        cfg: Sampling options (``focus_fraction``, ``foreground_fraction``).
        mirror: Flips and quarter turns.
        device: Where training runs (CUDA: batches made ahead in a thread).

    Attributes:
        data: The current :class:`~napari_unetpp.training.data.TrainingSet`.
        threaded: Whether the last batch maker ran in a thread.
    """

    def __init__(self, data: TrainingSet, rng: np.random.Generator, cfg: Any, mirror: bool, device: torch.device):
        self.data = data
        self.rng, self.cfg, self.mirror, self.device = rng, cfg, mirror, device
        self.threaded = device.type == "cuda"
        self._batches: Prefetcher | None = None
        self._waited = 0.0

    def start(self) -> None:
        """Start making batches (before the first step)."""
        self._batches = batch_maker(self.data, self.rng, self.cfg, self.mirror, self.device)
        self.threaded = self._batches.threaded

    def get(self, batch: int, patch: Sequence[int]) -> tuple[Any, ...]:
        """The next batch: image ``(B, C, *patch)``, target and known-pixel mask ``(B, *patch)`` (arrays, or pinned
        tensors on CUDA), and on CUDA the intensity jitter still to apply and its noise seed."""
        if self._batches is None:
            self.start()
        assert self._batches is not None
        return self._batches.get(batch, patch)

    def replace(self, data: TrainingSet, pad_to: Sequence[int], *, refit: bool = False) -> bool:
        """Train on ``data`` from the next batch on: its items are padded to at least ``pad_to``, and batches made
        ahead for the old data are dropped; with ``refit`` its validation pixels train too.
        Returns whether the validation pixels changed (scores before and after no longer compare)."""
        started = self._batches is not None
        self.close()  # a thread making batches reads the old items
        for it in data.items:
            pad_item(it, pad_to)
        old, self.data = self.data, with_validation_trained(data) if refit else data
        if started:
            self.start()
        return _validation_of(old) != _validation_of(self.data)

    @property
    def wait_seconds(self) -> float:
        """Time the engine spent waiting for batches, over every batch maker so far."""
        return self._waited + (self._batches.wait_seconds if self._batches is not None else 0.0)

    def close(self) -> None:
        """Stop making batches (and drop those made ahead); :meth:`get` starts again."""
        if self._batches is not None:
            self._batches.close()
            self._waited += self._batches.wait_seconds
            self._batches = None


def _validation_of(ds: TrainingSet) -> list[tuple[str, int]]:
    """Which validation pixels a set holds, as (item source, count) pairs: equal for the same validation."""
    return [(it.source, int(it.val.sum())) for it in ds.items if it.val.any()]
