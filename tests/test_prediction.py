"""predict / predict_iter on real ISBI crops: tiling equivalence, levels, axes, channels, bad input, cancel."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np
import pytest
import torch

from napari_unetpp import Prediction, UNetPlusPlus, predict, predict_iter
from napari_unetpp.inference.predict import InputError, guess_axes

from .conftest import dice, tiny_net

tiny = functools.partial(tiny_net, norm="none")  # no norm layers unless a test asks


@pytest.fixture(scope="module")
def em_slice() -> np.ndarray:
    """One full 512 x 512 real validation slice (ISBI 2012 slice 25) from the package's sample data."""
    from napari_unetpp.napari.samples import em_sample

    return em_sample()[0][0][:1]


# Realistic tiles (>= 256 with >= 64 pixels of overlap) meet the bound at every level. 128-pixel tiles are
# narrower than what L3/L4 look at, so their deep levels get a looser, stated bound.
@pytest.mark.parametrize("tile,overlap,deep_dice", [(256, 0.25, 0.995), (384, 0.125, 0.995), (128, 0.5, 0.98)])
def test_tiled_matches_untiled_on_real_em(em_model, em_slice, tile, overlap, deep_dice):
    whole = predict(em_slice, em_model, depth=4, levels="all", tile=1024, precision="fp32")
    tiled = predict(em_slice, em_model, depth=4, levels="all", tile=tile, overlap=overlap, precision="fp32")
    assert whole.tiles == 1 and tiled.tiles >= 4
    for lv in range(1, 5):
        a = whole.probabilities[lv].astype(np.float32)
        b = tiled.probabilities[lv].astype(np.float32)
        d = np.abs(a - b)
        assert d.mean() < 0.005 and np.quantile(d, 0.99) < 0.1, lv
        assert dice(a > 0.5, b > 0.5) >= (0.995 if lv <= 2 else deep_dice), lv
    assert dice(whole.mask, tiled.mask) >= deep_dice


def test_tiled_matches_untiled_on_odd_sized_crop(em_model, em_crop):
    whole = predict(em_crop, em_model, depth=4, levels="all", tile=1024, precision="fp32")
    tiled = predict(em_crop, em_model, depth=4, levels="all", tile=96, precision="fp32")
    # stress case: a 96-pixel budget on 176 x 192 (padded) with the 64-pixel minimum overlap: 4 x 4 tiles per slice,
    # far narrower than L3/L4's context
    assert whole.tiles == 3 and tiled.tiles == 3 * 4 * 4
    for lv, bound in zip(range(1, 5), (0.995, 0.995, 0.98, 0.97)):
        a, b = whole.probabilities[lv].astype(np.float32), tiled.probabilities[lv].astype(np.float32)
        assert np.abs(a - b).mean() < 0.01 and dice(a > 0.5, b > 0.5) >= bound, lv


def test_no_seams_at_tile_borders(em_model, em_crop):
    """Disagreement with the untiled result is no larger along tile borders than elsewhere."""
    whole = predict(em_crop[:1], em_model, depth=4, tile=1024, precision="fp32").probabilities[4].astype(np.float32)
    tiled = predict(em_crop[:1], em_model, depth=4, tile=96, overlap=0.25, precision="fp32").probabilities[4]
    diff = np.abs(whole - tiled.astype(np.float32))[0]
    from napari_unetpp.inference.tiling import TilePlan

    plan = TilePlan(diff.shape, (96, 96), 0.25)
    border = np.zeros(diff.shape, bool)
    for sl in plan:
        for ax in (0, 1):
            for edge in (sl[ax].start, sl[ax].stop - 1):
                if 0 < edge < diff.shape[ax] - 1:
                    idx = [slice(None), slice(None)]
                    idx[ax] = slice(edge, edge + 1)
                    border[tuple(idx)] = True
    assert diff[border].mean() < 0.02


def test_em_model_segments_real_membranes(em_model, em_crop, em_crop_membrane):
    pred = predict(em_crop, em_model, depth=4, precision="fp32")
    assert pred.mask.shape == em_crop.shape and pred.mask.dtype == np.uint8
    assert dice(pred.mask, em_crop_membrane) > 0.7


