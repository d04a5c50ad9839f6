"""Which slices the user edited and the training pair made of them, without a viewer: layers are stand-ins with
napari's attributes and a paint event that carries napari's two kinds of history atoms."""

from __future__ import annotations

import itertools
import types

import numpy as np
import pytest

from napari_unetpp.data.axes import first_axis_channel
from napari_unetpp.errors import InputError
from napari_unetpp.napari.finetune.edits import EditTracker, painted, slice_before
from napari_unetpp.napari.finetune.pair import training_pair
from napari_unetpp.napari.segment.controller import SegmentController

_ids = itertools.count()


class Event:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def disconnect(self, slot):
        self.slots.remove(slot)

    def emit(self, value):
        for slot in list(self.slots):
            slot(types.SimpleNamespace(value=value))


class Labels:
    def __init__(self, shape=(4, 20, 24)):
        self.data = np.zeros(shape, np.uint8)
        self.unique_id = next(_ids)
        self.name = f"labels {self.unique_id}"
        self.events = types.SimpleNamespace(paint=Event())

    def set(self, z, yy, xx, value):
        """Write like napari's data_setitem, then send its paint event: ``(indices, old values, new values)``."""
        idx = (np.full(len(yy), z), np.asarray(yy), np.asarray(xx))
        old = self.data[idx].copy()
        self.data[idx] = value
        self.events.paint.emit([(idx, old, value)])


def test_paint_events_mark_edited_slices_and_undo_unmarks_them():
    a = Labels()
    seen = []
    tracker = EditTracker(lambda ly: isinstance(ly, Labels), seen.append)
    tracker.sync([a])
    a.set(1, [3, 4], [5, 5], 2)
    a.set(3, [0], [0], 1)
    assert tracker.edited_slices(a) == [(1,), (3,)] and seen == [a, a]
    focus = tracker.focus(a, [(1,)])
    assert focus.sum() == 2 and focus[1, 3, 5] and not focus[3].any()
    a.data[1, [3, 4], [5, 5]] = 0  # napari's undo sends no event
    assert tracker.edited_slices(a) == [(1,), (3,)] and tracker.edited_slices(a, recheck=True) == [(3,)]


def test_a_box_atom_and_the_slice_before_it():
    data = np.zeros((2, 6, 6), np.uint8)
    data[1, 2:4, 2:4] = 5  # after the stroke
    box = types.SimpleNamespace(
        slice_key=(slice(1, 2), slice(2, 4), slice(2, 4)), mask=None, old_values=np.zeros((1, 2, 2), np.uint8)
    )
    slices, coords = painted([box], 3)
    assert slices == {(1,)} and len(coords) == 1 and coords[0][0].tolist() == [1, 1, 1, 1]
    assert not slice_before(data, (1,), [box]).any()
    masked = types.SimpleNamespace(
        slice_key=(slice(0, 1), slice(0, 2), slice(0, 2)),
        mask=np.array([[[True, False], [False, True]]]),
        old_values=np.array([7, 8], np.uint8),
    )
    assert painted([masked], 3)[0] == {(0,)}
    assert slice_before(data, (0,), [masked])[[0, 1], [0, 1]].tolist() == [7, 8]


def test_layers_that_go_take_their_edits_and_handlers_with_them():
    a, b = Labels(), Labels()
    tracker = EditTracker(lambda ly: isinstance(ly, Labels))
    tracker.sync([a, b, object.__new__(type("Image", (), {"unique_id": -1}))])
    a.set(2, [1], [1], 1)
    assert tracker.tracked() == {a.unique_id, b.unique_id}
    tracker.sync([b])
    assert tracker.tracked() == {b.unique_id} and not a.events.paint.slots and tracker.edits(a) is None
    tracker.sync([a, b])  # the same layer back: no old edits (nothing is keyed by id())
    assert tracker.edited_slices(a) == []


def test_the_training_pair_of_the_edited_slices():
    image = types.SimpleNamespace(
        data=np.arange(4 * 20 * 24, dtype=np.float32).reshape(4, 20, 24),
        multiscale=False,
        rgb=False,
        scale=(0.05, 0.004, 0.004),
        units=("um", "um", "um"),
        name="img",
    )
    base = types.SimpleNamespace(module=types.SimpleNamespace(config=types.SimpleNamespace(spatial_dims=2)))
    labels = Labels()
    tracker = EditTracker(lambda ly: isinstance(ly, Labels))
    tracker.sync([labels])
    with pytest.raises(ValueError, match="No edited slices"):
        training_pair(image, labels, base, "edited slices", edits=tracker)
    labels.set(2, [5, 6], [7, 7], 1)
    pair = training_pair(image, labels, base, "edited slices", edits=tracker)
    assert pair.slices == [(2,)] and pair.axes == "ZYX" and pair.focus.sum() == 2 and pair.image is image.data
    assert pair.spacing == pytest.approx({"Z": 0.05, "Y": 0.004, "X": 0.004}) and pair.spacing_unit == "um"
    labels.data[2, 5, 7] = 9  # a snapshot: painting on goes on while training runs
    assert pair.labels[2, 5, 7] == 1
    assert training_pair(image, labels, base, "listed slices", "1, 3").slices == [1, 3]
    with pytest.raises(ValueError, match="List the corrected slices"):
        training_pair(image, labels, base, "listed slices", "")
    with pytest.raises(ValueError, match="choose the labels drawn on this image"):
        training_pair(image, Labels((4, 10, 10)), base, "all slices")
    with pytest.raises(ValueError, match="Choose an image"):
        training_pair(None, labels, base)


def test_one_channel_of_the_first_axis_is_read_alike_by_segment_and_fine_tune():
    """The Segment widget segments channel 1 of a CZYX layer and the Fine-tune widget trains on that same channel
    (one rule, :func:`first_axis_channel`): same pixels (a view), same axes, the layer's scale after the channel."""
    data = np.arange(2 * 4 * 20 * 24, dtype=np.float32).reshape(2, 4, 20, 24)
    image = types.SimpleNamespace(
        data=data,
        multiscale=False,
        rgb=False,
        scale=(1.0, 0.05, 0.004, 0.004),
        units=("", "um", "um", "um"),
        name="img",
        unique_id=next(_ids),
        metadata={},
    )
    cfg = types.SimpleNamespace(spatial_dims=2, in_channels=1)
    base = types.SimpleNamespace(module=types.SimpleNamespace(config=cfg))
    shown, axes = SegmentController(warn=lambda m: None).source(image, base, 1)
    pair = training_pair(image, Labels(), base, "all slices", channel=1)
    assert axes == pair.axes == "ZYX"
    assert np.shares_memory(shown, data) and np.array_equal(shown, data[1]) and np.array_equal(pair.image, data[1])
    assert pair.spacing == pytest.approx({"Z": 0.05, "Y": 0.004, "X": 0.004})
    series, axes = first_axis_channel(np.zeros((3, 2, 4, 20, 24)), 3, 2)  # C, T, Z, Y, X for a 3D model
    assert series.shape == (2, 4, 20, 24) and axes == "TZYX"
    with pytest.raises(InputError, match="channel 2 does not exist"):
        first_axis_channel(data, 2, 2)
