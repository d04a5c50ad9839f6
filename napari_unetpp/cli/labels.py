"""``train``'s checks of the labels against its arguments (``--slices``, ``--val-slices``, ``--classes``), each
failure one sentence (:class:`~napari_unetpp.cli.args.CliError`), before the model is loaded or a step trained."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from napari_unetpp.cli.args import CliError

__all__ = ["check_slices", "class_map", "labelled_slices_except", "remap"]


def check_slices(flag: str, slices: list[int] | str | None, labels_shape: Sequence[int]) -> None:
    """Every slice number of ``flag`` indexes the labels' first axis (a stack), in one sentence if not."""
    if not isinstance(slices, list):
        return
    if len(labels_shape) < 3:
        raise CliError(f"{flag} needs a stack of slices; these labels are a single plane (leave {flag} out).")
    n = int(labels_shape[0])
    bad = [s for s in slices if not 0 <= s < n]
    if bad:
        raise CliError(
            f"{flag} {bad[0]} is outside the {n} slices (0-{n - 1}) of the labels; slices count from 0."
            if n > 1
            else f"{flag} {bad[0]} is outside the labels' single slice (0); slices count from 0."
        )


def class_map(classes: list[str] | None) -> tuple[list[str] | None, list[int]]:
    """``--classes`` as names, and the label values they come from when given as NAME=VALUE (e.g. liver=5
    spleen=1): then class k is the k-th pair and every other label value is background."""
    if not classes:
        return None, []
    pairs = [c.split("=", 1) for c in classes]
    if all(len(p) == 1 for p in pairs):
        return classes, []
    if not all(len(p) == 2 for p in pairs):
        raise CliError("--classes takes names (liver) or NAME=VALUE pairs (liver=5 spleen=1), not a mix.")
    try:
        values = [int(v) for _, v in pairs]
    except ValueError:
        raise CliError("--classes NAME=VALUE needs whole-number label values, e.g. liver=5.") from None
    if len(set(values)) != len(values) or min(values) < 1:
        raise CliError("--classes NAME=VALUE needs distinct label values of 1 or more.")
    return [n.strip() for n, _ in pairs], values


def remap(labels: Any, values: list[int], ignore_label: int | None) -> Any:
    """Label value ``values[k]`` -> class k + 1, every other value -> 0 (background); the ignore label is kept."""
    import numpy as np

    lab = np.asarray(labels)
    out = np.zeros(lab.shape, np.int32 if ignore_label is not None and ignore_label > 255 else np.uint8)
    for k, v in enumerate(values, start=1):
        out[lab == v] = k
    if ignore_label is not None:
        out[lab == ignore_label] = ignore_label
    missing = [v for v in values if not (lab == v).any()]
    if missing:
        raise CliError(f"the labels hold no voxel of value {missing}; check --classes NAME=VALUE.")
    return out


def labelled_slices_except(labels: Any, held: list[int], ignore_label: int | None) -> list[int]:
    """The default ground truth (slices over the first axis holding any label), without the held-out ones."""
    import numpy as np

    from napari_unetpp.training.data import annotated_slices

    lab = np.asarray(labels)
    if lab.ndim < 3:
        raise CliError("--val-slices needs a stack of slices; this image is a single plane.")
    annotated = annotated_slices(lab, ignore_label).reshape(lab.shape[0], -1).any(axis=1)
    keep = [int(i) for i in np.flatnonzero(annotated) if int(i) not in set(held)]
    if not keep:
        raise CliError("every labelled slice is held out; label another slice or list the training --slices.")
    return keep