def test_levels_ensemble_and_outputs(em_model, em_crop):
    pred = predict(em_crop[:1], em_model, depth=3, mode="ensemble", levels="all", precision="fp32")
    assert sorted(pred.probabilities) == [1, 2, 3] and pred.depth == 3 and pred.mode == "ensemble"
    mean = np.mean([pred.probabilities[k].astype(np.float32) for k in (1, 2, 3)], axis=0)
    np.testing.assert_allclose(pred.ensemble.astype(np.float32), mean, atol=2e-3)
    decided = np.abs(pred.ensemble.astype(np.float32) - 0.5) > 1e-3  # float16 storage rounds near 0.5
    np.testing.assert_array_equal(pred.mask[decided], (pred.ensemble.astype(np.float32) >= 0.5)[decided])
    # pruned depth 2 returns the same head-2 map as depth 3 computed it
    p2 = predict(em_crop[:1], em_model, depth=2, precision="fp32")
    np.testing.assert_allclose(
        p2.probabilities[2].astype(np.float32), pred.probabilities[2].astype(np.float32), atol=1e-3
    )
    # recommended depth from the card is the default
    assert predict(em_crop[:1], em_model).depth == em_model.card.recommended_depth


def test_prob_dtypes(em_model, em_crop):
    a = predict(em_crop[:1], em_model, depth=1, prob_dtype="uint8", precision="fp32").probabilities[1]
    b = predict(em_crop[:1], em_model, depth=1, prob_dtype="float32", precision="fp32").probabilities[1]
    assert a.dtype == np.uint8 and b.dtype == np.float32
    assert np.abs(a / 255.0 - b).max() <= 0.5 / 255 + 1e-6
    # torch casts them (45x NumPy's float16 cast); the numbers must be NumPy's, to the bit
    np.testing.assert_array_equal(a, np.clip(np.rint(b * 255.0), 0, 255).astype(np.uint8))
    h = predict(em_crop[:1], em_model, depth=1, precision="fp32").probabilities[1]
    assert h.dtype == np.float16
    np.testing.assert_array_equal(h, b.astype(np.float16))
    from napari_unetpp.inference.writer import as_prob

    edge = np.array([0.0, 1e-8, 6e-8, 3e-5, 0.5 / 255, 1.5 / 255, 0.49999997, 0.5, 0.9995, 1.0], np.float32)
    edge = np.concatenate([edge, np.random.default_rng(0).random(10_000, dtype=np.float32)])
    np.testing.assert_array_equal(as_prob(edge, "float16"), edge.astype(np.float16))
    np.testing.assert_array_equal(as_prob(edge, "uint8"), np.clip(np.rint(edge * 255.0), 0, 255).astype(np.uint8))


def test_bf16_autocast_agrees_with_fp32(em_model, em_crop):
    a = predict(em_crop, em_model, depth=4, precision="fp32")
    b = predict(em_crop, em_model, depth=4, precision="bf16")
    assert dice(a.mask, b.mask) > 0.98


@pytest.mark.parametrize(
    "axes,shape", [("YX", (37, 41)), ("ZYX", (3, 37, 41)), ("TZYX", (2, 2, 37, 41)), ("YXZ", (37, 41, 3))]
)
def test_axes_2d_model(axes, shape):
    m = tiny()
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    pred = predict(img, m, axes=axes, tile=32, precision="fp32")
    assert pred.mask.shape == shape and pred.axes == axes
    # each plane equals the plane predicted alone
    if "Z" in axes:
        z = axes.index("Z")
        plane = np.take(img, 1, axis=z)
        alone = predict(plane if plane.ndim == 2 else plane[0], m, axes="YX", tile=32, precision="fp32")
        got = np.take(pred.probabilities[2], 1, axis=z)
        np.testing.assert_allclose(got if got.ndim == 2 else got[0], alone.probabilities[2], atol=1e-3)


