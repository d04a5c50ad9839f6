"""The Segment widget's result cache: bounded, least recently used first, copies, and forgetting what went away."""

from __future__ import annotations

import numpy as np

from napari_unetpp._widgets.cache import ResultCache


def key(layer="a", fp="w1", plane=(0,)):
    return (layer, (4, 64, 64), fp, plane)


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
