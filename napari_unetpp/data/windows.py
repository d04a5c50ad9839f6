"""Hounsfield-unit windows: the radiology presets, the file's own DICOM windows and ``W,L`` numbers.

A CT model normalises by a window (:meth:`~napari_unetpp.data.normalization.Normalization.from_window`); the CLI's
``--window``, the Segment and Fine-tune widgets' window choice and the DICOM reader all go through :func:`parse_window`,
and :func:`napari_unetpp.model.windowed.with_window` gives a model another window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from napari_unetpp.errors import InputError

__all__ = ["ALIASES", "WINDOWS", "Window", "parse_window"]


@dataclass(frozen=True)
class Window:
    """A Hounsfield-unit window: ``width`` around ``level``; values outside are clipped."""

    name: str
    width: float
    level: float

    @property
    def low(self) -> float:
        return self.level - self.width / 2

    @property
    def high(self) -> float:
        return self.level + self.width / 2

    def describe(self) -> str:
        """E.g. ``soft-tissue W400 L40 (-160..240 HU)`` (without a name: ``W400 L40 (-160..240 HU)``)."""
        name = f"{self.name} " if self.name else ""
        return f"{name}W{self.width:g} L{self.level:g} ({self.low:g}..{self.high:g} HU)"


# The usual radiology presets (width, level) in HU.
WINDOWS: dict[str, Window] = {
    w.name: w
    for w in (
        Window("soft-tissue", 400, 40),  # abdomen: liver, spleen, kidneys, muscle
        Window("liver", 150, 30),
        Window("mediastinum", 350, 50),
        Window("lung", 1500, -600),
        Window("bone", 1800, 400),
        Window("brain", 80, 40),
    )
}
ALIASES = {"abdomen": "soft-tissue", "soft": "soft-tissue", "softtissue": "soft-tissue"}


def parse_window(spec: str, dicom_windows: Sequence[Window] = ()) -> Window:
    """A window from a preset name (``soft-tissue``, ``lung``, ...), ``dicom`` (the file's own first window),
    ``dicom2`` (its second), or ``W,L`` numbers (e.g. ``400,40``).

    Raises:
        InputError: an unknown name, a non-positive width, or ``dicom`` for a file without a window.
    """
    s = spec.strip().lower()
    s = ALIASES.get(s, s)
    if s in WINDOWS:
        return WINDOWS[s]
    if s.startswith("dicom"):
        k = int(s[5:] or 1) if s[5:].isdigit() or not s[5:] else 0
        if not dicom_windows:
            raise InputError("this image has no DICOM window of its own; name one, e.g. --window soft-tissue.")
        if not 1 <= k <= len(dicom_windows):
            raise InputError(
                f"the image has {len(dicom_windows)} DICOM window(s); use dicom1..dicom{len(dicom_windows)}."
            )
        return dicom_windows[k - 1]
    parts = s.replace(";", ",").split(",")
    try:
        width, level = (float(p) for p in parts)
    except ValueError:
        names = ", ".join(WINDOWS)
        raise InputError(f"unknown window {spec!r}: use one of {names}, dicom, or width,level (e.g. 400,40).") from None
    if width <= 0:
        raise InputError(f"a window's width must be positive, got {width:g}.")
    return Window(f"W{width:g}L{level:g}", width, level)
