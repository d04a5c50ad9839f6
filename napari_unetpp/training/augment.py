"""Training batches: patches centred on known pixels (the user's changes first), flips, rotations, intensity jitter
and a mild random affine."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from napari_unetpp.training.data import TrainingSet

__all__ = ["Prefetcher", "augment_batch", "intensity_on_device", "random_affine", "sample_batch"]


def sample_batch(
    ds: TrainingSet,
    rng: np.random.Generator,
    batch: int,
    patch: Sequence[int],
    focus_fraction: float = 0.5,
    foreground_fraction: float = 0.33,
    centres: list | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``batch`` patches centred on training pixels: changed pixels first, then foreground, then any.
    Foreground centres of a multi-class item pick a class first (each present class equally often, nnU-Net's
    rule), so a small organ beside a large one is seen as often: measured on the CT sample, a liver + spleen model
    sampling foreground pixels alone never predicted the spleen.

    Items are chosen in proportion to their training pixels; ``centres`` (a list), when given, receives
    ``(item index, centre)`` per patch. Patches near an edge are shifted inside the item.

    Returns:
        image ``(B, C, *patch)`` float32, target ``(B, *patch)`` int64, known ``(B, *patch)`` bool (training pixels
        only: validation pixels inside a patch are seen as input but never as labels).
    """
    weights = np.array([len(it.train_idx) for it in ds.items], dtype=np.float64)
    weights /= weights.sum()
    xs, ys, vs = [], [], []
    for _ in range(batch):
        ii = int(rng.choice(len(ds.items), p=weights))
        it = ds.items[ii]
        u = rng.random()
        if len(it.focus_idx) and u < focus_fraction:
            pool = it.focus_idx
        elif len(it.fg_idx) and rng.random() < foreground_fraction:
            pool = it.fg_idx
            if it.class_idx:
                classes = sorted(it.class_idx)
                pool = it.class_idx[classes[int(rng.integers(len(classes)))]]
        else:
            pool = it.train_idx
        centre = np.unravel_index(int(pool[rng.integers(len(pool))]), it.target.shape)
        if centres is not None:
            centres.append((ii, tuple(int(c) for c in centre)))
        sl = tuple(
            slice(s, s + p)
            for s, p in ((int(np.clip(c - p // 2, 0, d - p)), p) for c, p, d in zip(centre, patch, it.target.shape))
        )
        xs.append(it.image[(slice(None),) + sl])
        ys.append(it.target[sl])
        vs.append(it.train[sl])
    return np.stack(xs), np.stack(ys), np.stack(vs)


def augment_batch(
    x: np.ndarray,
    y: np.ndarray,
    v: np.ndarray,
    rng: np.random.Generator,
    mirror: bool = True,
    intensity_later: bool = False,
) -> tuple[np.ndarray, ...]:
    """Flips (every axis) and 90-degree rotations (in YX; half-turns only on non-square patches, whose quarter-turns
    would not stack) unless ``mirror`` is False, and per-channel gamma, gain, offset and noise.

    ``intensity_later``: the intensity jitter is drawn but not applied; its parameters come back as a fourth array,
    ``(B, C, 4)`` (gamma, gain, offset, noise sigma), and a seed for the noise as a fifth, for
    :func:`intensity_on_device` to apply where the batch trains (on CUDA: the power and the noise were most of the
    CPU's time per batch)."""
    xs, ys, vs, params = [], [], [], []
    nd = y.ndim - 1
    square = y.shape[-1] == y.shape[-2]
    for b in range(x.shape[0]):
        a, t, m = x[b], y[b], v[b]
        k = (int(rng.integers(4)) if square else 2 * int(rng.integers(2))) if mirror else 0
        if k:
            a, t, m = np.rot90(a, k, axes=(-2, -1)), np.rot90(t, k, axes=(-2, -1)), np.rot90(m, k, axes=(-2, -1))
        for ax in range(nd if mirror else 0):
            if rng.random() < 0.5:
                a, t, m = np.flip(a, ax + 1), np.flip(t, ax), np.flip(m, ax)
        a = np.array(a, dtype=np.float32)
        for c in range(a.shape[0]):
            gamma, gain, offset, sigma = _intensity(rng)
            if intensity_later:
                params.append((gamma, gain, offset, sigma))
                continue
            ch = a[c]
            inside = (ch > 0) & (ch < 1)
            ch[inside] = ch[inside] ** gamma
            ch *= gain
            ch += offset
            if sigma > NOISE_FROM:
                ch += rng.normal(0, sigma, ch.shape).astype(np.float32)
        xs.append(a)
        ys.append(np.ascontiguousarray(t))
        vs.append(np.ascontiguousarray(m))
    if intensity_later:
        jitter = np.asarray(params, np.float32).reshape(x.shape[0], x.shape[1], 4)
        return np.stack(xs), np.stack(ys), np.stack(vs), jitter, np.asarray(rng.integers(2**62))
    return np.stack(xs), np.stack(ys), np.stack(vs)


NOISE_FROM = 0.005  # noise sigmas below this add none


def _intensity(rng: np.random.Generator) -> tuple[float, float, float, float]:
    """One channel's gamma, gain, offset and noise sigma (in this order from ``rng``)."""
    gamma = float(np.exp(rng.uniform(-0.35, 0.35)))
    return gamma, float(rng.uniform(0.8, 1.25)), float(rng.uniform(-0.1, 0.1)), float(rng.uniform(0, 0.05))


def intensity_on_device(x: torch.Tensor, jitter: torch.Tensor, seed: int) -> torch.Tensor:
    """:func:`augment_batch`'s intensity jitter applied to ``x`` ``(B, C, *patch)`` where it is: ``jitter``
    ``(B, C, 4)`` from ``augment_batch(intensity_later=True)``; the noise from a generator seeded with ``seed`` on
    ``x``'s device (the same distribution as the CPU's, not the same draws)."""
    shape = (*x.shape[:2], *([1] * (x.ndim - 2)))
    gamma, gain, offset, sigma = (jitter[..., i].to(x.device, torch.float32).reshape(shape) for i in range(4))
    inside = (x > 0) & (x < 1)
    x = torch.where(inside, x.clamp(min=1e-30) ** gamma, x) * gain + offset
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return x + noise * torch.where(sigma > NOISE_FROM, sigma, torch.zeros_like(sigma))


def random_affine(
    x: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor,
    rng: np.random.Generator,
    probability: float = 0.3,
    max_degrees: float = 15.0,
    scale: tuple[float, float] = (0.85, 1.15),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mild random rotation (in YX) and isotropic scaling per sample, on the device: bilinear for the image,
    nearest for labels; pixels pulled from outside the patch become unknown."""
    n = x.shape[0]
    chosen = rng.random(n) < probability
    if not chosen.any():
        return x, y, v
    nd = x.ndim - 2
    theta = torch.zeros(n, nd, nd + 1)
    theta[:, :nd, :nd] = torch.eye(nd)
    for b in np.flatnonzero(chosen):
        ang = math.radians(rng.uniform(-max_degrees, max_degrees))
        s = math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1])))  # log-uniform: zoom in as often as out
        # affine_grid orders coordinates (x, y[, z]): the first two are the image plane
        theta[b, :2, :2] = torch.tensor([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]]) / s
    theta = theta.to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    xa = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    ya = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    va = F.grid_sample(v[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    keep = torch.as_tensor(chosen, device=x.device)
    sel = keep.view(-1, *([1] * (x.ndim - 1)))
    return (
        torch.where(sel, xa, x),
        torch.where(keep.view(-1, *([1] * nd)), ya.long(), y),
        torch.where(keep.view(-1, *([1] * nd)), va > 0.5, v),
    )


class Prefetcher:
    """Assembles training batches, in a background thread (``threaded``) while the accelerator trains on the current
    one, or in line.

    ``make(batch, patch)`` builds one batch on the CPU (sampling and augmentation, both NumPy); ``get(batch, patch)``
    returns the next batch of that size, dropping any made for an earlier size (after an out-of-memory retry or when
    the patches grow). Threaded, ``make`` must own its random generator: it runs on the worker thread only. Threaded
    on CUDA, where the CPU side of a step would otherwise leave the GPU idle; in line on the CPU (a thread would only
    compete with the training step for the same cores).
    """

    def __init__(self, make: Callable[[int, tuple[int, ...]], tuple], ahead: int = 3, threaded: bool = True) -> None:
        self._make = make
        self.threaded = threaded
        self._want: tuple[int, tuple[int, ...]] | None = None
        self._queue: queue.Queue = queue.Queue(ahead)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wait_seconds = 0.0  # time the training loop spent waiting for a batch

    def get(self, batch: int, patch: Sequence[int]) -> tuple:
        key = (int(batch), tuple(int(p) for p in patch))
        if not self.threaded:
            return self._make(*key)
        self._want = key
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="unetpp-batches", daemon=True)
            self._thread.start()
        t = time.perf_counter()
        try:
            while True:
                made_for, item = self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                if made_for == key:
                    return item
        finally:
            self.wait_seconds += time.perf_counter() - t

    def _run(self) -> None:
        while not self._stop.is_set():
            key = self._want
            assert key is not None
            try:
                item: object = self._make(*key)
            except BaseException as exc:  # handed to the training loop, which raises it
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put((key, item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def close(self) -> None:
        """Stop the worker and drop the batches it made (they may be large)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