def test_channels_axis_and_mismatch():
    m = tiny(in_channels=2, num_classes=3)
    img = np.random.default_rng(0).random((3, 2, 33, 35)).astype(np.float32)
    pred = predict(img, m, axes="ZCYX", levels="all", precision="fp32")
    assert pred.mask.shape == (3, 33, 35) and pred.axes == "ZYX" and pred.mask.max() <= 2
    assert pred.probabilities[2].shape == (3, 3, 33, 35)
    np.testing.assert_allclose(pred.probabilities[2].astype(np.float32).sum(0), 1.0, atol=5e-3)
    with pytest.raises(InputError, match="expects 2 channel"):
        predict(img[:, 0], m, axes="ZYX")
    with pytest.raises(InputError, match="expects 1 channel.*--channel N") as err:
        predict(np.zeros((3, 20, 20, 2), np.uint8), tiny(), axes="ZYXC")
    assert "give the axes" not in str(err.value)  # it has a Z axis: the C axis is channels
    # four slices that a TIFF without metadata calls samples (tifffile reads (4, Y, X) as SYX): say how to fix it
    with pytest.raises(InputError, match=r"--channel N\), or if that axis is slices, give the axes \(axes='ZYX'"):
        predict(np.zeros((4, 20, 20), np.uint8), tiny(), axes="CYX")
    assert predict(np.zeros((4, 20, 20), np.uint8), tiny(), axes="ZYX").mask.shape == (4, 20, 20)
    with pytest.raises(InputError, match="for 1-channel models"):
        predict(img, m, axes="ZCYX", channel=0)


def test_channel_choice_and_rgb_as_grey(em_crop, em_model):
    """channel=N segments that channel of a multi-channel image, exactly as the channel alone; an RGB image is read
    as its luminance by a 1-channel model; bad choices are one sentence."""
    crop = em_crop[:2, :96, :96]
    alone = predict(crop, em_model, axes="ZYX", levels="all")
    two = np.stack([255 - crop, crop], axis=1)  # ZCYX
    chosen = predict(two, em_model, axes="ZCYX", channel=1, levels="all")
    assert chosen.channels == "channel 1 of 2" and chosen.axes == "ZYX"
    np.testing.assert_array_equal(chosen.mask, alone.mask)
    np.testing.assert_array_equal(chosen.probabilities[3], alone.probabilities[3])
    rgb = np.stack([crop[0]] * 3, axis=-1)  # grey stored as RGB: its luminance is the image itself
    grey = predict(rgb, em_model, axes="YXC")
    assert grey.channels == "RGB as grey (luminance)" and grey.mask.shape == (96, 96)
    ref = predict(crop[0].astype(np.float32), em_model, axes="YX").mask
    assert (grey.mask == ref).mean() > 0.999  # luma weights sum to 1 up to float rounding
    assert predict(crop, em_model, axes="ZYX").channels == ""
    with pytest.raises(InputError, match="does not exist: the image has 2 channels"):
        predict(two, em_model, axes="ZCYX", channel=2)
    with pytest.raises(InputError, match="no channel axis"):
        predict(crop, em_model, axes="ZYX", channel=0)


def test_3d_model_on_volume_and_errors():
    # batch norm in eval mode: per-voxel, so tiles differ from the whole volume only by the context they lack (group
    # norm would normalise each tile on its own statistics)
    m = tiny(spatial_dims=3, features=(4, 8, 8), norm="batch")
    vol = np.random.default_rng(0).random((2, 19, 40, 37)).astype(np.float32)
    whole = predict(vol, m, axes="TZYX", tile=64, levels="all", precision="fp32")
    tiled = predict(vol, m, axes="TZYX", tile=(16, 24, 24), overlap=0.5, levels="all", precision="fp32")
    assert whole.mask.shape == vol.shape and tiled.tiles > 8 * whole.tiles
    a, b = (p.probabilities[2].astype(np.float32) for p in (whole, tiled))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95  # measured 0.968; a misplaced tile drops it far below
    assert np.abs(a - b).mean() < 0.25 * a.std()  # measured 0.16 of the signal's spread
    with pytest.raises(InputError, match="3D model needs a Z axis"):
        predict(vol[0, 0], m, axes="YX")


