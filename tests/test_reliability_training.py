"""Training reliability (issue 28): channels fitted as predict fits them, validation through predict's tiles with
bounded memory, and a models folder that cannot be written never throws a trained model away."""

from __future__ import annotations

import errno
import functools

import numpy as np
import pytest
import tifffile
import torch

from napari_unetpp.data.axes import fit_channels
from napari_unetpp.errors import InputError
from napari_unetpp.inference.predict import normalization_stats, predict
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.model.registry import load_model
from napari_unetpp.paths import user_models_dir
from napari_unetpp.training import (
    TrainingItem,
    TrainingPair,
    TrainingSet,
    dice_score,
    fine_tune,
    prepare_data,
    validate,
)

from .conftest import DATA, tiny_batchnorm

tiny = functools.partial(tiny_batchnorm, norm="none")  # these tests train a network without norm layers


def rgb_of(grey: np.ndarray) -> np.ndarray:
    """A real EM image as colour: three different channels (so the luminance is not any one of them)."""
    g = grey.astype(np.uint16)
    return np.stack([g, g // 2 + 60, 255 - g], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- item 5
def test_rgb_image_trains_on_the_grey_predict_reads(em_crop, em_crop_membrane):
    """An RGB image (C last) with a 1-channel model trains on the luminance predict segments, through the same
    fit_channels; the whole run works (it crashed with an IndexError)."""
    lm = tiny()
    rgb = rgb_of(em_crop)  # (Z, Y, X, 3)
    ds = prepare_data(TrainingPair(rgb, em_crop_membrane, axes="ZYXC", slices=[0, 2]), lm)
    grey, axes, note = fit_channels(rgb, "ZYXC", 2, 1)
    assert axes == "ZYX" and note == "RGB as grey (luminance)"
    ref = prepare_data(TrainingPair(grey, em_crop_membrane, axes=axes, slices=[0, 2]), lm)
    assert [it.image.shape for it in ds.items] == [(1, 161, 187)] * 2
    for a, b in zip(ds.items, ref.items):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.val, b.val)
    assert ds.summary["pairs"][0]["channels"] == "RGB as grey (luminance)"
    # the reproduction: one RGB plane, axes YXC
    res = fine_tune(
        lm,
        TrainingPair(rgb[0], em_crop_membrane[0], axes="YXC"),
        epochs=1,
        steps_per_epoch=1,
        batch_size=1,
        patch_size=64,
        device="cpu",
        save=False,
    )
    assert res.steps == 1 and set(res.scores) == {1, 2}


def test_a_channel_axis_that_does_not_fit_is_one_sentence(em_crop, em_crop_membrane):
    """Two channels for a 1-channel model: one sentence saying to pick one (as predict says); with ``channel`` the
    pair trains on that channel, exactly as on the channel alone."""
    rng = np.random.default_rng(0)
    two = np.stack([rng.integers(0, 255, em_crop[0].shape, dtype=np.uint8), em_crop[0]])  # (C, Y, X)
    lm = tiny()
    with pytest.raises(InputError, match="expects 1 channel.*has 2.*channel") as err:
        prepare_data(TrainingPair(two, em_crop_membrane[0], axes="CYX"), lm)
    assert "\n" not in str(err.value) and str(err.value).endswith(".")
    with pytest.raises(InputError, match="channel 2 does not exist"):
        prepare_data(TrainingPair(two, em_crop_membrane[0], axes="CYX", channel=2), lm)
    ds = prepare_data(TrainingPair(two, em_crop_membrane[0], axes="CYX", channel=1), lm)
    ref = prepare_data(TrainingPair(em_crop[0], em_crop_membrane[0]), lm)
    np.testing.assert_array_equal(ds.items[0].image, ref.items[0].image)
    # a 3-channel model and a 2-channel image: the same kind of sentence
    lm3 = LoadedModel.from_module(UNetPlusPlus(features=(8, 16), in_channels=3), name="rgb")
    with pytest.raises(InputError, match="expects 3 channel"):
        prepare_data(TrainingPair(two, em_crop_membrane[0], axes="CYX"), lm3)


# ---------------------------------------------------------------------------------------------------- item 11
class _Inputs:
    """Forward hook recording the spatial shape of every input the network sees."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args, kwargs=None):
        self.shapes.append(tuple(args[0].shape[2:]))


def _sparse_item(shape: tuple[int, int], points: list[tuple[int, int]], seed: int = 0) -> TrainingItem:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    target = (rng.random(shape) > 0.5).astype(np.int64)
    val = np.zeros(shape, bool)
    for p in points:
        val[p] = True
    it = TrainingItem(image, target, np.zeros(shape, bool), val, None, "sparse")
    it.index()
    return it


def test_validation_of_a_sparse_large_plane_never_runs_its_bounding_box():
    """Two validation pixels at opposite corners of a 2100 x 2100 plane: validation runs only the tiles of
    predict's plan that hold them (at most predict's 1024 tile), never the 2100 x 2100 box around both."""
    torch.manual_seed(0)
    net = UNetPlusPlus(features=(4, 8))
    rec = _Inputs(net)
    item = _sparse_item((2100, 2100), [(3, 5), (2095, 2090)])
    ds = TrainingSet([item], 2, {})
    scores = validate(net, ds, torch.device("cpu"), None)
    assert set(scores) == {1}
    assert rec.shapes and max(int(np.prod(s)) for s in rec.shapes) <= 1024 * 1024
    assert sum(int(np.prod(s)) for s in rec.shapes) < 2100 * 2100 / 2  # 2 tiles of ~790^2, not the whole plane


def test_validation_scores_what_predict_predicts_with_the_same_tiles(em_crop, em_crop_membrane):
    """Validation blends the same tiles predict blends (tile 64 on the real crop: many tiles): its Dice equals the
    Dice of predict's masks on the validation pixels; a whole-plane tile differs only at tile seams."""
    lm = tiny()
    ds = prepare_data(TrainingPair(em_crop, em_crop_membrane, slices="all"), lm)
    scores = validate(lm.module, ds, torch.device("cpu"), None, tile=64)
    stats = normalization_stats(em_crop, lm)
    for lv in (1, 2):
        masks = [
            predict(em_crop[z], lm, depth=lv, tile=64, stats=stats, precision="fp32", runtime="torch").mask
            for z in range(3)
        ]
        p = np.concatenate([m[it.val] for m, it in zip(masks, ds.items)])
        t = np.concatenate([it.target[it.val] for it in ds.items])
        assert scores[lv] == pytest.approx(dice_score(p, t), abs=2e-3)
    whole = validate(lm.module, ds, torch.device("cpu"), None)
    assert all(abs(whole[lv] - scores[lv]) < 0.05 for lv in (1, 2))


