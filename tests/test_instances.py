"""Touching nuclei as separate objects: the distance-cue target, the learned split, object F1, the cue heads in the
network, loss, training data and prediction, and the CLI's --objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_unetpp.inference.postprocess import (
    CUE_UNKNOWN,
    decode_cue_target,
    distance_cue,
    encode_cue_target,
    split_instances,
)
from napari_unetpp.inference.predict import predict
from napari_unetpp.model.config import UNetPlusPlusConfig
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.model.network import UNet, UNetPlusPlus
from napari_unetpp.training import TrainingPair, prepare_data
from napari_unetpp.training.losses import DeepSupervisionLoss
from napari_unetpp.training.metrics import match_objects, object_f1
from napari_unetpp.training.steps import train_step

SAMPLES = Path(__file__).resolve().parents[1] / "napari_unetpp" / "_samples"
YY, XX = np.mgrid[:80, :80]


@pytest.fixture(scope="module")
def nuclei_crop() -> tuple[np.ndarray, np.ndarray]:
    """cells3d slices 40-41 (the shipped sample) with their instance labels, cropped to 128 x 160."""
    img = tifffile.imread(SAMPLES / "cells3d_nuclei_z40-47.tif")[:2, 40:168, 30:190]
    lab = tifffile.imread(SAMPLES / "cells3d_nuclei_z40-47_labels.tif")[:2, 40:168, 30:190]
    return img, lab.astype(np.int32)


def disks(centres: list[tuple[int, int]], radius: float) -> np.ndarray:
    """Instance labels of disks; where two overlap, each pixel goes to the nearer centre (they touch along a line)."""
    lab = np.zeros((80, 80), np.int32)
    best = np.full((80, 80), np.inf)
    for i, (cy, cx) in enumerate(centres, start=1):
        d = np.hypot(YY - cy, XX - cx)
        inside = (d < radius) & (d < best)
        lab[inside], best[inside] = i, d[inside]
    return lab


def notched_blob(depth: int = 9) -> np.ndarray:
    blob = np.hypot(YY - 40, XX - 40) < 16
    blob[(np.abs(YY - 40) < 3 + (XX - 24) * 0.15) & (XX < 24 + depth)] = False
    return blob.astype(np.int32)


# ------------------------------------------------------------------------------------------------ the cue target
def test_distance_cue_on_real_labels(nuclei_crop):
    _, lab = nuclei_crop
    cue = distance_cue(lab)
    assert cue.dtype == np.float32 and cue.shape == lab.shape
    assert not cue[lab == 0].any()
    assert (cue[lab > 0] > 0).all() and cue.max() <= 1.0
    for z in range(lab.shape[0]):  # each object peaks at exactly 1 in its own plane
        for i in np.unique(lab[z])[1:]:
            assert cue[z][lab[z] == i].max() == pytest.approx(1.0)


def test_distance_cue_is_low_where_objects_touch():
    lab = disks([(40, 33), (40, 47)], 10)
    cue = distance_cue(lab)
    contact = (lab[:, 1:] != lab[:, :-1]) & (lab[:, 1:] > 0) & (lab[:, :-1] > 0)
    assert contact.any()
    assert cue[:, 1:][contact].max() <= 0.25  # one pixel from the neighbour, against 7 at the centre
    assert cue[40, 33] > 0.8 and cue[40, 47] > 0.8


def test_encoded_target_round_trip(nuclei_crop):
    _, lab = nuclei_crop
    enc = encode_cue_target(lab)
    fg, cue, known = decode_cue_target(enc)
    np.testing.assert_array_equal(fg, lab > 0)
    assert known.all()
    np.testing.assert_allclose(cue, distance_cue(lab), atol=0.5 / 254 + 1e-6)
    # torch tensors too (the training step decodes on the device)
    fg_t, cue_t, _ = decode_cue_target(torch.from_numpy(enc))
    np.testing.assert_allclose(cue_t.numpy(), cue, atol=1e-6)
    # binary labels: the foreground is known, its split is not
    enc_b = encode_cue_target((lab > 0).astype(np.uint8), instance_labels=False)
    assert set(np.unique(enc_b)) == {0, CUE_UNKNOWN}
    fg_b, cue_b, known_b = decode_cue_target(enc_b)
    np.testing.assert_array_equal(fg_b, lab > 0)
    np.testing.assert_array_equal(known_b, lab == 0)
    assert not cue_b.any()


# ------------------------------------------------------------------------------------------------ the split
@pytest.mark.parametrize("method", ["watershed", "learned"])
def test_two_touching_disks_stay_two(method):
    lab = disks([(40, 33), (40, 47)], 10)  # centres 14 px apart: one connected blob
    assert split_instances(lab > 0, "components").max() == 1
    out = split_instances(lab > 0, method, cue=distance_cue(lab))
    assert out.max() == 2
    assert object_f1(out, lab)["f1"] == 1.0


@pytest.mark.parametrize("method", ["components", "watershed", "learned"])
def test_notched_blob_stays_one(method):
    lab = notched_blob()
    out = split_instances(lab > 0, method, cue=distance_cue(lab))
    assert out.max() == 1


def test_learned_split_keeps_an_elongated_nucleus_whole():
    """Where the distance-transform watershed over-splits (an elongated nucleus has a long flat ridge), a cue that
    knows the object keeps it one."""
    ell = (((YY - 40) / 7.0) ** 2 + ((XX - 40) / 30.0) ** 2 < 1).astype(np.int32)
    ws = split_instances(ell > 0, "watershed", min_distance=3)
    assert ws.max() > 1  # the failure the cue is for
    assert split_instances(ell > 0, "learned", cue=distance_cue(ell)).max() == 1


def test_learned_split_keeps_seedless_components_and_bad_inputs():
    lab = disks([(20, 20)], 6)
    cue = distance_cue(lab)
    cue[:] = np.minimum(cue, 0.05)  # no core stands out: the component is still one object
    assert split_instances(lab > 0, "learned", cue=cue).max() == 1
    with pytest.raises(ValueError, match="cue"):
        split_instances(lab > 0, "learned")
    with pytest.raises(ValueError, match="shape"):
        split_instances(lab > 0, "learned", cue=cue[:10])
    with pytest.raises(ValueError, match="one of"):
        split_instances(lab > 0, "stardist")
    assert split_instances(lab > 0, "connected components").max() == 1  # the old name still works


def test_ids_are_unique_across_slices(nuclei_crop):
    _, lab = nuclei_crop
    for method in ("components", "watershed", "learned"):
        out = split_instances(lab > 0, method, cue=distance_cue(lab))
        ids0, ids1 = set(np.unique(out[0])) - {0}, set(np.unique(out[1])) - {0}
        assert ids0 and ids1 and not ids0 & ids1
        assert out.dtype == np.uint32


# ------------------------------------------------------------------------------------------------ object F1
def test_match_objects_is_one_to_one():
    gt = np.zeros((20, 20), int)
    gt[2:10, 2:10] = 1
    gt[11:19, 11:19] = 2
    split = gt.copy()
    split[2:10, 2:6] = 3  # object 1 cut in half: each half has IoU 0.5 with it, and only one may match
    assert match_objects(split, gt) == (2, 1, 0)
    assert match_objects(split, gt, iou=0.51) == (1, 2, 1)
    merged = (gt > 0).astype(int)  # two equal objects as one: IoU 0.5 with each, one match at most
    assert match_objects(merged, gt) == (1, 0, 1)
    assert match_objects(merged, gt, iou=0.51) == (0, 1, 2)
    assert match_objects(np.zeros_like(gt), gt) == (0, 0, 2)
    assert object_f1(gt, gt)["f1"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        object_f1(gt, gt[:5])


# ------------------------------------------------------------------------------------------------ the network
def tiny(cue: str = "distance") -> UNetPlusPlus:
    torch.manual_seed(0)
    return UNetPlusPlus(features=(4, 8, 8, 8, 8), norm="batch", cue=cue)


def test_cue_heads_and_pruning():
    net = tiny().eval()
    x = torch.randn(2, 1, 40, 36)
    outs = net(x, cue=True)
    assert [o.shape[1] for o in outs] == [2, 2, 2, 2]
    plain = net(x)
    for o, p in zip(outs, plain):
        torch.testing.assert_close(o[:, :1], p)  # the class channel is the same head as without the cue
    for k in range(1, 5):
        torch.testing.assert_close(net.pruned(k)(x), outs[k - 1])
    names = [n for n, _ in net.modules_for_depth(2)]
    assert "cues.cue_1" in names and "cues.cue_2" in names and "cues.cue_3" not in names


def test_cue_config_round_trip_and_errors():
    net = tiny()
    d = net.config.to_dict()
    assert d["cue"] == "distance"
    assert "cue" not in tiny("none").config.to_dict()  # cards of models without a cue are unchanged
    again = UNetPlusPlus.from_config(d)
    again.load_state_dict(net.state_dict())
    # a model without a cue starts a cue model: only the cue heads are new
    missing, unexpected = tiny().load_state_dict(tiny("none").state_dict(), strict=False)
    assert sorted(missing) == sorted(f"cues.cue_{j}.{w}" for j in range(1, 5) for w in ("weight", "bias"))
    assert not unexpected
    with pytest.raises(ValueError, match="no instance cue"):
        tiny("none")(torch.zeros(1, 1, 16, 16), cue=True)
    with pytest.raises(ValueError, match="cue must be"):
        UNetPlusPlusConfig(cue="stardist")
    with pytest.raises(ValueError, match="1-class"):
        UNetPlusPlusConfig(num_classes=3, cue="distance")
    with pytest.raises(ValueError, match="U-Net"):
        UNet(features=(4, 8), cue="distance")


def test_training_step_trains_the_cue(nuclei_crop):
    img, lab = nuclei_crop
    net = tiny()
    lm = LoadedModel.from_module(net, name="t")
    ds = prepare_data(TrainingPair(img, lab, axes="ZYX", slices="all"), lm)
    assert all(not it.classes and not it.class_idx for it in ds.items)
    assert ds.summary["pairs"][0]["instance_labels"] is True
    it = ds.items[0]
    x = torch.from_numpy(it.image[None, :, :64, :64].copy())
    y = torch.from_numpy(it.target[None, :64, :64].copy())
    v = torch.ones_like(y, dtype=torch.bool)
    before = {k: p.detach().clone() for k, p in net.named_parameters() if k.startswith("cues.")}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss_fn = DeepSupervisionLoss()
    losses = [train_step(net, opt, loss_fn, x, y, v, 4, None, cue=True) for _ in range(15)]
    assert losses[-1] < losses[0]
    assert all(not torch.equal(before[k], p) for k, p in net.named_parameters() if k in before)
    # with binary labels the cue is unknown on objects: its loss there is 0 and the foreground still trains
    fg, cue, known = decode_cue_target(torch.from_numpy(encode_cue_target(lab[0] > 0, instance_labels=False)))
    assert not known[fg > 0].any()


def test_binary_labels_train_a_cue_model_without_its_split(nuclei_crop):
    img, lab = nuclei_crop
    lm = LoadedModel.from_module(tiny(), name="t")
    ds = prepare_data(TrainingPair(img, (lab > 0).astype(np.uint8), axes="ZYX", slices="all"), lm)
    assert ds.summary["pairs"][0]["instance_labels"] is False
    assert set(np.unique(np.concatenate([it.target.ravel() for it in ds.items]))) == {0, CUE_UNKNOWN}


# ------------------------------------------------------------------------------------------------ prediction
def test_predict_objects_with_a_cue_model(nuclei_crop):
    img, _ = nuclei_crop
    lm = LoadedModel.from_module(tiny(), name="t")
    whole = predict(img, lm, axes="ZYX", levels="all", objects="learned", precision="fp32")
    assert whole.objects_method == "learned"
    assert whole.cue is not None and whole.cue.shape == whole.mask.shape
    assert sorted(whole.cues) == [1, 2, 3, 4]
    np.testing.assert_array_equal(whole.cue, whole.cues[4])  # the mask's level
    assert whole.objects.dtype == np.uint32
    expect = split_instances(whole.mask, "learned", cue=whole.cue.astype(np.float32))
    np.testing.assert_array_equal(whole.objects, expect)
    ens = predict(img, lm, axes="ZYX", mode="ensemble", objects="components", precision="fp32")
    assert ens.objects_method == "components" and ens.cue is not None


def test_predict_objects_without_a_cue_falls_back(em_model):
    crop = tifffile.imread(SAMPLES / "cells3d_nuclei_z40-47.tif")[:3, :96, :96]
    res = predict(crop, em_model, axes="ZYX", objects="learned")
    assert res.objects_method == "watershed" and res.cue is None and res.cues == {}
    np.testing.assert_array_equal(res.objects, split_instances(res.mask, "watershed"))
    none = predict(crop, em_model, axes="ZYX")
    assert none.objects is None and none.objects_method == "none"
    with pytest.raises(ValueError, match="one of"):
        predict(crop, em_model, axes="ZYX", objects="cellpose")


def test_objects_need_a_one_class_model():
    from napari_unetpp.errors import InputError

    lm = LoadedModel.from_module(UNetPlusPlus(num_classes=3, features=(4, 8)), name="m")
    with pytest.raises(InputError, match="1-class"):
        predict(np.zeros((32, 32), np.float32), lm, objects="components")
    assert predict(np.zeros((32, 32), np.float32), lm).objects is None


def test_fine_tuning_a_cue_model_keeps_and_trains_its_cue(nuclei_crop):
    """A whole fine-tuning run on instance labels: the saved model keeps its cue heads (whichever state won; the
    step itself is tested above) and predicts objects with the learned split."""
    from napari_unetpp.model.registry import load_model
    from napari_unetpp.training import fine_tune

    img, lab = nuclei_crop
    base = LoadedModel.from_module(tiny(), name="cue-base")
    res = fine_tune(
        base,
        TrainingPair(img, lab, axes="ZYX", slices="all", name="nuclei"),
        epochs=2,
        steps_per_epoch=3,
        batch_size=2,
        patch_size=64,
        device="cpu",
    )
    saved = load_model(res.path)
    assert saved.module.config.has_cue
    assert res.data["pairs"][0]["instance_labels"] is True
    pred = predict(img[:1], saved, axes="ZYX", objects="learned")
    assert pred.objects_method == "learned" and pred.cue is not None


# ------------------------------------------------------------------------------------------------ the shipped model
def _rendered(lab: np.ndarray, seed: int = 0) -> np.ndarray:
    """A fluorescence-like image of labels: evenly bright objects, blurred, on a dim noisy background."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter((lab > 0).astype(float), 1.5) * 800 + 100 + rng.normal(0, 20, lab.shape)
    return img.astype(np.float32)


