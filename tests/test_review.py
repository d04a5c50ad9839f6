"""Where to correct next (inference.review): the heads' disagreement ranks planes and regions."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unetpp import correction_order, predict
from napari_unetpp.inference.review import disagreement_map

from .conftest import tiny_batchnorm as tiny


def test_the_plane_and_region_where_heads_disagree_come_first():
    rng = np.random.default_rng(0)
    agree = rng.random((5, 60, 90)).astype(np.float32)
    heads = {1: agree.copy(), 2: agree.copy(), 3: agree.copy()}
    heads[2][3, 40:60, 0:30] = 1 - heads[1][3, 40:60, 0:30]  # slice 3, bottom left: head 2 says the opposite
    heads[3][1, 0:20, 30:60] = 0.5 * heads[1][1, 0:20, 30:60]  # slice 1, top: head 3 halves it (milder)
    ranked = correction_order(disagreement_map(heads))
    assert str(ranked[0]).startswith("slice 3, bottom left: ") and ranked[0].box == (40, 60, 0, 30)
    assert (ranked[1].plane, ranked[1].region) == ((1,), "top")
    assert all(s.score == pytest.approx(0.0, abs=1e-6) for s in ranked[2:])
    assert ranked[0].centre == (3.0, 50.0, 15.0)
    assert len(ranked) == 5 * 9


def test_a_prediction_is_ranked_without_another_forward_pass(em_crop):
    pred = predict(em_crop, tiny(depth=3), depth=3, levels="all", runtime="torch")
    ranked = correction_order(pred, top=4)
    assert len(ranked) == 4 and ranked[0].score >= ranked[-1].score > 0
    spread = disagreement_map(pred.probabilities)
    y0, y1, x0, x1 = ranked[0].box
    assert ranked[0].score == pytest.approx(float(spread[ranked[0].plane][y0:y1, x0:x1].mean()), rel=1e-5)
    assert ranked[0].score == pytest.approx(max(s.score for s in correction_order(spread)), rel=1e-6)
    with pytest.raises(ValueError, match="two levels"):
        correction_order(predict(em_crop[0], tiny(), depth=1, runtime="torch"))
