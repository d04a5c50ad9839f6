"""Fine-tuning core: every step function on its own, then whole runs on a real EM crop with tiny models."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_unetpp.inference.predict import InputError, predict
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.model.registry import load_model, save_model
from napari_unetpp.training import (
    TrainingDataError,
    TrainingPair,
    augment_batch,
    default_name,
    dice_score,
    fine_tune,
    parse_slices,
    prepare_data,
    random_affine,
    recommend_depth,
    sample_batch,
    shrink_after_oom,
    train_step,
    validate,
)
from napari_unetpp.training.losses import DeepSupervisionLoss

from .conftest import dice
from .conftest import tiny_batchnorm as tiny


# ---------------------------------------------------------------------------------------------------- parsing
def test_parse_slices():
    assert parse_slices("3, 7, 10-12") == [3, 7, 10, 11, 12]
    assert parse_slices(" 5;2 ,5") == [2, 5]
    assert parse_slices("all") == "all" and parse_slices("  ") is None
    with pytest.raises(ValueError, match="'x'"):
        parse_slices("1, x")
    with pytest.raises(ValueError, match="9-3"):
        parse_slices("9-3")


# ---------------------------------------------------------------------------------------------------- data
def test_known_pixels_from_slices_default_and_ignore(em_crop, em_crop_membrane):
    lm = tiny()
    lab = em_crop_membrane.astype(np.int32)
    ds = prepare_data(TrainingPair(em_crop, lab, slices=[0, 2]), lm)
    assert [it.source for it in ds.items] == ["pair 0 slice (0,)", "pair 0 slice (2,)"]
    assert ds.n_train + ds.n_val == 2 * lab[0].size

    partial = lab.copy()
    partial[1] = 0  # slice 1 not annotated: by default only slices holding labels are known
    assert len(prepare_data(TrainingPair(em_crop, partial), lm).items) == 2

    ign = lab.copy()
    ign[0, :40] = 7  # the ignore value makes those pixels unknown, not background
    ds = prepare_data(TrainingPair(em_crop, ign, slices=[0]), lm, ignore_label=7)
    it = ds.items[0]
    assert not (it.train | it.val)[:40].any() and (it.train | it.val)[40:].all()


def test_validation_blocks_are_disjoint_and_stable_across_rounds(em_crop, em_crop_membrane):
    lm = tiny()
    one = prepare_data(TrainingPair(em_crop, em_crop_membrane, slices=[1]), lm)
    three = prepare_data(TrainingPair(em_crop, em_crop_membrane, slices="all"), lm)
    for ds in (one, three):
        for it in ds.items:
            assert not (it.train & it.val).any()
            assert it.val.any() and it.train.any()
    # slice 1's validation pixels do not depend on which other slices were corrected
    np.testing.assert_array_equal(one.items[0].val, three.items[1].val)
    frac = three.n_val / (three.n_val + three.n_train)
    assert 0.05 < frac < 0.45


@pytest.mark.parametrize(
    "case, match",
    [
        ("shape", "shape"),
        ("empty", "no known pixels"),
        ("background", "all background"),
        ("foreground", "all label 1"),
        ("tiny", "too little annotated data"),
        ("classes", "3 classes"),
        ("slice", "outside"),
    ],
)
def test_unusable_labels_get_one_sentence(em_crop, em_crop_membrane, case, match):
    lm = tiny()
    lab = em_crop_membrane.astype(np.int32)
    pair = TrainingPair(em_crop, lab, slices=[0])
    if case == "shape":
        pair.labels = lab[:, :-1]
    elif case == "empty":
        pair = TrainingPair(em_crop, np.zeros_like(lab))
    elif case == "background":
        pair.labels = np.zeros_like(lab)
    elif case == "foreground":
        pair.labels = np.ones_like(lab)
    elif case == "tiny":
        known = np.zeros(lab.shape, bool)
        known[0, :20, :20] = True
        pair.known = known
    elif case == "classes":
        lm = LoadedModel.from_module(UNetPlusPlus(features=(8, 16), num_classes=3), name="tiny3")
        pair.labels = lab * 5
    elif case == "slice":
        pair.slices = [9]
    with pytest.raises(TrainingDataError, match=match) as err:
        prepare_data(pair, lm)
    assert "\n" not in str(err.value)


def test_non_finite_image_is_refused(em_crop, em_crop_membrane):
    img = em_crop.astype(np.float32)
    img[0, 5, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        prepare_data(TrainingPair(img, em_crop_membrane), tiny())


# ---------------------------------------------------------------------------------------------------- batches
def test_sample_batch_centres_on_training_pixels_and_hides_validation(em_crop, em_crop_membrane):
    ds = prepare_data(TrainingPair(em_crop, em_crop_membrane, slices="all"), tiny())
    rng = np.random.default_rng(0)
    centres = []
    x, y, v = sample_batch(ds, rng, 32, (64, 64), focus_fraction=0, foreground_fraction=1.0, centres=centres)
    assert x.shape == (32, 1, 64, 64) and y.shape == v.shape == (32, 64, 64) and v.dtype == bool
    for ii, c in centres:  # centred on known training foreground pixels
        it = ds.items[ii]
        assert it.train[c] and it.target[c] == 1 and not it.val[c]
    assert {ii for ii, _ in centres} == {0, 1, 2}
    # validation pixels are never known in a batch: compare each patch's known mask with the items' masks
    centres = []
    x1, y1, v1 = sample_batch(ds, rng, 64, (64, 64), focus_fraction=0, foreground_fraction=0, centres=centres)
    seen_val = 0
    for b, (ii, c) in enumerate(centres):
        it = ds.items[ii]
        sl = tuple(
            slice(int(np.clip(ci - 32, 0, d - 64)), int(np.clip(ci - 32, 0, d - 64)) + 64)
            for ci, d in zip(c, it.target.shape)
        )
        np.testing.assert_array_equal(x1[b, 0], it.image[0][sl])
        np.testing.assert_array_equal(y1[b], it.target[sl])
        np.testing.assert_array_equal(v1[b], it.train[sl])  # known = training pixels of the item, exactly
        assert not (v1[b] & it.val[sl]).any()
        seen_val += int(it.val[sl].sum())
    assert seen_val > 0  # the patches did reach into validation blocks: their pixels were seen, never as labels
    centre_labels = np.array([ds.items[ii].target[c] for ii, c in centres])
    assert (centre_labels == 1).mean() < 0.6  # without the foreground preference, about the membrane share


def test_sample_batch_prefers_changed_pixels(em_crop, em_crop_membrane):
    focus = np.zeros(em_crop_membrane.shape, bool)
    focus[0, 100:110, 100:110] = True
    ds = prepare_data(TrainingPair(em_crop, em_crop_membrane, slices="all", focus=focus), tiny())
    n_focus = sum(len(it.focus_idx) for it in ds.items)
    assert 0 < n_focus <= 100
    centres = []
    sample_batch(
        ds, np.random.default_rng(1), 300, (32, 32), focus_fraction=1.0, foreground_fraction=0, centres=centres
    )
    on_focus = [ii == 0 and 100 <= c[0] < 110 and 100 <= c[1] < 110 for ii, c in centres]
    share0 = np.mean([ii == 0 for ii, _ in centres])
    assert np.mean(on_focus) == pytest.approx(share0)  # every patch from slice 0 centres on a changed pixel
    assert 0.2 < share0 < 0.5


def test_augment_keeps_image_and_labels_aligned():
    rng = np.random.default_rng(0)
    y = (rng.random((8, 32, 32)) > 0.5).astype(np.int64)
    v = rng.random((8, 32, 32)) > 0.3
    x = y[:, None].astype(np.float32)  # image = labels: the relation must survive every transform
    xa, ya, va = augment_batch(x, y, v, rng)
    assert xa.shape == x.shape and ya.shape == y.shape and va.dtype == bool
    assert va.sum() == v.sum()  # flips and rotations only move pixels
    for b in range(8):
        thr = 0.5 * (xa[b, 0][ya[b] == 1].mean() + xa[b, 0][ya[b] == 0].mean())
        assert ((xa[b, 0] > thr) == (ya[b] == 1)).mean() > 0.99
    assert not np.array_equal(xa, x)


def test_random_affine_moves_labels_with_the_image():
    rng = np.random.default_rng(0)
    y = torch.zeros(4, 64, 64, dtype=torch.long)
    y[:, 20:44, 10:30] = 1
    x = y[:, None].float()
    v = torch.ones(4, 64, 64, dtype=torch.bool)
    xa, ya, va = random_affine(x, y, v, rng, probability=1.0)
    assert not torch.equal(ya, y)
    agree = ((xa[:, 0] > 0.5).long() == ya)[va]
    assert agree.float().mean() > 0.97
    x0, y0, v0 = random_affine(x, y, v, rng, probability=0.0)
    assert x0 is x and y0 is y and v0 is v
    # 3D: rotation in YX only
    y3 = torch.zeros(2, 8, 32, 32, dtype=torch.long)
    y3[:, 2:6, 8:24, 8:16] = 1
    xa3, ya3, va3 = random_affine(y3[:, None].float(), y3, torch.ones_like(y3, dtype=torch.bool), rng, 1.0)
    assert ya3.shape == y3.shape and ((xa3[:, 0] > 0.5).long() == ya3).float().mean() > 0.97


# ---------------------------------------------------------------------------------------------------- steps
def test_train_step_lowers_the_loss_and_touches_only_the_trained_depth(em_crop, em_crop_membrane):
    lm = tiny(depth=3)
    net = lm.module.train()
    ds = prepare_data(TrainingPair(em_crop, em_crop_membrane, slices="all"), lm)
    x, y, v = (torch.from_numpy(a) for a in sample_batch(ds, np.random.default_rng(0), 4, (64, 64)))
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    params = [p for _, m in net.modules_for_depth(1) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = [train_step(net, opt, DeepSupervisionLoss(), x, y, v, depth=1, amp=None) for _ in range(15)]
    assert losses[-1] < 0.8 * losses[0]
    changed = {k.split(".")[1] for k, p in net.named_parameters() if not torch.equal(p, before[k])}
    assert changed == {"x_0_0", "x_1_0", "x_0_1", "head_1"}


def test_train_step_ignores_unknown_pixels():
    net = UNetPlusPlus(features=(4, 8)).train()
    x = torch.randn(2, 1, 32, 32)
    y = torch.randint(0, 2, (2, 32, 32))
    v = torch.zeros(2, 32, 32, dtype=torch.bool)
    v[:, :16] = True
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    y2 = y.clone()
    y2[:, 16:] = 1 - y2[:, 16:]  # flipping unknown labels must not change the loss
    a = train_step(net, opt, DeepSupervisionLoss(), x, y, v, 1, None)
    b = train_step(net, opt, DeepSupervisionLoss(), x, y2, v, 1, None)
    assert a == pytest.approx(b, abs=1e-6)


def test_validate_matches_a_direct_computation(em_crop, em_crop_membrane):
    lm = tiny(depth=2)
    ds = prepare_data(TrainingPair(em_crop, em_crop_membrane, slices="all"), lm)
    scores = validate(lm.module, ds, torch.device("cpu"), None)  # each plane fits one tile: the whole plane
    assert set(scores) == {1, 2}
    lm.module.eval()
    with torch.no_grad():
        preds = [[(o[0, 0] > 0).numpy() for o in lm.module(torch.from_numpy(it.image)[None])] for it in ds.items]
    for lv in (1, 2):
        p = np.concatenate([pr[lv - 1][it.val] for pr, it in zip(preds, ds.items)])
        t = np.concatenate([it.target[it.val] for it in ds.items])
        assert scores[lv] == pytest.approx(dice_score(p, t), abs=1e-3)


def test_dice_score_and_recommended_depth():
    a = np.array([1, 1, 0, 0])
    assert dice_score(a, np.array([1, 0, 0, 0])) == pytest.approx(2 / 3)
    assert dice_score(np.zeros(4), np.zeros(4)) == 1.0
    assert dice_score(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 1]), num_classes=3) == pytest.approx(
        (2 / 3 + 2 / 3) / 2
    )
    assert dice_score(a, a[::-1], mask=np.array([1, 0, 0, 1], bool)) == 0.0
    assert recommend_depth({1: 0.80, 2: 0.895, 3: 0.90, 4: 0.899}, margin=0.01) == 2
    assert recommend_depth({1: 0.80, 2: 0.85, 3: 0.90, 4: 0.899}, margin=0.0) == 3


def test_shrink_after_oom():
    assert shrink_after_oom(8, (256, 256), 16) == (4, (256, 256))
    assert shrink_after_oom(1, (256, 256), 16) == (1, (128, 128))
    assert shrink_after_oom(1, (48, 40), 16) == (1, (32, 32))
    with pytest.raises(MemoryError, match="out of memory"):
        shrink_after_oom(1, (32, 32), 16)


# ---------------------------------------------------------------------------------------------------- runs
def test_fine_tune_raises_validation_dice_and_saves_a_child_version(em_crop, em_crop_membrane):
    """End to end on a real EM crop, CPU, a few seconds: validation Dice rises and the new version loads."""
    base = tiny(depth=2)
    ref = {k: v.clone() for k, v in base.module.state_dict().items()}
    phases = []
    res = fine_tune(
        base,
        TrainingPair(em_crop, em_crop_membrane, slices=[0, 1], name="isbi crop"),
        epochs=6,
        steps_per_epoch=8,
        batch_size=4,
        patch_size=96,
        learning_rate=3e-3,
        patience=0,
        refit_from=0.0,  # every validation counts (the last phase on validation pixels has its own test)
        device="cpu",
        on_progress=lambda p: phases.append(p.phase),
    )
    assert phases[:2] == ["prepared", "baseline"] and phases[-1] == "saving"
    assert phases.count("validate") == 6 and phases.count("train") == 48
    assert res.steps == 48 and res.stopped == "budget" and res.improved
    best_base, best_after = max(res.baseline.values()), max(res.scores.values())
    assert best_after > best_base + 0.1, (res.baseline, res.scores)
    assert res.recommended_depth in (1, 2)
    # the base model is untouched
    assert all(torch.equal(v, base.module.state_dict()[k]) for k, v in ref.items())
    # the saved version: card with parent, scores, recommended depth; predicts like the returned model
    again = load_model(res.path)
    c = again.card
    assert (
        c.parent == "tiny@v1" and c.name == "tiny" and c.version == 1 and c.recommended_depth == res.recommended_depth
    )
    assert set(c.scores) == {"L1", "L2"} and c.training["baseline_scores"]["L1"]["dice"] == res.baseline[1]
    assert c.training["data_summary"]["pairs"][0]["name"] == "isbi crop"
    assert c.training["hyperparameters"]["learning_rate"] == 3e-3
    # the saved weights are the best validated state: validated again, they score what the card records
    assert _revalidated(again, em_crop, em_crop_membrane, [0, 1]) == pytest.approx(_card_scores(c), abs=1e-3)
    assert _card_scores(c) in [h["val"] for h in res.history]
    p1 = predict(em_crop[2], again, depth=2, precision="fp32").mask
    p2 = predict(em_crop[2], res.model, depth=2, precision="fp32").mask
    np.testing.assert_array_equal(p1, p2)
    # slice 2 was never corrected: the held-out slice improves too
    before = predict(em_crop[2], base, depth=2, precision="fp32").mask
    assert dice(p1, em_crop_membrane[2]) > dice(before, em_crop_membrane[2]) + 0.05


def _card_scores(card) -> dict[int, float]:
    return {int(k[1:]): v["dice"] for k, v in card.scores.items()}


def _revalidated(model, image, labels, slices) -> dict[int, float]:
    """Validation Dice of a model on the same held-out pixels the fine-tuning used, at the run's precision."""
    from napari_unetpp.runtimes.device import autocast_dtype

    ds = prepare_data(TrainingPair(image, labels, slices=slices), model)
    cpu = torch.device("cpu")
    return validate(model.module, ds, cpu, autocast_dtype(cpu, "auto", training=True))