def test_validation_out_of_memory_retries_on_smaller_tiles(em_crop, em_crop_membrane, caplog, monkeypatch):
    """Out of memory on several tiles at once: validation halves the batch as prediction does (its SafePredictor)
    and keeps the tile; on one large tile: it retries with smaller ones. Both score the same pixels."""
    lm = tiny()
    ds = prepare_data(TrainingPair(em_crop, em_crop_membrane, slices=[0]), lm)
    net = lm.module
    seen = []

    def refuse_batches(module, args):
        if len(args[0]) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB")
        seen.append(tuple(args[0].shape[2:]))

    from napari_unetpp.training import validation

    handle = net.register_forward_pre_hook(refuse_batches)
    try:  # a batch of 2 tiles: halved once (each retry collects garbage, slow from 112 tiles down)
        with monkeypatch.context() as m:
            m.setattr(validation, "default_batch", lambda tile, device_type: 2)
            one_by_one = validate(net, ds, torch.device("cpu"), None, tile=(80, 92))
    finally:
        handle.remove()
    assert len(seen) > 1 and len(set(seen)) == 1  # every tile, one at a time, at the size planned (not smaller)
    assert "out of memory: retrying with 1 tile(s) per batch" in caplog.text  # prediction's retry

    def refuse_large(module, args):
        if int(np.prod(args[0].shape[2:])) > 96 * 96:
            raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB")

    handle = net.register_forward_pre_hook(refuse_large)
    try:
        scores = validate(net, ds, torch.device("cpu"), None)
    finally:
        handle.remove()
    # the plane padded to a multiple of 4 is one 164 x 188 tile; the retry halves it (to multiples of 4)
    assert scores == one_by_one == validate(net, ds, torch.device("cpu"), None, tile=(80, 92))

    def refuse_all(module, args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB")

    handle = net.register_forward_pre_hook(refuse_all)
    try:
        with pytest.raises(MemoryError, match="out of memory while validating"):
            validate(net, ds, torch.device("cpu"), None)
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------- item 12
def _failing_save(monkeypatch, code: int | str):
    """Make saving into the user models folder fail as a full or read-only disk does (tests run as root, where a
    read-only folder does not stop writes); saving anywhere else works. ``"safetensors"``: the real save runs and
    the weights' write fails as safetensors reports a full disk (its own error type, not an OSError)."""
    if code == "safetensors":
        import safetensors.torch
        from safetensors import SafetensorError

        real_write = safetensors.torch.save_file

        def write(tensors, filename, *a, **kw):
            if str(user_models_dir()) in str(filename):
                raise SafetensorError(
                    f'Error while serializing: I/O error: No space left on device (os error 28) at path "{filename}"'
                )
            return real_write(tensors, filename, *a, **kw)

        monkeypatch.setattr(safetensors.torch, "save_file", write)
        return
    import napari_unetpp.training.saving as sv

    real = sv.save_model

    def save(model, card, directory=None, **kw):
        if directory is None:
            why = "No space left on device" if code == errno.ENOSPC else "Read-only file system"
            raise OSError(code, why, str(user_models_dir() / card.name))
        return real(model, card, directory, **kw)

    monkeypatch.setattr(sv, "save_model", save)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, "safetensors"])
