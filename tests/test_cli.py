"""The command line: success paths and one-sentence failures that write nothing.

Most tests call :func:`main` in this process (a fresh interpreter costs seconds of imports); a few start the real
entry point (``python -m napari_unetpp.cli``) for what only a process shows: its exit status, a light import.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_unetpp.cli.app import main
from napari_unetpp.model.card import ModelCard
from napari_unetpp.model.registry import load_model, save_model

from .conftest import DATA, dice

SAMPLES = DATA.parents[1] / "napari_unetpp" / "_samples"


def run(*args: str) -> subprocess.CompletedProcess:
    """The real entry point in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "napari_unetpp.cli", *args], capture_output=True, text=True, timeout=300
    )


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``main(args)`` in this process: the exit status, stdout and stderr."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def tiny_base(name: str = "tiny") -> str:
    """A tiny untrained 2-level model saved as a user model, for CLI tests where the real network is not the point."""
    import torch

    from napari_unetpp.model.network import UNetPlusPlus

    torch.manual_seed(0)
    save_model(UNetPlusPlus(features=(8, 16, 32)), ModelCard(name=name, architecture={}))
    return name


def test_predict_writes_mask_and_levels(tmp_path, capsys, em_crop, em_crop_membrane):
    src, out = tmp_path / "two.tif", tmp_path / "mask.tif"
    em_crop, em_crop_membrane = em_crop[:2], em_crop_membrane[:2]  # a stack, the smallest one
    tifffile.imwrite(src, em_crop)
    code, stdout, stderr = cli(
        capsys,
        "predict",
        str(src),
        "-o",
        str(out),
        "--depth",
        "3",
        "--all-levels",
        "--ensemble",
        "--device",
        "cpu",
        "--tile",
        "128",
    )
    assert code == 0, stderr
    assert "tiles: 100%|" in stderr and "100%|" not in stdout  # the progress bar goes to stderr
    mask = tifffile.imread(out)
    assert mask.shape == em_crop.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert dice(mask, em_crop_membrane) > 0.7
    levels = [tifffile.imread(tmp_path / f"mask_L{k}.tif") for k in (1, 2, 3)]
    assert all(lv.shape == em_crop.shape and lv.dtype == np.float16 for lv in levels)
    ens = tifffile.imread(tmp_path / "mask_ensemble.tif").astype(np.float32)
    np.testing.assert_allclose(ens, np.mean([lv.astype(np.float32) for lv in levels], 0), atol=2e-3)
    decided = np.abs(ens - 0.5) > 1e-3  # the mask thresholds float32 values; the file holds float16
    np.testing.assert_array_equal(mask[decided], (ens >= 0.5)[decided])
    with tifffile.TiffFile(out) as tf:
        assert tf.series[0].axes == "ZYX"
    assert "L3 (ensemble)" in stdout and "wrote" in stdout


def test_predict_in_process_quiet(tmp_path, capsys):
    out = tmp_path / "m.tif"
    assert main(["predict", str(DATA / "isbi_val_crop.tif"), "-o", str(out), "--depth", "1", "-q"]) == 0
    assert out.exists() and capsys.readouterr().err == ""


def test_models_lists_shipped(capsys):
    assert main(["models", "-v"]) == 0
    text = capsys.readouterr().out
    assert "em-membranes@v1" in text and "shipped" in text and "Cardona" not in text and "L4:" in text


def _no_output(tmp_path, out):
    assert not out.exists() and not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".out*"))


def _bad(tmp_path, capsys, args, match):
    out = tmp_path / "out.tif"
    code, stdout, stderr = cli(capsys, "predict", *args, "-o", str(out))
    assert code == 2, stdout + stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("napari-unetpp: error:") and match in lines[-1], stderr
    assert "Traceback" not in stderr
    _no_output(tmp_path, out)