def test_the_saved_version_is_the_best_state_not_the_last(em_crop, em_crop_membrane, monkeypatch):
    """Training that wrecks the network after the first validation (heads that predict nothing): the saved version
    is the best validated state, its card records that state's scores, and the weights score them again."""
    import napari_unetpp.training.optimiser as tr

    real, calls = tr.train_step, {"n": 0}

    def wrecking(module, *a, **k):
        loss = real(module, *a, **k)
        calls["n"] += 1
        if calls["n"] > 3:  # after the first validation (steps_per_epoch=3): every head says background
            with torch.no_grad():
                for name, p in module.named_parameters():
                    if name.startswith("heads."):
                        p.fill_(0.0) if name.endswith("weight") else p.fill_(-20.0)
        return loss

    monkeypatch.setattr(tr, "train_step", wrecking)
    res = fine_tune(
        tiny(depth=2),
        TrainingPair(em_crop, em_crop_membrane, slices=[0, 1]),
        epochs=2,
        steps_per_epoch=3,
        batch_size=2,
        patch_size=64,
        learning_rate=3e-3,
        patience=0,
        refit_from=0.0,
        device="cpu",
    )
    last = res.history[-1]["val"]
    assert max(last.values()) < 0.05  # the last state predicts no membrane
    saved = load_model(res.path)
    best = _card_scores(saved.card)
    assert best == res.scores and best in [h["val"] for h in res.history[:2]] and min(best.values()) > 0.1
    assert _revalidated(saved, em_crop, em_crop_membrane, [0, 1]) == pytest.approx(best, abs=1e-3)


