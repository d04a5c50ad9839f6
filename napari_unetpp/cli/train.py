"""``napari-unetpp train``: fine-tune a model (or train a fresh one) on corrected labels, save it as a new version
and print its Dice per level, before and after."""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from pathlib import Path
from typing import Any

from napari_unetpp.cli.args import DEFAULT_MODEL, DEVICES, WINDOW_HELP, CliError, index, positive_float, positive_int
from napari_unetpp.cli.labels import check_slices, class_map, labelled_slices_except, remap
from napari_unetpp.cli.progress import TrainDisplay
from napari_unetpp.interrupts import ctrl_c_sets

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """Run ``train``; the exit status, 0.

    Raises:
        CliError: a problem with the arguments or the data, or a training run that failed.
    """
    from napari_unetpp.errors import UserError
    from napari_unetpp.io.images import read_image
    from napari_unetpp.jobs import run_to_end
    from napari_unetpp.model.card import check_model_name
    from napari_unetpp.model.windowed import with_window
    from napari_unetpp.training import Recipe, TrainingPair, fine_tune_iter, parse_slices

    try:  # every argument is checked before the model is loaded or a step is trained
        slices = parse_slices(",".join(args.slices)) if args.slices else None
        val_slices = parse_slices(",".join(args.val_slices)) if args.val_slices else None
        if val_slices == "all":
            raise CliError("--val-slices takes slice numbers, e.g. 40-47.")
        if args.out is not None:
            check_model_name(args.out)
        img = read_image(args.image)
        lab = read_image(args.labels)
        check_slices("--slices", slices, lab.data.shape)
        check_slices("--val-slices", val_slices, lab.data.shape)
        names, values = class_map(args.classes)
        base = with_window(_base_for(args, names, img), args.window, img.windows if img is not None else ())
    except (UserError, ValueError) as exc:
        raise CliError(str(exc)) from None
    if values:
        lab.data = remap(lab.data, values, args.ignore_label)
    axes = args.axes or img.axes
    held = val_slices if isinstance(val_slices, list) else []
    both = sorted(set(held) & set(slices)) if isinstance(slices, list) else []
    if both:
        raise CliError(f"slices {both} are both training and held-out slices.")
    if held and slices is None:  # the default (every labelled slice) must leave the held-out ones out
        slices = labelled_slices_except(lab.data, held, args.ignore_label)
    options = {
        k: v
        for k, v in {
            "minutes": args.minutes,
            "epochs": args.epochs,
            "learning_rate": args.lr,
            "recipe": args.recipe,
            "train_depth": args.train_depth,
            "ignore_label": args.ignore_label,
            "batch_size": args.batch_size,
            "patch_size": args.patch_size,
            "seed": args.seed,
            "race": args.race or None,
        }.items()
        if v is not None
    }
    note = _channel_note(img.data, axes, base.module.config, args.channel)
    if note and not args.quiet:  # what is done to the image's channels (channel N of C, RGB as grey), up front
        print(f"napari-unetpp: training on {note}", file=sys.stderr)
    stop = threading.Event()
    show = TrainDisplay(args.quiet)
    # the image as it is: training fits its channels to the model as predict does (--channel N, RGB as grey)
    pair = TrainingPair(
        img.data,
        lab.data,
        axes=axes,
        slices=slices,
        name=Path(args.image).name,
        spacing=img.scale,
        spacing_unit=img.units,
        channel=args.channel,
    )
    gen = fine_tune_iter(
        base,
        pair,
        device=args.device,
        name=args.out,
        stop=stop,
        classes=names,
        save=False,  # saved below: a models folder that cannot be written keeps the run (_save_trained)
        **options,
    )
    try:
        with (
            ctrl_c_sets(stop, "stopping: validating and saving the best state so far (Ctrl-C again to abort)"),
            contextlib.closing(show),
        ):  # Ctrl-C: finish the step, validate, keep the best
            res = run_to_end(gen, show)
            elsewhere = _save_trained(res)  # inside: a Ctrl-C while the files are written does not lose the run
    except (UserError, ValueError, FloatingPointError) as exc:
        raise CliError(str(exc)) from None
    except MemoryError as exc:
        raise CliError(str(exc) or "out of memory; try --batch-size 1 or the CPU.") from None
    except RuntimeError as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    origin = "trained from scratch" if res.model.card.parent is None else f"fine-tuned from {base.card.id}"
    print(
        f"{res.path if elsewhere else res.model.card.id}: {origin} in {res.seconds:.0f} s on {res.ran_on}, "
        f"{res.steps} steps ({res.stopped}); {res.data.get('train_pixels')} training and "
        f"{res.data.get('val_pixels')} validation pixels"
    )
    if res.data.get("recipe"):
        print(Recipe(**res.data["recipe"]).describe())
    print(f"{'level':6} {'Dice before':>11} {'Dice after':>10}")
    for lv, d in res.scores.items():
        mark = "  <- recommended" if lv == res.recommended_depth else ""
        print(f"L{lv:<5} {res.baseline[lv]:11.3f} {d:10.3f}{mark}")
    if not res.improved:
        print("validation did not improve on the base model: the saved version keeps the base weights")
    if isinstance(val_slices, list):
        _report_held_out(res, base, pair, val_slices, args.device)
    use = res.path if elsewhere else res.model.card.id  # a model outside the models folder is found by its path
    print(f"saved {res.path}\nuse it: napari-unetpp predict IMAGE.tif -o MASK.tif --model {use}")
    return 0


