"""Which slices of a labels layer the user edited: read from napari's paint events (their history atoms), keyed by
the layer's ``unique_id`` (never ``id()``, which a new layer may get from a removed one) and forgotten with the layer.
A slice painted and then undone back to what it was does not count (napari's undo sends no event: a recheck compares
each painted slice with a digest of its content before the first edit). No Qt: a layer is anything with ``data``,
``events.paint`` and ``unique_id``."""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_unetpp.napari.events import LayerHooks

__all__ = ["EditTracker", "LayerEdits", "atom_changes", "painted", "slice_before"]


def atom_changes(atom: Any) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Full-array coordinates of the pixels one napari history atom changed, and their values before the change.

    napari records either ``(indices, old_values, new_values)`` tuples (``data_setitem``) or masked bounding-box
    atoms with a ``slice_key``, an optional ``mask`` (None: the whole box changed) and ``old_values``.
    """
    if hasattr(atom, "slice_key"):
        key = tuple(atom.slice_key)
        starts = [s.start or 0 for s in key]
        old = np.asarray(atom.old_values)
        if atom.mask is None:  # old_values is a snapshot of the whole box
            idx = np.nonzero(np.ones([s.stop - (s.start or 0) for s in key], bool))
            old = old.ravel()
        else:
            idx = np.nonzero(atom.mask)
        return tuple(i + st for i, st in zip(idx, starts)), old
    idx = tuple(np.asarray(i) for i in atom[0])
    return idx, np.broadcast_to(np.asarray(atom[1]), idx[0].shape if idx else ())


def painted(atoms: Any, ndim: int) -> tuple[set[tuple[int, ...]], list[tuple[np.ndarray, ...]]]:
    """Slices (indices over the leading non-YX axes) and pixel coordinates touched by one napari paint event."""
    lead = ndim - 2
    slices: set[tuple[int, ...]] = set()
    coords: list[tuple[np.ndarray, ...]] = []
    for atom in atoms or []:
        full, _ = atom_changes(atom)
        if not full or full[0].size == 0:
            continue
        coords.append(full)
        if lead:
            slices.update(map(tuple, np.unique(np.stack(full[:lead], 1), axis=0).tolist()))
        else:
            slices.add(())
    return slices, coords


def slice_before(data: Any, key: tuple[int, ...], atoms: Any) -> np.ndarray:
    """The YX plane ``key`` of a labels array as it was before the edits in ``atoms`` (one paint event), rebuilt
    from the current plane and the old values the atoms keep (the inverse of napari's own undo). Correct whether
    napari emits the event before writing (single edits) or after (a staged mouse stroke)."""
    lead = len(key)
    plane = np.array(data[key], copy=True)
    for atom in reversed(list(atoms or [])):
        full, old = atom_changes(atom)
        if not full or full[0].size == 0:
            continue
        sel = np.ones(full[0].shape, bool)
        for d in range(lead):
            sel &= full[d] == key[d]
        plane[full[lead][sel], full[lead + 1][sel]] = old[sel]
    return plane


def _digest(plane: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(plane).tobytes(), digest_size=16).digest()


@dataclass
class LayerEdits:
    """What the user did on one labels layer."""

    slices: set[tuple[int, ...]] = field(default_factory=set)  # painted slices
    original: dict[tuple[int, ...], bytes] = field(default_factory=dict)  # slice -> digest before its first edit
    restored: set[tuple[int, ...]] = field(default_factory=set)  # painted, but back to the original (undone)
    focus: list[tuple[np.ndarray, ...]] = field(default_factory=list)  # changed pixel coordinates


class EditTracker:
    """The edits on every labels layer of a viewer, by the layer's unique id.

    Args:
        is_labels: Which layers are labels layers (``lambda ly: isinstance(ly, Labels)``).
        on_edit: Called with the layer after each paint event on it (held weakly when a bound method, so a closed
            widget is not kept alive).
    """

    def __init__(self, is_labels: Callable[[Any], bool], on_edit: Callable[[Any], None] | None = None) -> None:
        self._hooks = LayerHooks(self, "_on_paint", "paint", is_labels)
        self._edits: dict[Hashable, LayerEdits] = {}
        self._on_edit: Any = None
        if on_edit is not None:
            self._on_edit = weakref.WeakMethod(on_edit) if hasattr(on_edit, "__func__") else (lambda: on_edit)

    def sync(self, layers: Iterable[Any]) -> None:
        """Follow the viewer's layers: edits of layers that went are forgotten, new labels layers are listened to."""
        layers = list(layers)
        self._hooks.sync(layers)
        present = {ly.unique_id for ly in layers}
        self._edits = {u: e for u, e in self._edits.items() if u in present and u in self._hooks}
        for uid in self._hooks:
            self._edits.setdefault(uid, LayerEdits())

    def tracked(self) -> set[Hashable]:
        """The unique ids of the layers followed."""
        return set(self._edits)

    def edits(self, layer: Any) -> LayerEdits | None:
        """What the user did on ``layer`` (None for a layer not followed)."""
        return self._edits.get(layer.unique_id)

    def edited_slices(self, layer: Any, recheck: bool = False) -> list[tuple[int, ...]]:
        """Slices of ``layer`` the user painted on and did not undo back to what they were, sorted. ``recheck``
        re-reads every painted slice first (to catch undo)."""
        rec = self._edits.get(layer.unique_id)
        if rec is None:
            return []
        if recheck:
            for s in rec.slices:
                now = _digest(np.asarray(layer.data[s]))
                (rec.restored.add if now == rec.original.get(s) else rec.restored.discard)(s)
        return sorted(rec.slices - rec.restored)

    def focus(self, layer: Any, slices: list[tuple[int, ...]]) -> np.ndarray:
        """The pixels of ``layer`` the user changed, as a mask, on ``slices`` only (all of a 2D layer's for
        ``[()]``): pixels painted on slices that were undone are no focus."""
        focus = np.zeros(layer.data.shape, bool)
        rec = self._edits.get(layer.unique_id)
        for c in rec.focus if rec is not None else []:
            focus[c] = True
        if slices != [()]:
            lead = focus.ndim - 2
            keep = np.zeros(focus.shape[:lead], bool)
            if slices:
                keep[tuple(np.array(slices).T)] = True
            focus &= keep.reshape(keep.shape + (1, 1))
        return focus

    def _on_paint(self, uid: Hashable, event: Any) -> None:
        rec = self._edits.get(uid)
        layer = self._hooks.layer(uid)
        if rec is None or layer is None:
            return
        atoms = getattr(event, "value", None)
        slices, coords = painted(atoms, layer.data.ndim)
        for s in slices:
            if s not in rec.original:
                rec.original[s] = _digest(slice_before(layer.data, s, atoms))
        rec.slices.update(slices)
        rec.restored -= slices  # napari sends this event before or after writing, so no re-read here
        rec.focus.extend(coords)
        notify = self._on_edit() if self._on_edit is not None else None
        if notify is not None:
            notify(layer)