def test_a_reported_error_is_exit_status_2_of_the_process(tmp_path):
    """The real entry point: a failure is one sentence on stderr, no traceback, exit status 2, nothing written."""
    out = tmp_path / "out.tif"
    r = run("predict", str(tmp_path / "missing.tif"), "-o", str(out))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("napari-unetpp: error:") and "no such file" in r.stderr
    assert "Traceback" not in r.stderr
    _no_output(tmp_path, out)


def test_importing_the_command_line_imports_no_torch():
    """``--help`` and the parser stay light: each command imports what it needs when it runs."""
    code = "import sys, napari_unetpp.cli.app; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


def test_unreadable_file(tmp_path, capsys):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"this is not a tiff")
    _bad(tmp_path, capsys, [str(bad)], "not a readable TIFF")
    _bad(tmp_path, capsys, [str(tmp_path / "missing.tif")], "no such file")


def test_nans(tmp_path, capsys):
    img = np.ones((2, 40, 40), np.float32)
    img[1, 5, 5] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", img)
    _bad(tmp_path, capsys, [str(tmp_path / "nan.tif")], "NaN")


def test_wrong_dimensionality_and_channels(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "line.tif", np.zeros((5, 1), np.uint8)[:, 0].reshape(1, 5))
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((3, 40, 40, 2), np.uint8))
    _bad(tmp_path, capsys, [str(tmp_path / "two.tif"), "--axes", "ZYXC"], "expects 1 channel")
    _bad(tmp_path, capsys, [str(tmp_path / "two.tif"), "--axes", "ZYXC", "--channel", "2"], "does not exist")
    _bad(tmp_path, capsys, [str(DATA / "isbi_val_crop.tif"), "--axes", "YX"], "do not match")
    _bad(tmp_path, capsys, [str(DATA / "isbi_val_crop.tif"), "--model", "no-such-model"], "no model named")
    _bad(
        tmp_path,
        capsys,
        [str(DATA / "isbi_val_crop.tif"), "--device", "cuda"]
        if not _has_cuda()
        else [str(DATA / "isbi_val_crop.tif"), "--depth", "9"],
        "CUDA" if not _has_cuda() else "depth",
    )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_bad_depth_and_output(tmp_path, capsys):
    _bad(tmp_path, capsys, [str(DATA / "isbi_val_crop.tif"), "--depth", "9"], "depth must be between 1 and 4")
    code, _, err = cli(capsys, "predict", str(DATA / "isbi_val_crop.tif"), "-o", str(tmp_path / "no" / "dir.tif"))
    assert code == 2 and "does not exist" in err


def test_corrupt_model_file(tmp_path, capsys):
    import shutil

    from napari_unetpp.paths import shipped_weights_dir

    for ext in (".json", ".safetensors"):
        shutil.copy(shipped_weights_dir() / f"em-membranes{ext}", tmp_path / f"copy{ext}")
    w = tmp_path / "copy.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    _bad(tmp_path, capsys, [str(DATA / "isbi_val_crop.tif"), "--model", str(w)], "corrupt or truncated")


@pytest.mark.parametrize("argv", [["--version"], ["predict", "--help"]])
def test_help_and_version(argv):
    r = run(*argv)
    assert r.returncode == 0 and "napari-unetpp" in r.stdout


