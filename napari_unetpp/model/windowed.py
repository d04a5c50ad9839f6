"""A CT model under another Hounsfield window: the one function the CLI, batch runs and both widgets use."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from napari_unetpp.data.normalization import Normalization
from napari_unetpp.data.windows import Window, parse_window
from napari_unetpp.errors import InputError
from napari_unetpp.model.loaded import LoadedModel

__all__ = ["with_window"]


def with_window(model: LoadedModel, window: Window | str | None, file_windows: Sequence[Window] = ()) -> LoadedModel:
    """``model`` normalising with ``window`` instead of its own (fine-tuning then stores it in the new version's
    card); the network is shared, not copied.

    Args:
        model: A CT model (one that normalises by a window).
        window: A :class:`~napari_unetpp.data.windows.Window`, a spec for
            :func:`~napari_unetpp.data.windows.parse_window` (a preset, ``dicom``/``dicom2``, or ``W,L``), or None for
            ``model`` unchanged.
        file_windows: The image's own DICOM windows, for ``dicom`` specs (default none).

    Raises:
        InputError: ``model`` does not normalise by a window, or the spec is not a window.
    """
    if window is None:
        return model
    if model.normalization.mode != "window":
        raise InputError(f"--window is for CT models; {model.card.id} normalises by {model.normalization.describe()}.")
    win = parse_window(window, file_windows) if isinstance(window, str) else window
    card = dataclasses.replace(model.card, normalization=Normalization.from_window(win).to_dict())
    return LoadedModel(model.module, card, model.path, model.shipped)
