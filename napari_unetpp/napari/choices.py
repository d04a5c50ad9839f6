"""What both dock widgets offer and how they refresh their lists: the viewer's image layers (not our own results),
a list refresh that starts no work, and :func:`configure`, the public way to set a widget's controls by name."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from magicgui.widgets import Container
from napari.layers import Image

__all__ = ["children_blocked", "configure", "image_choices"]


def image_choices(viewer: Any) -> list[tuple[str, Image]]:
    """The viewer's image layers a user may segment or train on (not our own result layers)."""
    return [(ly.name, ly) for ly in viewer.layers if isinstance(ly, Image) and "[UNet++" not in ly.name]


@contextlib.contextmanager
def children_blocked(container: Container):
    """Block the ``changed`` signals of a container's children: a choice refresh must not start work (napari
    refreshes dock widgets while it removes layers)."""
    with contextlib.ExitStack() as stack:
        for w in container:
            if hasattr(w, "changed"):
                stack.enter_context(w.changed.blocked())
        yield


def configure(controls: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """Set controls by name, in the order given, as a user would (each change runs its handler).

    Raises:
        TypeError: a name that is not one of ``controls``.
    """
    unknown = [n for n in values if n not in controls]
    if unknown:
        raise TypeError(f"unknown control(s) {unknown}; choose from {sorted(controls)}.")
    for name, value in values.items():
        controls[name].value = value