def _big_disks(centres, radius, size=128):
    yy, xx = np.mgrid[:size, :size]
    lab = np.zeros((size, size), np.int32)
    best = np.full((size, size), np.inf)
    for i, (cy, cx) in enumerate(centres, start=1):
        d = np.hypot(yy - cy, xx - cx)
        inside = (d < radius) & (d < best)
        lab[inside], best[inside] = i, d[inside]
    return lab


@pytest.mark.parametrize(("radius", "gap", "level"), [(7, 12, 3), (18, 30, 2), (18, 30, 3), (18, 30, 4)])
def test_shipped_model_splits_rendered_touching_nuclei(radius, gap, level):
    """The shipped nuclei-objects model on two evenly bright touching disks (no dim line between them, so only the
    shape tells them apart) and on one notched nucleus: two objects and one."""
    from napari_unetpp import load_model

    lm = load_model("nuclei-objects")
    two = _big_disks([(64, 64 - gap / 2), (64, 64 + gap / 2)], radius)
    yy, xx = np.mgrid[:128, :128]
    notched = np.hypot(yy - 64, xx - 64) < radius * 1.5
    notched &= ~((np.abs(yy - 64) < 2 + (xx - (64 - radius * 1.5)) * 0.15) & (xx < 64 - radius * 0.6))
    for lab, expect in ((two, 2), (notched.astype(np.int32), 1)):
        img = np.stack([_rendered(lab)] * 2)  # a 2-slice stack: the normalisation sees a stack, as users' do
        res = predict(img, lm, axes="ZYX", depth=level, objects="learned")
        assert res.objects_method == "learned"
        assert len(np.unique(res.objects[0])) - 1 == expect
        assert predict(img, lm, axes="ZYX", depth=level, objects="components").objects[0].max() == 1