def test_unwritable_models_folder_keeps_the_trained_model(
    tmp_path, monkeypatch, caplog, em_crop, em_crop_membrane, code
):
    _failing_save(monkeypatch, code)
    res = fine_tune(
        tiny(),
        TrainingPair(em_crop, em_crop_membrane, slices=[0, 1]),
        epochs=1,
        steps_per_epoch=3,
        batch_size=2,
        patch_size=64,
        device="cpu",
        learning_rate=3e-3,
    )
    assert res.path is None and not res.saved
    assert str(user_models_dir() / "tiny") in res.save_error and "save(" in res.save_error
    why = "Read-only file system" if code == errno.EROFS else "No space left on device"
    assert f"({why})" in res.save_error
    assert "\n" not in res.save_error
    assert any("could not save" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert res.steps == 3  # the run was not thrown away: the trained state is in the result
    assert not list(user_models_dir().glob("tiny/*.json"))  # and nothing half-written is listed
    path = res.save(tmp_path / "elsewhere")
    assert res.saved and res.path == path and res.save_error is None and path.is_file()
    again = load_model(path)
    ref = res.model.module.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.module.state_dict().items())
    assert again.card.scores == res.model.card.scores


def test_cli_train_with_an_unwritable_models_folder_saves_elsewhere(tmp_path, monkeypatch, capsys, em_crop_membrane):
    from napari_unetpp.cli.app import main
    from napari_unetpp.model.card import ModelCard
    from napari_unetpp.model.registry import save_model

    save_model(tiny().module, ModelCard(name="tiny", architecture={}))  # the base, before the folder fills up
    _failing_save(monkeypatch, errno.ENOSPC)
    monkeypatch.chdir(tmp_path)
    lab = tmp_path / "lab.tif"
    tifffile.imwrite(lab, em_crop_membrane, photometric="minisblack")
    args = ["train", "--image", str(DATA / "isbi_val_crop.tif"), "--labels", str(lab), "--slices", "0", "1"]
    args += ["--base", "tiny", "--epochs", "1", "--batch-size", "2", "--patch-size", "64", "--device", "cpu", "-q"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    assert f"could not save the model in {user_models_dir() / 'tiny'}" in out.out + out.err
    saved = sorted(tmp_path.glob("tiny-*/tiny.json"))
    assert len(saved) == 1 and f"saved {saved[0]}" in out.out and f"--model {saved[0]}" in out.out
    assert load_model(saved[0]).card.parent == "tiny@v1"


def test_read_tile_equals_the_tile_of_the_reflect_padded_plane():
    """The tile reader validation uses: a tile of the padded plane, read without padding the plane."""
    from napari_unetpp.inference.tiling import TilePlan, padding_for, read_tile

    plane = np.arange(2 * 13 * 21, dtype=np.float32).reshape(2, 13, 21)  # (C, Y, X), odd sizes
    pad = padding_for(plane.shape[1:], 8)
    padded = np.pad(plane, [(0, 0), *pad], mode="reflect")
    plan = TilePlan(padded.shape[1:], (8, 8), 0.25, align=8)
    assert len(plan) > 4
    for sl in plan:
        np.testing.assert_array_equal(read_tile(plane, sl, pad), padded[(slice(None), *sl)])


def test_a_name_that_cannot_be_saved_is_refused_before_training(em_crop, em_crop_membrane):
    from napari_unetpp.training import fine_tune_iter

    gen = fine_tune_iter(tiny(), TrainingPair(em_crop, em_crop_membrane), name="my model!", epochs=1, device="cpu")
    with pytest.raises(ValueError, match="may use only letters"):
        next(gen)  # the first step, before the data is prepared or a step trained
