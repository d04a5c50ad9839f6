"""The Segment widget's result cache: bounded, least recently used first, copies, and forgetting what went away."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_unetpp.napari.cache import ResultCache, ResultKey


def key(layer="a", fp="w1", plane=(0,), channel=None):
    return ResultKey(layer=layer, shape=(4, 64, 64), fingerprint=fp, plane=plane, channel=channel)


def test_bounded_lru_keeps_the_newest_and_owns_copies():
    c = ResultCache(max_mb=3 * 64 * 64 * 4 / 2**20)  # room for three float32 64x64 planes
    whole = np.zeros((8, 64, 64), np.float32)
    for z in range(5):
        c.put(key(plane=(z,)), {1: whole[z]})
    assert len(c) == 3 and c.nbytes <= c.max_bytes
    assert key(plane=(0,)) not in c and key(plane=(4,)) in c
    c.get(key(plane=(2,)))  # used: now the newest
    c.put(key(plane=(5,)), {1: whole[5]})
    assert key(plane=(2,)) in c and key(plane=(3,)) not in c
    entry = c.get(key(plane=(5,)))
    assert entry is not None and entry.probs[1].base is None  # a copy, never a view pinning the whole stack
    big = ResultCache(max_mb=0.001)
    big.put(key(), {1: whole[0]})
    assert key() in big  # the plane on screen stays even when it alone exceeds the bound


def test_forgets_layers_and_models_that_went_away():
    c = ResultCache()
    p = {1: np.ones((2, 2), np.float32)}
    c.put(key("a", "w1"), p)
    c.put(key("b", "w1"), p)
    c.put(key("a", "w2"), p)
    assert c.drop(layer="b") == 1 and len(c) == 2
    assert c.keep_only({"a"}, {"w2"}) == 1 and list(c._entries) == [key("a", "w2")]


def test_fields_are_read_by_name_whatever_else_the_key_holds():
    """The widget's keys carry a channel, a normalisation and a zoom besides layer, shape, weights and plane; the
    cache reads the fingerprint by name (it once read the channel's position, and forgot everything on every layer
    insert)."""
    c = ResultCache()
    p = {1: np.ones((2, 2), np.float32)}
    full = ResultKey("a", (3, 2, 2), "w1", (0,), channel=0, normalization=(("mode", "window"),), zoom=(2.0, 2.0))
    c.put(full, p)
    c.put(key("a", "w2", channel=1), p)
    assert c.keep_only({"a"}, {"w1", "w2"}) == 0 and len(c) == 2
    assert c.drop(fingerprint="w1") == 1 and list(c._entries) == [key("a", "w2", channel=1)]
    assert c.keep_only({"a"}, {"w1"}) == 1 and len(c) == 0
    with pytest.raises(TypeError):
        full[2]  # no positions to get wrong
    with pytest.raises(dataclasses.FrozenInstanceError):
        full.plane = (1,)  # type: ignore[misc]