def test_fill_object_holes_per_object_and_plane():
    from napari_unetpp.inference.postprocess import fill_object_holes

    lab = np.zeros((2, 20, 20), np.uint16)
    lab[0, 2:9, 2:9] = 1
    lab[0, 4:7, 4:7] = 0  # a nucleolus left out
    lab[0, 5, 5] = 2  # another object inside the hole stays itself
    lab[1, 10:15, 10:15] = 3
    out = fill_object_holes(lab)
    assert out.dtype == np.int32 and lab[0, 4, 4] == 0  # a copy
    assert (out[0, 4:7, 4:7] >= 1).all()
    assert out[0, 5, 5] == 2 and out[0, 4, 4] == 1 and (out[1] == lab[1]).all()


def test_level_object_scores(nuclei_crop):
    from napari_unetpp.training.metrics import level_object_scores

    img, lab = nuclei_crop
    lm = LoadedModel.from_module(tiny(), name="t")
    pred = predict(img, lm, axes="ZYX", levels=[2, 4], precision="fp32")
    scores = level_object_scores(pred, lab)
    assert sorted(scores) == [2, 4]
    row = scores[4]
    assert {"dice", "f1_components", "f1_watershed", "f1_learned"} <= set(row) and row["seconds_learned"] >= 0
    assert row["f1_components"] == round(
        object_f1(split_instances(pred.probabilities[4].astype(np.float32) >= 0.5, "components"), lab)["f1"], 4
    )
    plain = LoadedModel.from_module(tiny("none"), name="p")
    assert "f1_learned" not in level_object_scores(predict(img, plain, axes="ZYX"), lab)[4]