def test_bad_input_messages():
    m = tiny()
    with pytest.raises(InputError, match="NaN"):
        img = np.ones((2, 30, 30), np.float32)
        img[1, 3, 3] = np.nan
        predict(img, m)
    with pytest.raises(InputError, match="do not match"):
        predict(np.zeros((30, 30)), m, axes="ZYX")
    with pytest.raises(InputError, match="empty"):
        predict(np.zeros((0, 30)), m)
    with pytest.raises(InputError, match="cannot guess"):
        guess_axes((1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="depth must be between"):
        predict(np.zeros((30, 30)), m, depth=3)
    with pytest.raises(ValueError, match="levels must lie"):
        predict(np.zeros((30, 30)), m, depth=1, levels=[2])


def test_lazy_inputs_dask_and_memmap(tmp_path, em_model, em_crop):
    da = pytest.importorskip("dask.array")
    ref = predict(em_crop, em_model, depth=2, precision="fp32")
    lazy = predict(da.from_array(em_crop, chunks=(1, 80, 80)), em_model, depth=2, precision="fp32")
    np.testing.assert_array_equal(ref.mask, lazy.mask)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=em_crop.shape)
    mm[:] = em_crop
    mm.flush()
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    np.testing.assert_array_equal(ref.mask, predict(mm, em_model, depth=2, precision="fp32").mask)


def test_progress_and_cancellation(em_model, em_crop):
    gen = predict_iter(em_crop, em_model, depth=1, tile=64, batch_size=2, precision="fp32")
    first = next(gen)
    assert 0 < first.done < first.total and first.fraction < 1
    seen = [first]
    for p in gen:
        seen.append(p)
        if any(p.planes_done):
            break
    done_planes = [pl for p in seen for pl in p.planes_done]
    assert done_planes == [(0,)]
    partial = seen[-1].partial
    ref = predict(em_crop, em_model, depth=1, tile=64, precision="fp32")  # same stack: same normalisation stats
    np.testing.assert_array_equal(partial.mask[0], ref.mask[0])  # a plane reported done is final
    gen.close()  # cancel: the generator stops, nothing is returned
    with pytest.raises(StopIteration):
        next(gen)
    # progress of a full run reaches the total exactly once per batch
    steps = list(predict_iter(em_crop, em_model, depth=1, tile=64, batch_size=3, precision="fp32"))
    assert steps[-1].done == steps[-1].total and [p.done for p in steps] == sorted(p.done for p in steps)
    assert sorted(pl for p in steps for pl in p.planes_done) == [(0,), (1,), (2,)]


def test_out_of_memory_halves_the_batch(monkeypatch, em_model, em_crop):
    from napari_unetpp.inference.predictor import SafePredictor

    calls = []
    real = SafePredictor.forward

    def flaky(self, chunk):
        calls.append(len(chunk))
        if len(chunk) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, chunk)

    monkeypatch.setattr(SafePredictor, "forward", flaky)
    pred = predict(em_crop, em_model, depth=1, tile=64, batch_size=4, precision="fp32")
    assert calls[0] == 4 and calls[1] == 2 and set(calls[2:]) == {1}
    ref_calls = len(calls)
    monkeypatch.setattr(SafePredictor, "forward", real)
    np.testing.assert_array_equal(pred.mask, predict(em_crop, em_model, depth=1, tile=64, precision="fp32").mask)
    assert ref_calls > 3


def test_slice_with_stack_stats_matches_stack_result(em_model, em_crop):
    from napari_unetpp.inference.predict import normalization_stats

    stack = predict(em_crop, em_model, depth=2, precision="fp32")
    stats = normalization_stats(em_crop, em_model)
    alone = predict(em_crop[1], em_model, depth=2, precision="fp32", stats=stats)
    np.testing.assert_array_equal(alone.mask, stack.mask[1])
    own_stats = normalization_stats(em_crop[1], em_model)  # its own statistics differ slightly ...
    assert own_stats != stats
    own = predict(em_crop[1], em_model, depth=2, precision="fp32")
    assert not np.array_equal(own.mask, alone.mask)
    assert dice(own.mask, alone.mask) > 0.97  # ... and move a few boundary pixels, no more
    with pytest.raises(ValueError, match="stats has 2 entries"):
        predict(em_crop[1], em_model, stats=stats * 2)


def test_cuda_autocast_predicts_in_fp16_and_trains_in_bf16(monkeypatch):
    """Measured on an H100 (benchmarks/bench_gpu.py): fp16 masks agree with fp32 at Dice 0.9998 where bf16 reaches
    0.9981 at L4, and run 6 % faster; training keeps bf16 where the GPU has it (no gradient scaling needed)."""
    from napari_unetpp.runtimes.device import autocast_dtype

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype(cuda) is torch.float16 and autocast_dtype(cuda, training=True) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype(cuda, training=True) is torch.float16
    assert autocast_dtype(cuda, "bf16") is torch.bfloat16 and autocast_dtype(cuda, "fp32") is None