def test_stop_event_keeps_the_best_state(em_crop, em_crop_membrane):
    stop = threading.Event()

    def on_progress(p):
        if p.phase == "train" and p.step == 7:
            stop.set()

    res = fine_tune(
        tiny(),
        TrainingPair(em_crop, em_crop_membrane, slices="all"),
        epochs=50,
        steps_per_epoch=3,
        batch_size=2,
        patch_size=64,
        device="cpu",
        stop=stop,
        learning_rate=3e-3,
        on_progress=on_progress,
    )
    assert res.stopped == "stopped by user" and res.steps == 7
    assert res.history[-1]["step"] == 7  # validated once more before stopping
    card = load_model("tiny").card
    assert card.training["stopped"] == "stopped by user" and card.training["steps"] == 7
    assert card.scores == {f"L{k}": {"dice": v} for k, v in res.scores.items()}


def test_out_of_memory_retries_smaller(em_crop, em_crop_membrane, monkeypatch):
    import napari_unetpp.training.optimiser as tr

    real = tr.train_step
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)

    monkeypatch.setattr(tr, "train_step", flaky)
    msgs = []
    res = fine_tune(
        tiny(),
        TrainingPair(em_crop, em_crop_membrane, slices="all"),
        epochs=1,
        steps_per_epoch=3,
        batch_size=4,
        patch_size=64,
        small_patch_size=64,  # one patch size throughout
        device="cpu",
        save=False,
        on_progress=lambda p: msgs.append((p.phase, p.message)),
    )
    retry = [m for ph, m in msgs if ph == "retry"]
    assert retry == ["out of memory: retrying with batch 2, patches 64x64"]
    assert res.steps == 3 and res.path is None and res.data["batch"] == 4