def test_train_saves_a_version_that_predict_uses(tmp_path, capsys, em_crop, em_crop_membrane):
    """`train` fine-tunes on listed slices, prints per-level Dice and the recommended depth, and `predict --model`
    finds the new version by name."""
    code, stdout, stderr = cli(
        capsys,
        "train",
        "--image",
        str(DATA / "isbi_val_crop.tif"),
        "--labels",
        str(DATA / "isbi_val_crop_labels.tif"),
        "--slices",
        "0",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--patch-size",
        "64",
        "--device",
        "cpu",
        "--out",
        "my-em",
        "--val-slices",
        "2",
        "--classes",
        "cell border",
    )
    assert code == 0, stderr
    assert "my-em@v1: fine-tuned from em-membranes@v1" in stdout
    assert "<- recommended" in stdout and "held-out slices [2]" in stdout
    assert "validation after" in stderr  # progress goes to stderr
    rows = [ln.split() for ln in stdout.splitlines() if ln.startswith("L") and len(ln.split()) >= 3]
    assert [row[0] for row in rows[:4]] == ["L1", "L2", "L3", "L4"]
    src, out = tmp_path / "held-out.tif", tmp_path / "m.tif"
    tifffile.imwrite(src, em_crop[2])  # the held-out slice alone
    code, stdout, stderr = cli(capsys, "predict", str(src), "-o", str(out), "--model", "my-em", "--device", "cpu")
    assert code == 0, stderr
    assert "my-em@v1" in stdout
    assert dice(tifffile.imread(out), em_crop_membrane[2]) > 0.7
    code, stdout, _ = cli(capsys, "models", "-v")
    assert "my-em@v1" in stdout and "parent: em-membranes@v1" in stdout
    assert load_model("my-em").card.classes == ["cell border"]