def test_a_block_of_rows_equals_the_same_rows_of_the_whole_run(em_model, em_crop):
    """rows=(a, b) runs only the tiles touching those rows and returns exactly the whole run's rows (how one volume is
    split over a cluster); objects and resampling need whole planes."""
    from napari_unetpp.inference.predict import normalization_stats

    stats = normalization_stats(em_crop, em_model)
    kw = dict(depth=3, tile=64, levels="all", stats=stats, precision="fp32", prob_dtype="float32")
    full = predict(em_crop, em_model, **kw)
    for a, b in ((0, 40), (40, 97), (97, 161), (13, 14)):
        part = predict(em_crop, em_model, rows=(a, b), **kw)
        assert part.mask.shape == (3, b - a, 187) and part.tiles < full.tiles
        np.testing.assert_array_equal(part.mask, full.mask[:, a:b])
        for lv in (1, 2, 3):
            np.testing.assert_array_equal(part.probabilities[lv], full.probabilities[lv][:, a:b])
    with pytest.raises(InputError, match="whole planes"):
        predict(em_crop, em_model, rows=(0, 10), objects="components")
    with pytest.raises(ValueError, match="rows must satisfy"):
        predict(em_crop, em_model, rows=(10, 500))


# ---------------------------------------------------------------------------------------------------- one loop
def test_validation_and_predict_run_the_same_sliding_window(em_crop, em_crop_membrane, monkeypatch):
    """Validation during fine-tuning is prediction's sliding window with a sink that counts: on the real crop, tiled
    (64-pixel tiles, many per slice), validation runs predict's tile grid on the same normalised tiles (those that
    hold validation pixels), and its per-level Dice is exactly the Dice of predict's masks on the validation pixels,
    from the same tiles, weights and mask rule."""
    from napari_unetpp.inference import predict as prediction
    from napari_unetpp.inference.predict import normalization_stats
    from napari_unetpp.model.loaded import LoadedModel
    from napari_unetpp.training import TrainingPair, prepare_data, validation
    from napari_unetpp.training.metrics import dice_from_counts

    planes: dict[str, list] = {"validation": [], "predict": []}

    def watched(module, who):
        real = module.sliding_window

        def loop(these, *a, **k):
            these = list(these)
            planes[who] += these
            return real(these, *a, **k)

        monkeypatch.setattr(module, "sliding_window", loop)

    watched(validation, "validation")
    watched(prediction, "predict")
    torch.manual_seed(0)
    lm = LoadedModel.from_module(UNetPlusPlus(features=(4, 8, 8)), name="tiny")
    ds = prepare_data(TrainingPair(em_crop, em_crop_membrane, slices="all"), lm)
    scores = validation.validate(lm.module, ds, torch.device("cpu"), None, tile=64)
    stats = normalization_stats(em_crop, lm)
    kw = dict(tile=64, stats=stats, prob_dtype="float32", precision="fp32", runtime="torch")
    pred = predict(em_crop, lm, depth=2, levels="all", **kw)
    assert pred.tiles == 3 * 4 * 4  # 4 x 4 tiles per slice
    assert len(planes["validation"]) == len(planes["predict"]) == 3  # one plane per slice, each with validation
    for v, p in zip(planes["validation"], planes["predict"]):
        assert v.tiles == p.tiles and v.to_run and all(sl in p.to_run for sl in v.to_run)  # a subset of its tiles
        for sl in v.to_run:
            np.testing.assert_allclose(v.read(sl), p.read(sl), rtol=1e-6, atol=1e-6)
    t = np.concatenate([it.target[it.val] for it in ds.items]) > 0
    for lv in (1, 2):
        p = np.concatenate([m[it.val] for m, it in zip(pred.probabilities[lv] >= 0.5, ds.items)])
        want = dice_from_counts((p & t).sum(), p.sum() + t.sum())
        assert scores[lv] == round(float(want), 4), lv