def test_fast_update_trains_the_shallow_levels_only(em_crop, em_crop_membrane):
    base = tiny(depth=3)
    res = fine_tune(
        base,
        TrainingPair(em_crop, em_crop_membrane, slices="all"),
        epochs=1,
        steps_per_epoch=4,
        batch_size=2,
        patch_size=64,
        device="cpu",
        train_depth=1,
        learning_rate=1e-2,
        save=False,
        min_delta=-1.0,
    )
    new = res.model.module.state_dict()
    old = base.module.state_dict()
    changed = {k.split(".")[1] for k in old if not torch.equal(old[k], new[k])}
    assert changed and changed <= {"x_0_0", "x_1_0", "x_0_1", "head_1"}
    assert set(res.scores) == {1, 2, 3}  # every level is re-validated: deeper ones share the encoder


def test_shipped_models_fine_tune_into_their_own_name(em_model, em_crop, em_crop_membrane):
    assert default_name(em_model) == "em-membranes-finetuned"
    res = fine_tune(
        em_model,
        TrainingPair(em_crop, em_crop_membrane, slices=[0]),
        epochs=1,
        steps_per_epoch=2,
        batch_size=2,
        patch_size=96,
        device="cpu",
        classes=["cell border"],
    )
    assert res.model.card.id == "em-membranes-finetuned@v1" and res.model.card.parent == "em-membranes@v1"
    assert load_model("em-membranes-finetuned").card.classes == ["cell border"]
    assert load_model("em-membranes").shipped  # the shipped name still means the shipped model
    assert load_model("em-membranes").card.classes == ["membrane"]