@pytest.mark.parametrize(
    "labels, extra, match",
    [
        ("wrong-shape", [], "shape"),
        ("empty", [], "no known pixels"),
        ("background", ["--slices", "all"], "all background"),
        ("ok", ["--slices", "7"], "outside"),
        ("ok", ["--slices", "1", "--val-slices", "1"], "both training and held-out"),
        ("ok", ["--slices", "x"], "cannot read slice"),
    ],
)
def test_train_failures_are_one_sentence_and_save_nothing(tmp_path, capsys, em_crop_membrane, labels, extra, match):
    lab = {
        "wrong-shape": em_crop_membrane[:, :-3],
        "empty": np.zeros_like(em_crop_membrane),
        "background": np.zeros_like(em_crop_membrane),
        "ok": em_crop_membrane,
    }[labels]
    path = tmp_path / "labels.tif"
    tifffile.imwrite(path, lab, photometric="minisblack")
    code = main(
        [
            "train",
            "--image",
            str(DATA / "isbi_val_crop.tif"),
            "--labels",
            str(path),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "-q",
            *extra,
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and err.startswith("napari-unetpp: error:")
    from napari_unetpp.model.registry import list_models

    assert all(m.shipped for m in list_models())


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_multi_output_failure_keeps_the_users_files(tmp_path, monkeypatch, capsys, failure):
    """`--all-levels` writes several files as one unit: a failure (disk full, Ctrl-C) on a later file removes no
    earlier one, leaves the files the user had at those paths as they were, and says so truthfully."""
    from napari_unetpp.io import images as io

    out = tmp_path / "m.tif"
    before = {out: b"users mask", tmp_path / "m_L1.tif": b"users L1"}
    for p, b in before.items():
        p.write_bytes(b)
    real, calls = io.partial_beside, []

    def failing(p, *a):  # the partial file of each output, before it is written
        calls.append(p.name)
        if len(calls) == 3:
            raise failure
        return real(p, *a)

    monkeypatch.setattr(io, "partial_beside", failing)
    code = main(
        [
            "predict",
            str(DATA / "isbi_val_crop.tif"),
            "-o",
            str(out),
            "--all-levels",
            "--depth",
            "2",
            "--device",
            "cpu",
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert calls == ["m.tif", "m_L1.tif", "m_L2.tif"]
    assert code == (2 if isinstance(failure, OSError) else 130)
    assert "nothing was written" in err or "no output was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif", "m_L1.tif"]
    assert all(p.read_bytes() == b for p, b in before.items())


def test_predict_objects_writes_instance_labels(tmp_path, capsys):
    """--objects writes uint16 instance labels, IDs unique across the stack; a model without a learned cue falls back
    to the watershed and says so on stderr."""
    from napari_unetpp.inference.postprocess import split_instances

    src = tmp_path / "nuclei.tif"
    tifffile.imwrite(
        src, tifffile.imread(SAMPLES / "cells3d_nuclei_z40-47.tif")[:2, :128, :128], photometric="minisblack"
    )
    out = tmp_path / "objects.tif"
    assert (
        main(
            ["predict", str(src), "-o", str(out), "--model", "nuclei", "--objects", "components", "--axes", "ZYX", "-q"]
        )
        == 0
    )
    labels = tifffile.imread(out)
    assert labels.dtype == np.uint16 and labels.shape == (2, 128, 128)
    ids = [set(np.unique(s)) - {0} for s in labels]
    assert all(ids) and not (ids[0] & ids[1])
    stdout = capsys.readouterr().out
    assert f"{labels.max()} objects (components split)" in stdout
    em = tmp_path / "em.tif"
    assert (
        main(
            [
                "predict",
                str(src),
                "-o",
                str(em),
                "--model",
                "em-membranes",
                "--objects",
                "learned",
                "--axes",
                "ZYX",
                "-q",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "no learned object cue" in captured.err and "watershed split" in captured.out
    mask = main(["predict", str(src), "-o", str(tmp_path / "m.tif"), "--model", "em-membranes", "--axes", "ZYX", "-q"])
    assert mask == 0
    np.testing.assert_array_equal(
        tifffile.imread(em), split_instances(tifffile.imread(tmp_path / "m.tif"), "watershed").astype(np.uint16)
    )


def test_predict_objects_bad_inputs(tmp_path):
    r = run("predict", str(DATA / "isbi_val_crop.tif"), "-o", str(tmp_path / "o.tif"), "--objects", "stardist")
    assert r.returncode == 2 and "invalid choice" in r.stderr and not (tmp_path / "o.tif").exists()


def test_predict_channel_and_rgb(tmp_path, capsys, em_crop):
    """--channel N segments one channel of a multi-channel TIFF like the channel alone; an RGB TIFF is read as grey
    and the summary says so; the progress bar is tqdm's on stderr."""
    crop = em_crop[:2, :96, :96]
    tifffile.imwrite(tmp_path / "alone.tif", crop)
    tifffile.imwrite(tmp_path / "two.tif", np.stack([255 - crop, crop], axis=1), imagej=True, metadata={"axes": "ZCYX"})
    assert main(["predict", str(tmp_path / "alone.tif"), "-o", str(tmp_path / "a.tif"), "--depth", "1", "-q"]) == 0
    capsys.readouterr()
    two = ["predict", str(tmp_path / "two.tif"), "-o", str(tmp_path / "b.tif"), "--depth", "1", "--channel", "1"]
    assert main(two) == 0
    out = capsys.readouterr()
    assert "channel 1 of 2" in out.out and "tiles" in out.err and "100%" in out.err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "b.tif"), tifffile.imread(tmp_path / "a.tif"))
    tifffile.imwrite(tmp_path / "rgb.tif", np.stack([crop[0]] * 3, axis=-1), photometric="rgb")
    assert main(["predict", str(tmp_path / "rgb.tif"), "-o", str(tmp_path / "c.tif"), "--depth", "1", "-q"]) == 0
    assert "RGB as grey" in capsys.readouterr().out and tifffile.imread(tmp_path / "c.tif").shape == (96, 96)


def test_train_on_one_channel_of_a_two_channel_image(tmp_path, capsys, em_crop, em_crop_membrane):
    """`train --channel 0` fine-tunes a 1-channel model on channel 0 of a (Z, C, Y, X) stack, or of a (C, Z, Y, X)
    one, and reports Dice on held-out slices of that channel; a channel the image lacks is one sentence."""
    crop, labels = em_crop[:, :96, :96], em_crop_membrane[:, :96, :96]
    rng = np.random.default_rng(0)
    two = np.stack([crop, rng.integers(0, 255, crop.shape, dtype=np.uint8)], axis=1)
    img, first = tmp_path / "two.tif", tmp_path / "channels-first.tif"
    tifffile.imwrite(img, two, imagej=True, metadata={"axes": "ZCYX"})
    tifffile.imwrite(first, two.transpose(1, 0, 2, 3), photometric="minisblack")
    lab = tmp_path / "lab.tif"
    tifffile.imwrite(lab, labels, photometric="minisblack")
    base = tiny_base()
    args = ["--labels", str(lab), "--slices", "0", "1", "--val-slices", "2", "--epochs", "1", "--base", base]
    args += ["--batch-size", "2", "--patch-size", "64", "--device", "cpu", "--out", "two-ch"]
    code, _, err = cli(capsys, "train", "--image", str(img), *args, "--channel", "2")
    assert code == 2 and "channel 2 does not exist" in err, err
    for image, axes in ((img, []), (first, ["--axes", "CZYX"])):
        code, out, err = cli(capsys, "train", "--image", str(image), *args, *axes, "--channel", "0")
        assert code == 0, err
        assert err.startswith("napari-unetpp: training on channel 0 of 2\n") and "saved" in out  # said first
        held = out.split("held-out slices [2]: Dice per level (before -> after)\n")[1].splitlines()
        assert [row.split()[0] for row in held[:2]] == ["L1", "L2"], out


def test_predict_reads_a_one_bit_tiff_as_0_and_1(tmp_path, capsys, em_crop):
    """tifffile reads a 1-bit TIFF as bool; predict segments it like the same image as 0/1, with no traceback."""
    src = tmp_path / "b.tif"
    tifffile.imwrite(src, em_crop[0] > 128)  # bitspersample 1
    assert tifffile.imread(src).dtype == bool
    assert main(["predict", str(src), "-o", str(tmp_path / "m.tif"), "--depth", "1", "--device", "cpu", "-q"]) == 0
    u = tmp_path / "u.tif"
    tifffile.imwrite(u, (em_crop[0] > 128).astype(np.uint8))
    assert main(["predict", str(u), "-o", str(tmp_path / "mu.tif"), "--depth", "1", "--device", "cpu", "-q"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "m.tif"), tifffile.imread(tmp_path / "mu.tif"))
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--val-slices", "99"], "--val-slices 99 is outside the 3 slices (0-2)"),
        (["--val-slices", "-1"], "--val-slices -1 is outside the 3 slices (0-2)"),
        (["--slices", "0", "5-9"], "--slices 5 is outside the 3 slices (0-2)"),
        (["--slices", "0", "--val-slices", "1", "3"], "--val-slices 3 is outside"),
        (["--out", "em.json"], "must not end in .json"),
        (["--out", "a/b"], "may use only letters"),
    ],
)
def test_train_arguments_are_checked_before_any_work(monkeypatch, capsys, extra, match):
    """A slice outside the stack (or a name that cannot be saved) is refused before the model is loaded or a step is
    trained: `--val-slices 99` once trained the whole budget, saved, and then died with an IndexError."""
    from napari_unetpp import training as finetune
    from napari_unetpp.model import registry

    def never(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(finetune, "fine_tune_iter", never)
    monkeypatch.setattr(registry, "load_model", never)
    img, lab = str(DATA / "isbi_val_crop.tif"), str(DATA / "isbi_val_crop_labels.tif")
    code = main(["train", "--image", img, "--labels", lab, "--epochs", "1", "--device", "cpu", "-q", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("napari-unetpp: error:") and len(err.splitlines()) == 1, err
    assert match in err, err


def test_train_slices_on_a_single_plane_are_refused(tmp_path, capsys, em_crop, em_crop_membrane):
    img, lab = tmp_path / "i.tif", tmp_path / "l.tif"
    tifffile.imwrite(img, em_crop[0])
    tifffile.imwrite(lab, em_crop_membrane[0])
    for flag in ("--slices", "--val-slices"):
        code = main(["train", "--image", str(img), "--labels", str(lab), "--epochs", "1", flag, "0", "-q"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"{flag} needs a stack of slices" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "args, match",
    [
        (["--tile", "0"], "--tile"),
        (["--batch-size", "0"], "--batch-size"),
        (["--threshold", "2"], "--threshold"),
        (["--block", "0"], "--block"),
    ],
)
def test_predict_numbers_out_of_range_are_refused_by_the_parser(tmp_path, args, match):
    """`--tile 0` once ran with tiny tiles and gave a different mask; `--threshold 2` an empty one."""
    r = run("predict", str(DATA / "isbi_val_crop.tif"), "-o", str(tmp_path / "m.tif"), *args)
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "m.tif").exists()


def test_progress_in_a_log_is_lines_not_carriage_returns(capsys):
    """In a pipe or a log (stderr not a terminal), `train`'s and `predict`'s progress are plain lines (at most one
    every 10 s, and the last), never one endless line of carriage returns."""
    from napari_unetpp.cli.progress import TrainDisplay, bar
    from napari_unetpp.training import TrainProgress

    show = TrainDisplay(quiet=False)
    show(TrainProgress("baseline", message="base model: Dice L1 0.8"))
    for i in range(1, 2001):
        show(TrainProgress("train", step=i, fraction=i / 2000, loss=1.0 / i, seconds=i * 0.001))
    show(TrainProgress("validate", message="validation after 2000 steps"))
    show.close()
    tiles = bar(500, "tile")
    for _ in range(500):
        tiles.update(1)
    tiles.close()
    err = capsys.readouterr().err
    assert "\r" not in err, err[:300]
    lines = err.splitlines()
    train = [ln for ln in lines if "step" in ln and "loss" in ln]
    assert 1 <= len(train) <= 20, lines  # the first, one per 10 s, the last: not 2000
    assert "100%" in train[-1] and "step 2000" in train[-1]
    assert lines[0] == "base model: Dice L1 0.8" and "validation after 2000 steps" in lines
    tiles = [ln for ln in lines if "tiles" in ln]
    assert 1 <= len(tiles) <= 20 and "500/500" in tiles[-1], lines


def test_an_unexpected_error_is_one_sentence_and_its_traceback_goes_to_a_file(tmp_path, capsys, monkeypatch):
    """A defect (here a TypeError deep in predict) never prints a traceback: one sentence, exit 3, the details in a
    file the sentence names."""
    from napari_unetpp.cli import models

    def broken(args):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(models, "run", broken)  # what `models` runs, read when the parser is built
    assert main(["models"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "unexpected TypeError (unsupported operand type(s))" in err and "report" in err
    (report,) = tmp_path.glob("napari-unetpp-error-*.txt")
    assert "Traceback" in report.read_text() and "broken" in report.read_text()


def test_review_lists_where_the_heads_disagree_most_as_the_api_ranks_it(tmp_path, capsys, em_crop):
    from napari_unetpp.inference.predict import predict
    from napari_unetpp.inference.review import correction_order

    src = tmp_path / "three.tif"
    tifffile.imwrite(src, em_crop)
    args = ("--model", "em-membranes", "--depth", "2", "--top", "4", "--axes", "ZYX")  # 3 slices, not 3 channels
    code, stdout, _ = cli(capsys, "review", str(src), *args)
    assert code == 0
    lines = stdout.splitlines()[1:]
    want = correction_order(predict(em_crop, load_model("em-membranes"), axes="ZYX", depth=2, levels="all"), top=4)
    assert lines == [f"slice {s.plane[0]}, {s.region}: {s.score:.3f}" for s in want]
    scores = [float(line.rsplit(": ", 1)[1]) for line in lines]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    code, _, err = cli(capsys, "review", str(tmp_path / "missing.tif"))
    assert code == 2 and "no such file" in err and err.count("\n") == 1
