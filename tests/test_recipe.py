"""How fine-tuning decides to train: each decision on its own, then the bugs found in review, each with the case
that failed before its fix."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from napari_unetpp.inference.predict import predict
from napari_unetpp.model.modalities import MODALITIES, new_model
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.model.registry import list_models, load_model, save_model
from napari_unetpp.training import TrainingPair, augment_batch, fine_tune, fine_tune_iter, prepare_data
from napari_unetpp.training.known import blocks
from napari_unetpp.training.recipe import (
    ADAPT_LR,
    GENTLE_LR,
    GOOD_BASELINE,
    SCRATCH_LR,
    adapt_learning_rate,
    choose_recipe,
    patch_at,
    reestimate_batchnorm,
)
from napari_unetpp.training.steps import small_patch_for

from .conftest import DATA, dice
from .conftest import tiny_batchnorm as tiny


# ------------------------------------------------------------------------------------------------ decisions
def test_recipe_follows_the_baseline_of_the_trained_levels():
    good = choose_recipe({1: 0.80, 2: 0.9}, [1, 2])
    assert good.name == "gentle" and good.learning_rate == GENTLE_LR and good.freeze_batchnorm
    assert not good.reestimate_batchnorm and good.small_patch_until == 0
    poor = choose_recipe({1: 0.3, 2: 0.5}, [1, 2])
    assert poor.name == "adapt" and not poor.freeze_batchnorm and poor.reestimate_batchnorm
    assert poor.small_patch_until > 0 and poor.first_validation > 0
    assert "0.50" in poor.reason  # the figure behind the decision is in the card and on screen
    # fast mode (train depth 2): a good L3 the run will not train does not make the recipe gentle
    assert choose_recipe({1: 0.2, 2: 0.3, 3: 0.9}, [1, 2]).name == "adapt"
    assert choose_recipe({1: 0.2, 2: 0.3, 3: 0.9}, [1, 2, 3]).name == "gentle"
    assert choose_recipe({1: 0.9}, [1], fresh=True).name == "scratch"
    assert choose_recipe({1: 0.9}, [1], fresh=True).learning_rate == SCRATCH_LR


def test_learning_rate_moves_more_the_worse_the_baseline():
    rates = [adapt_learning_rate(d) for d in (0.9, GOOD_BASELINE, 0.7, 0.6, 0.5, 0.0)]
    assert rates[0] == rates[1] == pytest.approx(ADAPT_LR[0])
    assert rates[-1] == rates[-2] == pytest.approx(ADAPT_LR[1])
    assert all(a < b for a, b in zip(rates[1:4], rates[2:5]))
    assert choose_recipe({1: 0.6}, [1]).learning_rate == pytest.approx(adapt_learning_rate(0.6))


def test_the_users_choices_override_the_recipe():
    r = choose_recipe({1: 0.1}, [1], learning_rate=1e-5, freeze_batchnorm=True)
    assert r.name == "adapt" and r.learning_rate == 1e-5 and r.freeze_batchnorm and not r.reestimate_batchnorm
    assert choose_recipe({1: 0.95}, [1], requested="adapt").name == "adapt"
    with pytest.raises(ValueError, match="recipe must be one of"):
        choose_recipe({1: 0.5}, [1], requested="fast")


def test_patch_schedule():
    assert small_patch_for((256, 256), 16) == (128, 128)
    assert small_patch_for((176, 192), 16) == (80, 96)
    assert small_patch_for((64, 64), 16) == (64, 64)  # never below 4 multiples in-plane
    assert small_patch_for((32, 96, 96), 16) == (32, 64, 64)  # at least 2 multiples along Z, 4 in-plane
    assert small_patch_for((64, 192, 192), 16) == (32, 96, 96)
    assert small_patch_for((256, 256), 16, 96) == (96, 96)
    assert patch_at(0.2, (256, 256), (128, 128), 0.5) == (128, 128)
    assert patch_at(0.5, (256, 256), (128, 128), 0.5) == (256, 256)
    assert patch_at(0.0, (256, 256), (128, 128), 0.0) == (256, 256)


def test_batchnorm_statistics_are_re_estimated_from_the_users_images():
    torch.manual_seed(0)
    net = UNetPlusPlus(features=(8, 16, 32), norm="batch")
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    first = bns[0]
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    net.train()
    bns[3].eval()  # a frozen one stays frozen afterwards
    data = [torch.randn(2, 1, 32, 32) * 5 + 40 for _ in range(3)]
    assert reestimate_batchnorm(net, iter(data)) == 3
    # the first batch norm sees the first convolution's output: its running mean is that output's mean
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        expect = torch.stack([conv(x).mean(dim=(0, 2, 3)) for x in data]).mean(0)
    torch.testing.assert_close(first.running_mean, expect, rtol=1e-4, atol=1e-4)
    assert first.momentum == 0.1 and net.training and not bns[3].training and bns[2].training
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())  # statistics only


# ------------------------------------------------------------------------------------------------ whole runs
def test_a_base_that_does_not_fit_is_adapted(em_model, em_crop, em_crop_membrane):
    """The EM membrane model asked for cell interiors: a poor baseline, so statistics are re-estimated, the
    learning rate moves and the decision is recorded in the card."""
    phases, messages = [], []
    res = fine_tune(
        em_model,
        TrainingPair(em_crop, 1 - em_crop_membrane, slices=[0, 1], name="interiors"),
        epochs=2,
        steps_per_epoch=3,
        batch_size=2,
        patch_size=64,
        device="cpu",
        classes=["interior"],
        on_progress=lambda p: (phases.append(p.phase), messages.append(p.message)),
    )
    rec = res.data["recipe"]
    assert max(res.baseline.values()) < GOOD_BASELINE and rec["name"] == "adapt"
    assert rec["learning_rate"] == pytest.approx(adapt_learning_rate(max(res.baseline.values())))
    assert phases[:3] == ["prepared", "baseline", "statistics"] and "recipe adapt" in messages[1]
    card = load_model(res.path).card
    assert card.training["decision"]["name"] == "adapt" and card.training["decision"]["reason"] == rec["reason"]
    assert card.training["hyperparameters"].get("learning_rate") is None  # the user did not set one
    assert card.parent == "em-membranes@v1"
    # re-estimated statistics differ from the shipped ones
    key = next(k for k in em_model.module.state_dict() if k.endswith("running_mean"))
    assert not torch.equal(em_model.module.state_dict()[key], res.model.module.state_dict()[key])


def test_a_base_that_fits_is_adjusted_gently(em_model, em_crop, em_crop_membrane):
    res = fine_tune(
        em_model,
        TrainingPair(em_crop, em_crop_membrane, slices=[0, 1]),
        epochs=1,
        steps_per_epoch=2,
        batch_size=2,
        patch_size=64,
        device="cpu",
        save=False,
    )
    assert max(res.baseline.values()) >= GOOD_BASELINE and res.data["recipe"]["name"] == "gentle"
    key = next(k for k in em_model.module.state_dict() if k.endswith("running_mean"))
    assert torch.equal(em_model.module.state_dict()[key], res.model.module.state_dict()[key])  # frozen


def test_new_model_trains_from_scratch_end_to_end(em_crop, em_crop_membrane):
    lm = new_model("em", classes=["membrane"], name="fresh-em")
    assert lm.card.training["untrained"] and lm.normalization == MODALITIES["em"]["normalization"]
    res = fine_tune(
        lm,
        TrainingPair(em_crop, em_crop_membrane, slices=[0, 1]),
        epochs=6,  # measured: +0.46 Dice over the baseline and 0.67 on slice 2, as 8 epochs of 96 x 96 patches
        steps_per_epoch=6,
        batch_size=4,
        patch_size=64,
        device="cpu",
        patience=0,
    )
    card = load_model("fresh-em").card
    assert res.data["recipe"]["name"] == "scratch" and card.parent is None
    assert card.training["data"].startswith("trained from scratch") and "untrained" not in card.training
    assert card.normalization == MODALITIES["em"]["normalization"].to_dict() and card.classes == ["membrane"]
    assert card.training["modality"] == "em" and "normalization" in card.training["decision"]
    assert card.training["recipe"].startswith("napari_unetpp.finetune (scratch): patches")  # the card's text as ever
    assert max(res.scores.values()) > max(res.baseline.values()) + 0.2
    mask = predict(em_crop[2], load_model("fresh-em"), precision="fp32").mask
    assert dice(mask, em_crop_membrane[2]) > 0.5  # a slice it never saw
    with pytest.raises(ValueError, match="modality must be one of"):
        new_model("xray")


def test_the_wall_clock_budget_includes_validation_and_saving(em_crop, em_crop_membrane, monkeypatch):
    """A slow validation (2 s), slow steps (0.5 s) and a slow save (0.3 s) are reserved for: the run, saving
    included, ends within 5 % of the budget. The run reads a clock that only these move on, so the check does not
    depend on how fast (or how loaded) the machine is."""
    import napari_unetpp.training.engine as engine
    import napari_unetpp.training.optimiser as optimiser
    import napari_unetpp.training.saving as saving

    now = [0.0]

    def slow(real, seconds):
        def run(*a, **k):
            now[0] += seconds
            return real(*a, **k)

        return run

    monkeypatch.setattr(engine, "validate", slow(engine.validate, 2.0))
    monkeypatch.setattr(optimiser, "train_step", slow(optimiser.train_step, 0.5))
    monkeypatch.setattr(saving, "save_model", slow(saving.save_model, 0.3))
    res = fine_tune(
        tiny(),
        TrainingPair(em_crop[:, :64, :64], em_crop_membrane[:, :64, :64], slices="all"),
        minutes=0.25,
        batch_size=2,
        patch_size=32,
        device="cpu",
        name="timed",
        clock=lambda: now[0],
    )
    assert res.stopped == "budget" and res.steps > 5 and res.path is not None
    assert 0.75 * 15 < now[0] < 1.05 * 15, now[0]
    assert res.seconds >= now[0] - 0.3  # the card's duration is on the run's clock too (up to the save)
    assert sum(h["val"] is not None for h in res.history) >= 2  # validations during the run count as well


# ------------------------------------------------------------------------------------------ bugs from review
@pytest.mark.parametrize("shape", [(32, 32), (24, 40), (6, 24, 40)])
def test_augment_keeps_non_square_patches_stackable_and_aligned(shape):
    """Quarter turns of non-square patches made mismatched shapes and np.stack crashed (e.g. 176 x 192)."""
    rng = np.random.default_rng(0)
    y = (rng.random((8, *shape)) > 0.5).astype(np.int64)
    v = rng.random((8, *shape)) > 0.3
    xa, ya, va = augment_batch(y[:, None].astype(np.float32), y, v, rng)
    assert xa.shape == (8, 1, *shape) and ya.shape == y.shape and va.sum() == v.sum()
    for b in range(8):
        assert ((xa[b, 0] > 0.5 * (xa[b, 0].max() + xa[b, 0].min())) == (ya[b] == 1)).mean() > 0.99


def test_odd_sized_images_fine_tune_with_the_default_patch(em_crop, em_crop_membrane):
    res = fine_tune(
        tiny(),
        TrainingPair(em_crop, em_crop_membrane, slices=[0, 1]),
        epochs=1,
        steps_per_epoch=6,
        device="cpu",
        batch_size=4,
        save=False,
    )
    assert res.steps == 6 and tuple(res.data["patch"]) == (164, 188)  # 161 x 187 rounded up to multiples of 4


def test_fast_mode_chooses_the_best_state_on_the_levels_it_trains(em_crop, em_crop_membrane, monkeypatch):
    """With train_depth=1 only head 1 trains; a state where L1 got worse but untrained L2 looked better was
    chosen before (mean over all levels)."""
    import napari_unetpp.training.engine as loop

    scores = iter([{1: 0.5, 2: 0.1}, {1: 0.4, 2: 0.9}, {1: 0.45, 2: 0.8}])
    monkeypatch.setattr(loop, "validate", lambda *a, **k: next(scores))
    res = fine_tune(
        tiny(),
        TrainingPair(em_crop, em_crop_membrane, slices="all"),
        epochs=2,
        steps_per_epoch=2,
        batch_size=2,
        patch_size=64,
        device="cpu",
        train_depth=1,
        save=False,
        recipe="adapt",
        freeze_batchnorm=True,
    )
    assert not res.improved and res.scores == {1: 0.5, 2: 0.1} and res.recommended_depth == 1


def test_the_fallback_validation_block_stays_put_when_more_is_painted(em_crop, em_crop_membrane):
    """With too few blocks for the fraction, one block validates; it used to sit in whichever slice had the most
    training pixels, so painting more elsewhere moved it (and the old validation pixels became training)."""
    lab = em_crop_membrane[:2].astype(np.int64)
    base = tiny()

    def val_blocks(known):
        ds = prepare_data(TrainingPair(em_crop[:2], lab, known=known), base, val_fraction=0.01)
        return [(i, np.flatnonzero(it.val)) for i, it in enumerate(ds.items) if it.val.any()]

    known = np.zeros(lab.shape, bool)
    known[0, :100, :] = True
    known[1, :120, ::4] = True
    first = val_blocks(known)
    known[1, :120, :] = True  # the user fills in slice 1's rows: it now has the most training pixels
    second = val_blocks(known)
    assert len(first) == len(second) == 1 and first[0][0] == second[0][0]
    assert set(first[0][1]) <= set(second[0][1])  # the same block, now with more known pixels
    assert len(list(blocks(lab.shape[1:]))) > 1


def test_closing_the_generator_cancels_and_saves_nothing(em_crop, em_crop_membrane):
    """Closing (or garbage-collecting) a half-run generator is a cancel: it used to save a model from inside the
    garbage collector. Stopping with the event is how to end early and keep the best state."""
    before = {r.id for r in list_models()}

    def half_run(name: str, steps: int):
        gen = fine_tune_iter(
            tiny(),
            TrainingPair(em_crop, em_crop_membrane, slices="all"),
            minutes=5,
            batch_size=2,
            patch_size=64,
            device="cpu",
            name=name,
        )
        for p in gen:
            if p.phase == "train" and p.step == steps:
                break
        return gen

    half_run("closed-run", 3).close()
    collected = half_run("collected-run", 2)
    del collected
    gc.collect()
    assert {r.id for r in list_models()} == before


def _train_cli(*extra: str, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "napari_unetpp.cli",
            "train",
            "--image",
            str(DATA / "isbi_val_crop.tif"),
            "--labels",
            str(DATA / "isbi_val_crop_labels.tif"),
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--patch-size",
            "64",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_in_train_saves_the_best_state(tmp_path):
    """A real SIGINT mid-run: the CLI validates, saves the best state and exits 0 (it used to crash on
    ``res.model`` after the generator ended)."""
    base = tiny()
    path = save_model(base.module, base.card.__class__(name="sigint-base", architecture=base.card.architecture))
    proc = _train_cli(
        "--base",
        str(path),
        "--minutes",
        "5",
        "--out",
        "after-sigint",
        "--slices",
        "0",
        "1",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    seen = ""
    while True:  # the progress bar appears with the first training step (piped, tqdm redraws it only every 10 s)
        ch = proc.stderr.read(1)
        seen += ch
        if "%|" in seen or not ch:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, seen + err
    assert "stopped by user" in out and "saved" in out
    training = load_model("after-sigint").card.training
    assert training["stopped"] == "stopped by user" and training["steps"] >= 1  # stopped while training


def _train_here(capsys, *extra: str) -> tuple[int, str, str]:
    """``napari-unetpp train`` on the test crop in this process (what a subprocess would run, without starting
    Python and torch again): exit status, stdout and stderr."""
    from napari_unetpp.cli.app import main

    argv = ["train", "--image", str(DATA / "isbi_val_crop.tif"), "--labels", str(DATA / "isbi_val_crop_labels.tif")]
    code = main([*argv, "--device", "cpu", "--batch-size", "2", "--patch-size", "64", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_val_slices_alone_are_never_trained_on(capsys):
    """``--val-slices 2`` without ``--slices``: the default (every labelled slice) included slice 2."""
    base = tiny()
    path = save_model(base.module, base.card.__class__(name="held-base", architecture=base.card.architecture))
    code, out, err = _train_here(capsys, "--base", str(path), "--epochs", "1", "--out", "held-2", "--val-slices", "2")
    assert code == 0, err
    card = load_model("held-2").card
    assert card.training["data_summary"]["pairs"][0]["known_slices"] == [[0], [1]]
    assert "held-out slices [2]" in out


def test_cli_new_model_trains_and_predicts(capsys):
    code, out, err = _train_here(  # the shipped architecture: its first level alone trains, on small patches
        capsys, "--new", "--modality", "em", "--classes", "membrane", "--epochs", "1", "--out", "cli-new", "--slices",
        "0", "1", "--train-depth", "1", "--patch-size", "32",
    )  # fmt: skip
    assert code == 0, err
    assert "cli-new@v1: trained from scratch" in out and "recipe scratch" in out
    card = load_model("cli-new").card
    assert card.parent is None and card.classes == ["membrane"] and card.training["decision"]["name"] == "scratch"
    code, _, err = _train_here(capsys, "--new")
    assert code != 0 and "--new needs --modality" in err


def test_out_of_memory_on_a_small_patch_halves_the_batch_and_keeps_the_full_patch(
    em_crop, em_crop_membrane, monkeypatch
):
    import napari_unetpp.training.optimiser as loop

    real, shapes = loop.train_step, []

    def flaky(module, opt, loss_fn, x, *a, **k):
        shapes.append(tuple(x.shape))
        if len(shapes) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(module, opt, loss_fn, x, *a, **k)

    monkeypatch.setattr(loop, "train_step", flaky)
    fine_tune(
        tiny(),
        TrainingPair(em_crop, em_crop_membrane, slices="all"),
        epochs=1,
        steps_per_epoch=6,
        batch_size=2,
        patch_size=64,
        device="cpu",
        save=False,
        recipe="scratch",
    )
    assert shapes[0] == (2, 1, 32, 32) and shapes[1] == (1, 1, 32, 32)  # the small patch first, then batch 1
    assert shapes[-1] == (1, 1, 64, 64)  # the second half still gets full-size patches


def test_budget_reserves_the_last_validation_and_the_save():
    from napari_unetpp.training.schedule import BudgetSchedule

    now = [100.0]
    b = BudgetSchedule(minutes=1.0, epochs=None, clock=lambda: now[0])
    b.val_seconds, b.step_seconds = 5.0, 2.0
    train_s = 60.0 - 1.2 * 5.0 - BudgetSchedule.SAVE_SECONDS
    now[0] = 100.0 + train_s - 0.5  # another step would eat into the time kept for validating and saving
    assert b.done(0) and b.fraction(0) == pytest.approx((train_s - 0.5) / train_s)
    now[0] = 100.0 + train_s - 3.0
    assert not b.done(0)
    e = BudgetSchedule(minutes=None, epochs=2)
    e.steps_per_epoch = 5
    assert not e.done(9) and e.done(10) and e.fraction(5) == 0.5


def test_prefetcher_hands_out_batches_of_the_size_asked_and_passes_errors_on():
    import threading

    from napari_unetpp.training.augment import Prefetcher

    made: list[tuple[int, tuple[int, ...]]] = []

    def make(batch, patch):
        made.append((batch, patch))
        return np.zeros((batch, 1, *patch), np.float32), batch, patch

    pf = Prefetcher(make, ahead=2)
    assert pf.get(4, (32, 32))[0].shape == (4, 1, 32, 32)
    assert pf.get(2, [16, 16])[0].shape == (2, 1, 16, 16)  # batches made ahead for the old size are dropped
    assert pf.get(2, (16, 16))[1:] == (2, (16, 16))
    pf.close()
    assert not any(t.name == "unetpp-batches" for t in threading.enumerate())
    n = len(made)
    time.sleep(0.05)
    assert len(made) == n  # the worker is gone

    def broken(batch, patch):
        raise ValueError("no pixels to sample")

    pf = Prefetcher(broken)
    with pytest.raises(ValueError, match="no pixels"):
        pf.get(1, (8, 8))
    pf.close()
    inline = Prefetcher(make, threaded=False)  # the CPU path: made on demand, no thread
    assert inline.get(3, (8, 8))[1:] == (3, (8, 8)) and made[-1] == (3, (8, 8)) and inline._thread is None
    inline.close()


def test_fine_tuning_with_batches_made_ahead(em_crop, em_crop_membrane, monkeypatch):
    """The path CUDA takes (a worker thread makes the batches), run on the CPU: it trains, reports how long it waited
    for batches, and leaves no thread behind, also when the run is cancelled."""
    import threading

    import napari_unetpp.training.source as source

    inline = source.batch_maker
    monkeypatch.setattr(
        source, "batch_maker", lambda ds, rng, cfg, m, dev: inline(ds, rng, cfg, m, torch.device("cuda"))
    )
    pair = TrainingPair(em_crop, em_crop_membrane, slices="all")
    res = fine_tune(tiny(), pair, epochs=1, steps_per_epoch=4, batch_size=2, patch_size=64, device="cpu", save=False)
    assert res.steps == 4 and res.data["waited_for_batches_s"] >= 0 and res.data["train_steps_s"] > 0
    gen = fine_tune_iter(tiny(), pair, minutes=5, batch_size=2, patch_size=64, device="cpu", save=False)
    for p in gen:
        if p.phase == "train" and p.step == 2:
            break
    gen.close()
    assert not any(t.name == "unetpp-batches" for t in threading.enumerate())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_returns_to_its_start_after_a_run_a_cancel_and_an_out_of_memory_retry(em_crop, em_crop_membrane):
    """On CUDA: allocated and reserved memory are back where they started after a run, a cancelled run, and a run
    whose first batch did not fit (a real out-of-memory error under a per-process cap)."""
    from napari_unetpp.runtimes.device import release_memory

    pair = TrainingPair(em_crop, em_crop_membrane, slices="all")
    torch.zeros(1, device="cuda")
    release_memory("cuda")
    start = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    fine_tune(tiny(4), pair, epochs=1, steps_per_epoch=3, patch_size=128, device="cuda", save=False)
    assert (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) == start
    gen = fine_tune_iter(tiny(4), pair, minutes=5, patch_size=128, device="cuda", save=False)
    for p in gen:
        if p.phase == "train" and p.step == 2:
            break
    gen.close()
    assert (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) == start
    retries: list[str] = []
    torch.cuda.set_per_process_memory_fraction(0.4e9 / torch.cuda.get_device_properties(0).total_memory)
    try:
        fine_tune(
            tiny(4),
            pair,
            epochs=1,
            steps_per_epoch=3,
            batch_size=64,
            patch_size=128,
            device="cuda",
            save=False,
            on_progress=lambda p: retries.append(p.message) if p.phase == "retry" else None,
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert retries, "a batch of 64 should not fit under a 0.4 GB cap"
    assert (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) == start


@pytest.mark.parametrize("improving", [True, False])
def test_the_last_phase_trains_on_the_validation_pixels_only_while_validation_improves(
    em_crop, em_crop_membrane, monkeypatch, improving
):
    """At half the budget: still improving -> the validation pixels join training and the final state is kept,
    with the card scoring the last honest validation; no longer improving -> the best validated state is kept."""
    import napari_unetpp.training.engine as loop
    import napari_unetpp.training.source as source

    # the baseline, then validations after steps 2, 4 (the switch at half the budget), (6,) 8
    script = iter([0.3, 0.5, 0.7, 0.99] if improving else [0.3, 0.5, 0.4, 0.45, 0.42])
    known: list[int] = []
    monkeypatch.setattr(loop, "validate", lambda *a, **k: dict.fromkeys((1, 2), next(script)))
    real = source.sample_batch
    monkeypatch.setattr(source, "sample_batch", lambda ds, *a, **k: known.append(ds.n_train) or real(ds, *a, **k))
    res = fine_tune(
        tiny(),
        TrainingPair(em_crop, em_crop_membrane, slices="all"),
        epochs=4,
        steps_per_epoch=2,
        batch_size=2,
        patch_size=64,
        device="cpu",
        save=False,
        recipe="scratch",
        patience=0,
    )
    refit = res.data["refit"]
    assert refit["used"] is improving and refit["from"] == 0.5
    if improving:
        assert res.scores == {1: 0.7, 2: 0.7}  # the honest validation at the switch, not the 0.99 after it
        assert known[0] < known[-1]  # validation pixels joined the training pixels
        assert res.history[-1]["note"] == "validation pixels trained on"
    else:
        assert res.scores == {1: 0.5, 2: 0.5} and known[0] == known[-1]
        assert "not improving" in refit["why"]


def test_the_gentle_recipe_never_trains_on_validation_pixels():
    assert choose_recipe({1: 0.9}, [1]).refit_from == 0.0
    assert choose_recipe({1: 0.3}, [1]).refit_from == 0.5
    assert choose_recipe({1: 0.3}, [1], fresh=True).refit_from == 0.5
