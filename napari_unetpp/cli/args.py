"""What the commands share: the checked argument types, the default model, the help of the shared options, and the
error a command reports as one sentence."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = [
    "DEFAULT_MODEL",
    "DEVICES",
    "WINDOW_HELP",
    "CliError",
    "checked",
    "index",
    "positive_float",
    "positive_int",
    "probability",
]

DEFAULT_MODEL = "em-membranes"
DEVICES = ["auto", "cpu", "cuda", "mps"]
WINDOW_HELP = (
    "CT models: Hounsfield window, a preset (soft-tissue, liver, mediastinum, lung, bone, brain), dicom (the "
    "file's own), or WIDTH,LEVEL (e.g. 400,40)"
)


class CliError(Exception):
    """A failure reported to the user as one sentence, exit status 2."""


def checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], rule: str, kind: str) -> Callable[[str], Any]:
    """An argparse type: ``convert`` the text, and refuse it unless ``ok`` (``rule`` says what is allowed)."""

    def parse(text: str) -> Any:
        try:
            x = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not ok(x):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"{rule}, got {x:g}")
        return x

    return parse


positive_int = checked(int, lambda n: n >= 1, "must be 1 or more", "a whole number")
index = checked(int, lambda n: n >= 0, "counts from 0", "a whole number")
probability = checked(float, lambda x: 0.0 <= x <= 1.0, "must lie between 0 and 1", "a number")
positive_float = checked(float, lambda x: x > 0, "must be above 0", "a number")