def _base_for(args: argparse.Namespace, classes: list[str] | None, img: Any = None) -> Any:
    """The model to start from: ``--base``, or a fresh network with ``--new --modality``."""
    from napari_unetpp.model.modalities import new_model
    from napari_unetpp.model.registry import load_model

    if args.new:
        if not args.modality:
            raise CliError("--new needs --modality fluorescence, brightfield, em or ct (it picks the normalisation).")
        dims = args.dims or 2
        known = img is not None and all(a in img.scale for a in "ZYX")
        spacing = [img.scale[a] for a in "ZYX"] if dims == 3 and known else None
        return new_model(
            args.modality, classes=classes or ["foreground"], name=args.out, spatial_dims=dims, spacing=spacing
        )
    if args.dims:
        raise CliError("--dims goes with --new; a base model keeps its own (use a 3D base for 3D).")
    if args.modality:
        raise CliError("--modality goes with --new; a base model keeps its own normalisation.")
    return load_model(args.base)


def _save_trained(res: Any) -> bool:
    """Save a trained model as the next version in the user models folder; where that cannot be written (a full or
    read-only disk), in a new folder in the current directory, else in the temporary folder, saying so on stderr.
    Whether it went elsewhere.

    Raises:
        CliError: no place could be written.
    """
    import tempfile

    from napari_unetpp.paths import user_models_dir

    try:
        res.save()
        return False
    except OSError as exc:
        where = exc.filename or user_models_dir() / res.model.card.name
        failed = f"could not save the model in {where} ({exc.strerror or exc})"
    for parent in (Path.cwd(), Path(tempfile.gettempdir())):
        folder = None
        try:
            folder = Path(tempfile.mkdtemp(prefix=f"{res.model.card.name}-", dir=parent))
            res.save(folder)
        except OSError:
            if folder is not None:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            continue
        print(f"napari-unetpp: {failed}; saved it in {folder} instead.", file=sys.stderr)
        return True
    raise CliError(
        f"{failed}, nor in the current or the temporary folder; free some space, or make {user_models_dir()} "
        f"writable, and train again."
    )


def _report_held_out(res: Any, base: Any, pair: Any, slices: list[int], device: str) -> None:
    """Dice on whole held-out slices (never trained or validated on), before and after: the slices of the labels'
    first axis, read from the image as predict reads it (its channel axis, if any, wherever it stands)."""
    import numpy as np

    from napari_unetpp.inference.masks import mask_from
    from napari_unetpp.inference.predict import predict
    from napari_unetpp.training.metrics import dice_score

    sel = np.asarray(slices)
    gt = np.asarray(pair.labels)[sel]
    axes = pair.axes
    first = axes.index(axes.replace("C", "")[0])  # the image's axis the labels' slices count along
    sub = np.take(np.asarray(pair.image), sel, axis=first)
    k = res.model.module.max_depth
    print(f"held-out slices {slices}: Dice per level (before -> after)")
    kw: dict[str, Any] = {"axes": axes, "channel": pair.channel, "depth": k, "levels": "all", "device": device}
    before, after = predict(sub, base, **kw), predict(sub, res.model, **kw)
    nc = res.model.module.config.num_classes
    for lv in range(1, k + 1):
        pb, pa = mask_from(before.probabilities[lv], nc), mask_from(after.probabilities[lv], nc)
        print(f"L{lv:<5} {dice_score(pb, gt, num_classes=nc):11.3f} {dice_score(pa, gt, num_classes=nc):10.3f}")