@pytest.mark.parametrize("classes", [["a", "b"], [""], []])
def test_class_names_must_fit_the_model(em_model, em_crop, em_crop_membrane, classes):
    with pytest.raises(TrainingDataError, match="needs one class name"):
        fine_tune(
            em_model, TrainingPair(em_crop, em_crop_membrane, slices=[0]), epochs=1, device="cpu", classes=classes
        )


def test_saving_under_a_shipped_name_never_shadows_it(em_model):
    from napari_unetpp.model.card import ModelCard

    card = ModelCard(name="em-membranes", architecture={})
    path = save_model(em_model.module, card)
    assert card.version == 2 and path.name == "em-membranes-v2.json"
    assert load_model("em-membranes@v1").shipped


def test_3d_model_fine_tunes_on_known_planes_of_a_volume(em_crop, em_crop_membrane):
    """A 3D model takes volumes; listed slices are z planes inside the volume, and the rest of it is unknown."""
    torch.manual_seed(0)
    base = LoadedModel.from_module(UNetPlusPlus(features=(4, 8, 16), spatial_dims=3, norm="batch"), name="tiny3d")
    ds = prepare_data(TrainingPair(em_crop, em_crop_membrane, axes="ZYX", slices=[0, 2]), base)
    assert len(ds.items) == 1 and ds.items[0].image.shape == (1, 3, 161, 187)
    known = ds.items[0].train | ds.items[0].val
    assert known[[0, 2]].all() and not known[1].any()
    res = fine_tune(
        base,
        TrainingPair(em_crop, em_crop_membrane, axes="ZYX", slices=[0, 2]),
        epochs=2,
        steps_per_epoch=3,
        batch_size=2,
        patch_size=64,
        device="cpu",
        learning_rate=1e-3,
        precision="fp32",
    )  # bf16 3D from scratch hit a NaN loss once in a full-suite run (open)
    assert res.steps == 6 and res.data["patch"] == [4, 64, 64] and set(res.scores) == {1, 2}
    assert load_model(res.path).module.config.spatial_dims == 3


