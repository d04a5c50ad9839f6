"""How one model version lies on disk: ``<stem>.safetensors`` (weights, no pickle) beside ``<stem>.json`` (its card),
and, for int8 inference, ``<stem>.calibration.safetensors`` (a few normalised tiles of the model's own data); the
weights' checksum, and how a complete file appears under its name in one step, never over another."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

__all__ = [
    "CALIBRATION_SUFFIX",
    "SUFFIXES",
    "calibration_path",
    "fsync",
    "pair",
    "publish",
    "read_calibration",
    "save_calibration",
    "sha256",
    "stem_of",
    "suffixed",
]

log = logging.getLogger(__name__)
SUFFIXES = (".safetensors", ".json")
CALIBRATION_SUFFIX = ".calibration.safetensors"


def pair(path: Path) -> tuple[Path, Path]:
    """The weights and card paths of one model file (either of them, or their common stem). Names are built by
    string: a model name may hold dots (``em.v2``), so ``with_suffix`` on a stem would cut it at its last dot."""
    stem = stem_of(path)
    return suffixed(stem, ".safetensors"), suffixed(stem, ".json")


def stem_of(path: Path) -> Path:
    """``path`` without its ``.safetensors``/``.json`` suffix (a path without one is already a stem)."""
    for suffix in SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def suffixed(stem: Path, suffix: str) -> Path:
    """``<stem><suffix>``, keeping every dot already in the stem's name."""
    return stem.with_name(stem.name + suffix)


def sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path`` (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync(path: Path) -> None:
    """Flush the file at ``path`` to the disk (before it is published: a power cut never leaves it half written)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def publish(src: Path, dst: Path) -> None:
    """Make the complete file ``src`` appear at ``dst`` in one step, never over an existing file.

    A hard link does both at once. Where hard links are not supported (FAT/exFAT, some network shares), ``dst`` is
    first claimed by an exclusive create and then replaced by ``src`` (a rename within the folder).

    Raises:
        FileExistsError: ``dst`` exists.
    """
    try:
        os.link(src, dst)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        log.debug("no hard link for %s (%s): exclusive create and rename instead", dst, exc)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    os.replace(src, dst)


def calibration_path(weights: Path) -> Path:
    """Where a model's int8 calibration tiles live: beside its weights (or its card)."""
    return weights.with_name(weights.name.removesuffix(".safetensors").removesuffix(".json") + CALIBRATION_SUFFIX)


def save_calibration(tiles: np.ndarray, path: Path) -> None:
    """Write the tiles as float16 (safetensors: no pickle) to ``path``, mode ``0o644``. Not atomic:
    :func:`~napari_unetpp.model.registry.save_model` writes it in its saving folder, flushes it and moves it into
    place (once, beside the weights and before the card)."""
    import torch
    from safetensors.torch import save_file

    save_file({"tiles": torch.from_numpy(np.ascontiguousarray(tiles, np.float16))}, str(path))
    os.chmod(path, 0o644)


def read_calibration(weights: Path) -> np.ndarray | None:
    """The calibration tiles saved beside ``weights``, or None: none saved, or a damaged file (logged; int8 is then
    unavailable, nothing else is affected)."""
    f = calibration_path(weights)
    if not f.is_file():
        return None
    from safetensors.numpy import load_file

    try:
        return load_file(str(f))["tiles"]
    except Exception as exc:
        log.warning("could not read %s (%s)", f, exc)
        return None