def _channel_note(image: Any, axes: str | None, cfg: Any, channel: int | None) -> str:
    """What training will do to the image's channels (``"channel N of M"``, ``"RGB as grey (luminance)"``, or ""),
    found before it starts by :func:`~napari_unetpp.data.axes.fit_channels` (the function training fits them with)
    on one pixel of each channel, so nothing is read or computed twice.

    Raises:
        CliError: a channel the image lacks, or a channel choice the model cannot take (as training would say).
    """
    from napari_unetpp.data.axes import fit_channels
    from napari_unetpp.errors import UserError

    letters = (axes or "").upper()
    if len(letters) != len(image.shape) or (channel is None and not letters.endswith("C")):
        return ""  # nothing is done to the channels (or the axes are wrong: training says so, in one sentence)
    one = image[tuple(slice(None) if a == "C" else slice(0, 1) for a in letters)]
    try:
        return fit_channels(one, letters, cfg.spatial_dims, cfg.in_channels, channel)[2]
    except (UserError, ValueError) as exc:
        raise CliError(str(exc)) from None


def add_parser(sub: Any) -> None:
    """Add ``train`` and its options to the subcommands ``sub``."""

    t = sub.add_parser(
        "train",
        help="fine-tune a model on corrected labels and save it as a new version",
        description="Fine-tune on IMAGE with LABELS (0 = background; > 0 = objects, or class values). "
        "Only the listed slices (default: slices holding any label) count as ground truth; "
        "Ctrl-C stops early and keeps the best state.",
    )
    t.add_argument("--image", required=True, help="image TIFF, or a CT volume (DICOM series folder, .nii/.nii.gz)")
    t.add_argument("--labels", required=True, help="labels of the same shape (without channels): TIFF or NIfTI")
    t.add_argument("--base", default=DEFAULT_MODEL, help=f"model to start from (default {DEFAULT_MODEL})")
    t.add_argument(
        "--new",
        action="store_true",
        help="train a fresh network instead of starting from --base (for data no shipped model resembles); "
        "needs --modality",
    )
    t.add_argument(
        "--modality",
        choices=["fluorescence", "brightfield", "em", "ct"],
        default=None,
        help="with --new: the intensity normalisation (ct: Hounsfield units in the soft-tissue window)",
    )
    t.add_argument(
        "--dims",
        type=int,
        choices=[2, 3],
        default=None,
        help="with --new: 2 trains slice by slice (default), 3 a volumetric model (pools only in-plane while the "
        "voxels are anisotropic)",
    )
    t.add_argument("--window", default=None, help=WINDOW_HELP + "; stored in the new model's card")
    t.add_argument(
        "--recipe",
        choices=["auto", "gentle", "adapt", "scratch"],
        default=None,
        help="how to train (default auto: gentle when the base already does well on your validation pixels, "
        "adapt when it does not, scratch for --new)",
    )
    t.add_argument(
        "--race",
        action="store_true",
        help="when the base does not fit (recipe adapt), race it against a fresh network on a quarter of the "
        "budget and continue the better (off by default: it measured worse than adapting, see docs/finetune.md)",
    )
    t.add_argument(
        "--slices",
        nargs="+",
        default=None,
        help="corrected slices, e.g. 3 7 10-12, or 'all' (default: every slice holding a label)",
    )
    budget = t.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=positive_float, default=None, help="wall-clock budget (default 2)")
    budget.add_argument("--epochs", type=positive_int, default=None, help="epoch budget instead of minutes")
    t.add_argument("--device", default="auto", choices=DEVICES)
    t.add_argument(
        "--out",
        default=None,
        help="name to save under (default: the base's name, or <base>-finetuned for shipped models)",
    )
    t.add_argument(
        "--classes",
        nargs="+",
        default=None,
        help="class name(s) for the new version's card, e.g. nucleus (default: the base's); NAME=VALUE pairs "
        "(liver=5 spleen=1) pick label values from a multi-organ label map, every other value is background",
    )
    t.add_argument("--axes", default=None, help="axes of the image, e.g. ZYX (default: from the file)")
    t.add_argument(
        "--channel",
        type=index,
        default=None,
        help="train a 1-channel model on channel N (from 0) of a multi-channel image (an RGB image is read as grey "
        "without it); predict with the same --channel",
    )
    t.add_argument("--ignore-label", type=int, default=None, help="label value meaning 'not annotated'")
    t.add_argument(
        "--train-depth",
        type=positive_int,
        default=None,
        help="train only the sub-network of this depth (fast update, e.g. 2; default all levels)",
    )
    t.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the recipe's)")
    t.add_argument("--batch-size", type=positive_int, default=None, help="patches per step (default: automatic)")
    t.add_argument("--patch-size", type=positive_int, default=None, help="patch edge in pixels (default 256 in 2D)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument(
        "--val-slices",
        nargs="+",
        default=None,
        help="also report Dice on these whole held-out slices (labels needed there), before and after",
    )
    t.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=run)
