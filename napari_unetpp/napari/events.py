"""Listening to the events of the viewer's layers, per layer, without keeping a closed widget alive.

A handler is connected to one event of each layer of a kind (the data event of Image layers, the paint event of
Labels layers), keyed by napari's ``layer.unique_id`` (never ``id()``, which a new layer may reuse), and
disconnected when the layer goes. No Qt: a layer is anything with ``events`` and ``unique_id``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterable
from typing import Any

__all__ = ["LayerHooks", "WeakHandler"]


class WeakHandler:
    """An event callback that calls ``getattr(owner, method)(*args, event)`` while ``owner`` lives, holding it only
    weakly: a layer's event keeps no closed widget alive (a lambda over ``self`` would)."""

    def __init__(self, owner: Any, method: str, *args: Any) -> None:
        self._owner = weakref.ref(owner)
        self._method = method
        self._args = args

    def __call__(self, event: Any) -> None:
        owner = self._owner()
        if owner is not None:
            getattr(owner, self._method)(*self._args, event)


class LayerHooks:
    """``owner.<method>(uid, event)`` connected to the ``event`` of every layer that ``accept`` takes.

    Args:
        owner: The object whose method handles the event (held weakly).
        method: Its name; it is called with the layer's unique id and the event.
        event: The layer event's name (``"data"``, ``"paint"``).
        accept: Which layers to listen to (e.g. ``lambda ly: isinstance(ly, Labels)``).
    """

    def __init__(self, owner: Any, method: str, event: str, accept: Callable[[Any], bool]) -> None:
        self._owner = weakref.ref(owner)
        self._method = method
        self._event = event
        self._accept = accept
        self._hooks: dict[Hashable, tuple[weakref.ref, WeakHandler]] = {}

    def __contains__(self, uid: object) -> bool:
        return uid in self._hooks

    def __iter__(self):
        return iter(list(self._hooks))

    def layer(self, uid: Hashable) -> Any:
        """The layer listened to under ``uid``, or None."""
        hook = self._hooks.get(uid)
        return hook[0]() if hook is not None else None

    def sync(self, layers: Iterable[Any]) -> list[Any]:
        """Disconnect from layers no longer in ``layers`` and connect to the new ones; returns the new ones."""
        layers = list(layers)
        present = {ly.unique_id for ly in layers}
        for uid in [u for u in self._hooks if u not in present]:
            ref, handler = self._hooks.pop(uid)
            layer = ref()
            if layer is not None:
                getattr(layer.events, self._event).disconnect(handler)
        new = []
        owner = self._owner()
        for ly in layers:
            if owner is not None and self._accept(ly) and ly.unique_id not in self._hooks:
                handler = WeakHandler(owner, self._method, ly.unique_id)
                getattr(ly.events, self._event).connect(handler)
                self._hooks[ly.unique_id] = (weakref.ref(ly), handler)
                new.append(ly)
        return new