def test_a_plain_function_is_a_predictor(em_crop):
    """predictor= takes any function of a batch of tiles: here the network being trained (network_predictor) in a
    lambda: the same numbers as that predictor passed as it is, the PyTorch runtime's (its folded inference copy) to
    float rounding, and ran_on names what ran."""
    from napari_unetpp.inference.predictor import network_predictor
    from napari_unetpp.model.registry import LoadedModel

    torch.manual_seed(0)
    module = UNetPlusPlus(features=(4, 8, 8)).eval()
    lm = LoadedModel.from_module(module, name="tiny")
    net = network_predictor(module, 2, torch.device("cpu"))
    calls = []

    def fn(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        return net(batch)

    kw = dict(depth=2, tile=64, levels="all", batch_size=5, prob_dtype="float32")
    got = predict(em_crop[:1], lm, predictor=fn, **kw)
    assert calls and all(s[0] <= 5 and s[1] == 1 and max(s[2:]) <= 64 for s in calls)
    assert got.runtime == "predictor" and "function" in got.ran_on
    same = predict(em_crop[:1], lm, predictor=net, **kw)
    assert same.runtime == "torch" and same.ran_on == "CPU · PyTorch fp32 (the network being trained)"
    runtime = predict(em_crop[:1], lm, precision="fp32", runtime="torch", **kw)
    for lv in (1, 2):
        np.testing.assert_array_equal(got.probabilities[lv], same.probabilities[lv])
        np.testing.assert_allclose(got.probabilities[lv], runtime.probabilities[lv], atol=1e-5)
    np.testing.assert_array_equal(got.mask, same.mask)


def test_the_loop_blends_any_callable_over_a_lazy_array():
    """sliding_window needs no model: an identity "network" over overlapping tiles of a dask array blends back to
    the padded plane (Gaussian weights average equal values), rows arrive once and in order, planes are announced."""
    da = pytest.importorskip("dask.array")
    from napari_unetpp.inference.sliding_window import Plane, sliding_window
    from napari_unetpp.inference.tiling import read_tile, tile_grid

    img = np.random.default_rng(0).random((2, 45, 70)).astype(np.float32)
    lazy = da.from_array(img, chunks=(1, 20, 20))
    pad, grid = tile_grid(img.shape[1:], 8, (24, 32), 0.25)
    assert len(grid) > 4

    class Collect:
        channels = 1

        def __init__(self):
            self.rows, self.done = {}, []

        def select(self, probs):
            return probs[0]

        def write_rows(self, key, lo, hi, values):
            self.rows.setdefault(key, []).append((lo, hi, values.copy()))

        def plane_done(self, key):
            self.done.append(key)

    sink = Collect()
    planes = [Plane(z, grid, lambda sl, z=z: read_tile(lazy[z], sl, pad)[None]) for z in range(2)]
    steps = list(sliding_window(planes, lambda b: b[:, None], sink, batch=3))
    assert steps[-1].done == 2 * len(grid) and [k for s in steps for k in s.finished] == [0, 1] == sink.done
    for z in range(2):
        starts = [lo for lo, _, _ in sink.rows[z]]
        assert starts == sorted(starts) and sink.rows[z][0][0] == 0 and sink.rows[z][-1][1] == grid.shape[0]
        blended = np.concatenate([v for _, _, v in sink.rows[z]], axis=1)[0]
        np.testing.assert_allclose(blended, np.pad(img[z], pad, mode="reflect"), rtol=1e-6)


def test_prediction_device_is_a_deprecated_alias_of_ran_on(em_crop):
    torch.manual_seed(0)
    pred = predict(em_crop[:1], UNetPlusPlus(features=(4, 8)).eval(), precision="fp32", runtime="torch")
    assert pred.ran_on.startswith("CPU · PyTorch fp32")
    with pytest.deprecated_call(match="ran_on"):
        assert pred.device == pred.ran_on
    with pytest.deprecated_call(match="ran_on"):
        pred.device = "somewhere else"
    assert pred.ran_on == "somewhere else"
    with pytest.deprecated_call(match="ran_on"):  # the old keyword, at construction and in replace
        assert dataclasses.replace(pred, device="elsewhere").ran_on == "elsewhere"
    with pytest.deprecated_call(match="ran_on"):
        assert Prediction(pred.mask, {}, None, 1, "pruned", 0.5, "YX", device="there").ran_on == "there"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # replace without the old keyword keeps ran_on and warns nothing
        assert dataclasses.replace(pred, mode="ensemble").ran_on == "somewhere else"
