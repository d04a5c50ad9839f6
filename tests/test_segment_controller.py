"""The Segment widget's controller and what it shows, without a viewer (plain pytest, no Qt): which plane is on
screen, the keys results are cached under, zoom, statistics, the model and its HU window, the channel, and what a
slider move computes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from napari_unetpp.data.windows import WINDOWS, Window
from napari_unetpp.errors import InputError
from napari_unetpp.inference.predict import normalization_stats
from napari_unetpp.model.card import ModelCard
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.model.modalities import new_model
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.napari.segment import controller as ctl
from napari_unetpp.napari.segment.controller import SegmentController, card_summary, objects_for, scale_note
from napari_unetpp.napari.segment.shown import Display, planes_to_show, timing_line

_ids = itertools.count()


class Img:
    """What the controller reads of a napari Image layer."""

    def __init__(self, data, scale=None, units=None, rgb=False, multiscale=False, metadata=None, name="img"):
        self.data, self.rgb, self.multiscale = data, rgb, multiscale
        nd = (data[0] if multiscale else data).ndim - (1 if rgb else 0)
        self.scale = tuple(scale or (1.0,) * nd)
        self.units = tuple(units or ("pixel",) * nd)
        self.metadata = metadata or {}
        self.name = name
        self.unique_id = next(_ids)


def tiny(spatial_dims=2, spacing_um=0.004, seed=0) -> LoadedModel:
    torch.manual_seed(seed)
    net = UNetPlusPlus(features=(4, 8, 8), spatial_dims=spatial_dims, norm="group")
    axes = "ZYX" if spatial_dims == 3 else "YX"
    card = ModelCard(
        name=f"tiny{spatial_dims}d",
        architecture=net.config.to_dict(),
        recommended_depth=2,
        training={"spacing": dict.fromkeys(axes, spacing_um), "spacing_unit": "um"},
    )
    return LoadedModel(net, card)


@pytest.fixture
def lm() -> LoadedModel:
    return tiny()


@pytest.fixture
def c(lm) -> SegmentController:
    models = {"tiny@v1": lm}
    return SegmentController(warn=lambda m: None, load=models.__getitem__)


def stack(z=5, y=40, x=36, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (z, y, x)).astype(np.uint8)


# ----------------------------------------------------------------- planes
def test_the_plane_on_screen(c, lm):
    two_d = Img(stack()[0])
    assert c.plane(two_d, lm, None, (3.0, 4.0)) == ("YX", ())
    zyx = Img(stack())
    assert c.plane(zyx, lm, None, (2.4, 0, 0)) == ("ZYX", (2,))
    assert c.plane(zyx, lm, None, (9.7, 0, 0))[1] == (4,)  # clipped to the stack
    assert c.plane(zyx, lm, None, (-3, 0, 0))[1] == (0,)
    tzyx = Img(np.zeros((2, 3, 40, 36), np.float32))
    assert c.plane(tzyx, lm, None, (1, 2, 0, 0)) == ("TZYX", (1, 2))
    vol = tiny(spatial_dims=3)
    assert c.plane(tzyx, vol, None, (1, 2, 0, 0)) == ("TZYX", (1,))  # a 3D model: the volume at time 1
    rgb = Img(np.zeros((40, 36, 3), np.uint8), rgb=True)
    assert c.plane(rgb, lm, None, (0, 0)) == ("YXC", ())
    pyramid = Img([stack(), stack()[:, ::2, ::2]], multiscale=True)
    assert c.source(pyramid, lm)[0].shape == (5, 40, 36)  # the finest level


def test_a_channel_of_the_first_axis(c, lm):
    data = np.stack([stack(), stack(seed=1)])  # C, Z, Y, X
    img = Img(data)
    assert [v for _, v in c.channel_choices(img, lm)] == [0, 1]
    assert c.lead(img, lm, 1) == 1 and c.lead(img, lm, None) == 0 and c.lead(img, lm, 5) == 0
    src, axes = c.source(img, lm, 1)
    assert axes == "ZYX" and np.array_equal(src, data[1])
    assert c.plane(img, lm, 1, (1, 3, 0, 0)) == ("ZYX", (3,))  # the channel coordinate is not the plane's
    assert ctl.result_shape(img, 1) == (5, 40, 36)
    assert c.channel_choices(Img(stack()), lm) == []  # no channel axis
    assert c.channel_choices(Img(np.zeros((40, 36, 3)), rgb=True), lm) == []
    assert c.channel_choices(Img(np.zeros((12, 5, 40, 36))), lm) == []  # 12 along the first axis: not channels


# ----------------------------------------------------------------- keys, data versions, forgetting
def test_result_keys(c, lm):
    img = Img(stack())
    k = c.key(img, lm, (0,))
    assert k == c.key(img, lm, (0,)) and k.plane == (0,) and k.channel is None and k.zoom is None
    assert c.key(img, lm, (1,)) != k
    assert c.key(Img(stack()), lm, (0,)) != k  # another layer (same data, same name)
    other = tiny(seed=1)  # other weights under the same name@vN
    assert other.card.id == lm.card.id and c.key(img, other, (0,)) != k
    data = np.stack([stack(), stack(seed=1)])
    two = Img(data)
    assert c.key(two, lm, (0,), 0) != c.key(two, lm, (0,), 1) != c.key(two, lm, (0,), None)
    assert c.is_current(k)
    assert c.data_changed(img.unique_id, (5, 40, 36)) is True  # (not watched: a shape it did not know)
    assert not c.is_current(k) and c.key(img, lm, (0,)).version == 1
    c.watch(two.unique_id, data.shape)
    assert c.data_changed(two.unique_id, data.shape) is False  # same shape: result layers stay


def test_the_cache_forgets_layers_and_models_that_went(c, lm):
    a, b = Img(stack()), Img(stack())
    c.model("tiny@v1")
    c.cache.put(c.key(a, lm, (0,)), {1: np.zeros((40, 36), np.float32)})
    c.cache.put(c.key(b, lm, (0,)), {1: np.zeros((40, 36), np.float32)})
    c.stats(a, lm)
    c.forget([b], ["tiny@v1"], "tiny@v1")
    assert [k.layer for k in c.cache.keys()] == [b.unique_id] and not c.has_stats(a.unique_id)
    c.forget([b], [], None)  # the model is no longer listed nor selected: dropped with its results
    assert len(c.cache) == 0 and c.loaded("tiny@v1") is None


# ----------------------------------------------------------------- zoom
def test_zoom_from_the_layers_pixel_size(c, lm):
    same = Img(stack(), scale=(0.05, 0.004, 0.004), units=("um",) * 3)
    assert c.zoom(same, lm) == (None, "")
    coarse = Img(stack(), scale=(0.05, 0.012, 0.012), units=("um",) * 3)
    zoom, why = c.zoom(coarse, lm)
    assert zoom == pytest.approx((3.0, 3.0)) and "0.012" in why
    assert c.key(coarse, lm, (0,)).zoom == zoom
    assert scale_note(zoom, why)[0] == "resampled x3.00 x 3.00"
    assert c.zoom(Img(stack(), scale=(2, 12, 12)), lm) == (None, "")  # pixels: as it is
    assert scale_note(None, "")[0] == "used as it is"


def test_a_pixel_size_far_from_the_models_is_said_once(lm):
    told = []
    c = SegmentController(warn=told.append, load={"tiny@v1": lm}.__getitem__)
    far = Img(stack(), scale=(2.0, 1.0, 1.0), units=("mm",) * 3, name="far.tif")
    zoom, why = c.zoom(far, lm)
    assert zoom is None and why.startswith("not resampled")
    c.zoom(far, lm)
    c.key(far, lm, (0,))
    assert len(told) == 1 and "far.tif" in told[0] and "segmented as it is" in told[0]
    assert "far from the model" in scale_note(zoom, why)[0]


# ----------------------------------------------------------------- statistics
def test_statistics_once_per_layer_data(c, lm, monkeypatch):
    calls = []
    real = ctl.normalization_stats
    monkeypatch.setattr(ctl, "normalization_stats", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    data = stack()
    img = Img(data, scale=(0.05, 0.012, 0.012), units=("um",) * 3)  # (resampled: the statistics are not)
    s = c.stats(img, lm)
    assert s == normalization_stats(data, lm) and c.stats(img, lm) == s and len(calls) == 1
    img.data = (255 - data).astype(np.uint8)
    c.data_changed(img.unique_id, data.shape)
    assert c.stats(img, lm) == normalization_stats(img.data, lm) and len(calls) == 2
    with pytest.raises(InputError, match="dimensions"):
        c.stats(Img(np.zeros((2, 2, 2, 8, 8))), lm)


# ----------------------------------------------------------------- model and window
def test_model_and_hu_window():
    ct = new_model("ct", name="ct-tiny")
    c = SegmentController(load={"ct-tiny@v1": ct}.__getitem__)
    assert c.model(None) is None and c.model("ct-tiny@v1") is ct
    lung = c.model("ct-tiny@v1", "lung")
    assert lung is not ct and "lung" in lung.normalization.describe() and c.model("ct-tiny@v1", "lung") is lung
    a = Img(np.zeros((4, 40, 36), np.int16), metadata={"unetpp_windows": [Window("AWIN", 400, 40)]})
    b = Img(np.zeros((4, 40, 36), np.int16), metadata={"unetpp_windows": [Window("BWIN", 1500, -600)]})
    assert "AWIN" in c.model("ct-tiny@v1", "dicom", a).normalization.describe()
    assert "BWIN" in c.model("ct-tiny@v1", "dicom", b).normalization.describe()
    with pytest.raises(InputError, match="no DICOM window"):
        c.model("ct-tiny@v1", "dicom", Img(np.zeros((4, 8, 8))))
    assert c.key(a, lung, (0,)).normalization != c.key(a, ct, (0,)).normalization
    c.forget([a], ["ct-tiny@v1"], "ct-tiny@v1")  # b went: its window's copy goes; presets and a's stay
    kept = {w.name for _, w in c.windowed_models()}
    assert kept == {"lung", "AWIN"} and set(kept) - {"AWIN"} <= set(WINDOWS)
    em = tiny()
    c2 = SegmentController(load={"em": em}.__getitem__)
    assert c2.model("em", "lung") is em  # a model without a window ignores the choice


def test_card_and_objects(lm):
    line, tip = card_summary(lm)
    assert line.endswith("...") and "recommended depth: L2" in tip
    assert objects_for(lm, "learned") == "watershed" and objects_for(lm, "components") == "components"
    cue = LoadedModel(UNetPlusPlus(features=(4, 8, 8), norm="group", cue="distance"), ModelCard("c", {}))
    assert objects_for(cue, "watershed") == "learned"


# ----------------------------------------------------------------- what a slider move computes
def test_a_slider_move_computes_only_what_is_not_cached(c, lm):
    img = Img(stack())
    plan = c.preview_plan(img, lm, None, (3, 0, 0), 2)
    assert plan.plane == (3,) and plan.axes == "YX" and plan.cached is None
    np.testing.assert_array_equal(plan.data, img.data[3])
    assert plan.stats == normalization_stats(img.data, lm)
    assert lm.max_depth == 2
    c.cache.put(plan.key, {1: np.full((40, 36), 0.2, np.float32)}, {1: 0.1})  # the slider was at L1
    assert c.preview_plan(img, lm, None, (3, 0, 0), 1).cached is not None  # shown at once
    assert c.preview_plan(img, lm, None, (3, 0, 0), 2).cached is None  # L2: computed
    c.cache.put(plan.key, {2: np.full((40, 36), 0.8, np.float32)}, {2: 0.1})  # and added to the plane's entry
    shown = c.preview_plan(img, lm, None, (3, 0, 0), 2).cached
    assert shown is not None and sorted(shown.probs) == [1, 2] and shown.seconds == {1: 0.1, 2: 0.1}
    assert c.cached(img, lm, None, (3, 0, 0), 1) is not None and c.cached(img, lm, None, (2, 0, 0), 1) is None


def test_what_a_cached_plane_shows(lm):
    res = ctl.PlaneResult(
        probs={1: np.full((8, 8), 0.4, np.float32), 2: np.full((8, 8), 0.9, np.float32)}, seconds={1: 0.1, 2: 0.2}
    )
    only = planes_to_show(res, lm, Display(2))
    assert [s.tag for s in only] == ["mask"] and only[0].labels and only[0].values.all()
    ens = planes_to_show(res, lm, Display(2, mode="ensemble", threshold=0.7, all_levels=True, disagreement=True))
    assert [s.tag for s in ens] == ["mask", "L1", "L2", "ensemble", "disagreement"]
    assert not ens[0].values.any()  # mean 0.65 < 0.7
    assert [s.visible for s in ens[1:4]] == [False, True, False] and ens[4].style["colormap"] == "inferno"
    only_l1 = ctl.PlaneResult(probs={1: res.probs[1]}, seconds={1: 0.1})
    assert planes_to_show(only_l1, lm, Display(2)) == []  # L2 is not computed yet: nothing to show
    assert timing_line(res, Display(2, mode="ensemble")) == "L1 0.10 s, L2 0.20 s (showing L2 ensemble)"
    assert Display(2).levels_kept() == [2] and Display(2, all_levels=True).levels_kept() == "all"
    assert Display(2, threshold=0.5).mask_choices != Display(2, threshold=0.6).mask_choices