def test_multi_class_labels_train_a_softmax_model(em_crop, em_crop_membrane):
    """Class values (0 background, 1 membrane, 2 a made-up class) train a 3-class model; Dice averages classes."""
    torch.manual_seed(0)
    base = LoadedModel.from_module(UNetPlusPlus(features=(8, 16, 32), num_classes=3, norm="batch"), name="mc")
    lab = em_crop_membrane.astype(np.int32)
    lab[:, :, 120:][lab[:, :, 120:] == 0] = 2
    res = fine_tune(
        base,
        TrainingPair(em_crop, lab, slices=[0, 1]),
        epochs=4,
        steps_per_epoch=6,
        batch_size=4,
        patch_size=96,
        device="cpu",
        learning_rate=3e-3,
        save=False,
        patience=0,
    )
    assert max(res.scores.values()) > max(res.baseline.values())


def test_unknown_pixels_cannot_poison_the_loss():
    """An infinite logit on an unknown pixel (exploding activations far from the labels) must not become NaN."""
    logits = torch.zeros(1, 1, 4, 4)
    logits[0, 0, 0, 0] = float("inf")
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 0, 0] = False
    loss = DeepSupervisionLoss()([logits], target, valid)
    assert torch.isfinite(loss)


def test_only_previously_trained_batch_norms_are_frozen(em_crop, em_crop_membrane, em_model):
    from napari_unetpp.training import trained_batchnorms

    assert len(trained_batchnorms(em_model.module)) == 30  # the shipped model: all its batch norms
    assert trained_batchnorms(tiny().module) == []  # from scratch: they learn their statistics
    res = fine_tune(
        tiny(),
        TrainingPair(em_crop, em_crop_membrane, slices="all"),
        epochs=3,
        steps_per_epoch=2,
        batch_size=2,
        patch_size=64,
        device="cpu",
        save=False,
        min_delta=-1.0,
    )
    counts = {int(v) for k, v in res.model.module.state_dict().items() if k.endswith("num_batches_tracked")}
    assert counts == {6}  # updated at every step, also after validations
