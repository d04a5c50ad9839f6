"""``napari-unetpp`` command line: ``predict``, ``train``, ``models``, ``export`` and ``demo``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari_unetpp.errors import UserError
from napari_unetpp.inference.masks import mask_from
from napari_unetpp.interrupts import ctrl_c_sets

__all__ = ["main"]

DEFAULT_MODEL = "em-membranes"
WINDOW_HELP = (
    "CT models: Hounsfield window, a preset (soft-tissue, liver, mediastinum, lung, bone, brain), dicom (the "
    "file's own), or WIDTH,LEVEL (e.g. 400,40)"
)


class CliError(Exception):
    """A failure reported to the user as one sentence, exit status 2."""


def _bar(total: int, unit: str, **kw: Any) -> Any:
    """A tqdm bar on stderr: live on a terminal; in a log or a pipe, plain ASCII lines at most every 10 s (and the
    last). ``kw`` goes to tqdm (e.g. ``desc``, ``bar_format``)."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    kw.setdefault("desc", f"{unit}s")
    file: Any = sys.stderr if tty else _Lines(sys.stderr)
    return tqdm(total=total, unit=unit, file=file, ascii=not tty, mininterval=0.2 if tty else 10, **kw)


class _Lines:
    """A stream for tqdm outside a terminal: each redraw (``\\r`` + the bar) becomes a line of its own, so a log
    reads as lines; tqdm's clearing writes (spaces), and a redraw that repeats the line before, are dropped."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.last = ""

    def write(self, s: str) -> int:
        line = s.replace("\r", "").rstrip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


class _TrainDisplay:
    """``train``'s progress on stderr: a bar of the budget used with the step and loss (the same policy as
    :func:`_bar`: live on a terminal, a line at most every 10 s in a log), and each phase's message on a line."""

    SCALE = 1000  # the bar counts thousandths of the budget

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None

    def __call__(self, p: Any) -> None:
        if self.quiet:
            return
        if p.phase == "train":
            if self.bar is None:
                fmt = "{percentage:3.0f}%|{bar}| {desc} [{elapsed}<{remaining}]"
                self.bar = _bar(self.SCALE, "step", desc="training", bar_format=fmt)
            loss = "" if p.loss is None else f" loss {p.loss:.4f}"
            self.bar.set_description_str(f"step {p.step}{loss}", refresh=False)
            self.bar.update(max(0, min(self.SCALE, round(p.fraction * self.SCALE)) - self.bar.n))
            return
        if p.phase == "saving":  # training is over: its last state, then what follows
            self.close()
        if p.message:
            self.write(p.message)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _Progress:
    """A tqdm bar made at the first report (when the total is known): called with a run's
    :class:`~napari_unetpp.inference.predict.Progress` (tiles), or through :meth:`step` with counts (a cluster's
    blocks)."""

    def __init__(self, unit: str = "tile") -> None:
        self.unit = unit
        self.bar: Any = None

    def __call__(self, p: Any) -> None:
        self.step(p.done, p.total)

    def step(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = _bar(total, self.unit)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cmd_predict(args: argparse.Namespace) -> int:
    from napari_unetpp.batch.files import expand_inputs, output_for, parse_scheduler, predict_file
    from napari_unetpp.errors import UserError
    from napari_unetpp.io.images import output_kind

    try:
        inputs = [p for spec in args.input for p in expand_inputs(spec)]
        kind, _ = parse_scheduler(args.scheduler)
    except (UserError, ValueError) as exc:
        raise CliError(str(exc)) from None
    out = Path(args.output)
    fmt = f".{args.format}" if args.format else None
    many = len(inputs) > 1 or len(args.input) > 1 or any(_names_many(s) for s in args.input)
    if many or out.is_dir() and not out.name.lower().endswith(".zarr"):
        if out.exists() and not out.is_dir():
            raise CliError(f"{out} is a file; with several inputs -o names an output folder.")
        out.mkdir(parents=True, exist_ok=True)
        jobs = [(src, output_for(src, out, args.objects != "none", fmt)) for src in inputs]
    else:
        if fmt:
            raise CliError("--format is for several inputs (-o a folder); a single output takes its path's extension.")
        try:
            output_kind(out)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        if not out.parent.is_dir():
            raise CliError(f"the output folder {out.parent} does not exist.")
        jobs = [(inputs[0], out)]
    clash = [str(s) for s, d in jobs if Path(s).resolve() == Path(d).resolve()]
    if clash:
        raise CliError(f"the output would overwrite the input {clash[0]}; choose another -o.")
    opts = _options(args)
    if kind != "none":
        return _predict_distributed(jobs, args, opts)
    failed = 0
    files = _FileBar(len(jobs), quiet=args.quiet or len(jobs) == 1)  # one file: its tiles get the bar
    for src, dst in jobs:
        progress = None if args.quiet or len(jobs) > 1 else _Progress()
        try:
            res = predict_file(src, dst, _model_ref(args), opts, progress)
        except (UserError, ValueError, OSError) as exc:
            if len(jobs) == 1:
                raise CliError(str(exc)) from None
            failed += 1
            files.write(f"napari-unetpp: error: {src}: {exc}", err=True)
            continue
        except MemoryError as exc:
            if len(jobs) == 1:
                raise CliError(
                    f"out of memory: {exc}" if str(exc) else "out of memory; try a smaller --tile."
                ) from None
            failed += 1
            files.write(f"napari-unetpp: error: {src}: out of memory", err=True)
            continue
        except RuntimeError as exc:  # device problems (CUDA requested but absent, driver errors)
            raise CliError(str(exc).splitlines()[0]) from None
        finally:
            if progress is not None:
                progress.close()
        _report(res, files)
    files.close()
    if failed:
        print(f"napari-unetpp: {failed} of {len(jobs)} inputs failed (see above); the others were written.")
        return 1
    return 0


def _names_many(spec: str) -> bool:
    """Whether an input argument is a glob or a folder of images (not one DICOM series or OME-Zarr)."""
    from napari_unetpp.io.ct import is_ct_path
    from napari_unetpp.io.zarr import is_zarr_path

    p = Path(spec)
    if any(c in spec for c in "*?[") and not p.exists():
        return True
    return p.is_dir() and not is_zarr_path(p) and not is_ct_path(p)


def _model_ref(args: argparse.Namespace) -> Any:
    """The model, loaded once per process (a file path for dask workers)."""
    from napari_unetpp.model.registry import load_model

    if getattr(args, "_loaded", None) is None:
        try:
            args._loaded = load_model(args.model)
        except Exception as exc:
            raise CliError(str(exc)) from None
    return args._loaded


def _options(args: argparse.Namespace) -> Any:
    from napari_unetpp.batch.files import PredictOptions

    return PredictOptions(
        depth=args.depth,
        ensemble=args.ensemble,
        all_levels=args.all_levels,
        threshold=args.threshold,
        tile=args.tile,
        overlap=args.overlap,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        runtime=args.runtime,
        objects=args.objects,
        axes=args.axes,
        channel=args.channel,
        window=args.window,
        pixel_size=args.pixel_size,
        diameter=args.diameter,
        rescale=not args.no_rescale,
    )


class _FileBar:
    """A tqdm bar over files (several inputs), on stderr; without one (quiet, or one file) lines are printed."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.bar = None if quiet else _bar(total, "file")

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, line: str, err: bool = False) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr if err else sys.stdout)
        else:
            print(line, file=sys.stderr if err else sys.stdout)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _report(res: Any, files: _FileBar) -> None:
    for note in res.notes:
        files.write(f"napari-unetpp: note: {note}", err=True)
    for line in [res.summary] + [f"wrote {p}" for p in res.written]:
        files.write(line)
    files.update()


def _predict_distributed(jobs: list[tuple[Path, Path]], args: argparse.Namespace, opts: Any) -> int:
    """``--scheduler``: the files as tasks on a dask cluster, or one stack split into blocks of planes."""
    from napari_unetpp.batch.files import SchedulerError, predict_stack_distributed, run_distributed
    from napari_unetpp.errors import UserError
    from napari_unetpp.model.registry import model_file

    try:
        ref = str(model_file(args.model))
    except Exception as exc:
        raise CliError(str(exc)) from None
    if len(jobs) == 1:
        src, dst = jobs[0]
        bar = _Progress("block")
        try:
            on_block = None if args.quiet else bar.step
            res = predict_stack_distributed(src, dst, ref, opts, args.scheduler, args.block, on_block)
        except (UserError, ValueError, OSError) as exc:
            raise CliError(str(exc)) from None
        finally:
            bar.close()
        _report(res, _FileBar(1, quiet=True))
        return 0
    files = _FileBar(len(jobs), args.quiet)
    failed: list[str] = []

    def failure(src: str, exc: BaseException) -> None:
        failed.append(src)
        files.write(f"napari-unetpp: error: {src}: {exc}", err=True)

    try:
        run_distributed(jobs, ref, opts, args.scheduler, lambda r: _report(r, files), failure)
    except SchedulerError as exc:
        raise CliError(str(exc)) from None
    finally:
        files.close()
    if failed:
        print(f"napari-unetpp: {len(failed)} of {len(jobs)} inputs failed (see above); the others were written.")
        return 1
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from napari_unetpp.errors import UserError
    from napari_unetpp.io.images import read_image
    from napari_unetpp.jobs import run_to_end
    from napari_unetpp.model.registry import check_model_name
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
        _check_slices("--slices", slices, lab.data.shape)
        _check_slices("--val-slices", val_slices, lab.data.shape)
        names, values = _class_map(args.classes)
        from napari_unetpp.model.windowed import with_window

        base = with_window(_base_for(args, names, img), args.window, img.windows if img is not None else ())
    except (UserError, ValueError) as exc:
        raise CliError(str(exc)) from None
    if values:
        lab.data = _remap(lab.data, values, args.ignore_label)
    axes = args.axes or img.axes
    if args.channel is not None or (axes.endswith("C") and img.data.shape[-1] in (3, 4)):
        from napari_unetpp.data.axes import fit_channels

        cfg = base.module.config
        try:  # one channel of a multi-channel image (or RGB as grey) for a 1-channel model, as predict reads it
            img.data, axes, note = fit_channels(img.data, axes, cfg.spatial_dims, cfg.in_channels, args.channel)
        except (UserError, ValueError) as exc:
            raise CliError(str(exc)) from None
        if note and not args.quiet:
            print(f"napari-unetpp: training on {note}", file=sys.stderr)
    held = val_slices if isinstance(val_slices, list) else []
    both = sorted(set(held) & set(slices)) if isinstance(slices, list) else []
    if both:
        raise CliError(f"slices {both} are both training and held-out slices.")
    if held and slices is None:  # the default (every labelled slice) must leave the held-out ones out
        slices = _labelled_slices_except(lab.data, held, args.ignore_label)
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
        }.items()
        if v is not None
    }
    stop = threading.Event()
    show = _TrainDisplay(args.quiet)

    gen = fine_tune_iter(
        base,
        TrainingPair(
            img.data,
            lab.data,
            axes=axes,
            slices=slices,
            name=Path(args.image).name,
            spacing=img.scale,
            spacing_unit=img.units,
        ),
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
        f"{res.path if elsewhere else res.model.card.id}: {origin} in {res.seconds:.0f} s on {res.device}, "
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
        _report_held_out(res, base, img, lab, axes, val_slices, args.device)
    use = res.path if elsewhere else res.model.card.id  # a model outside the models folder is found by its path
    print(f"saved {res.path}\nuse it: napari-unetpp predict IMAGE.tif -o MASK.tif --model {use}")
    return 0


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


def _check_slices(flag: str, slices: list[int] | str | None, labels_shape: Sequence[int]) -> None:
    """Every slice number of ``flag`` indexes the labels' first axis (a stack), in one sentence if not."""
    if not isinstance(slices, list):
        return
    if len(labels_shape) < 3:
        raise CliError(f"{flag} needs a stack of slices; these labels are a single plane (leave {flag} out).")
    n = int(labels_shape[0])
    bad = [s for s in slices if not 0 <= s < n]
    if bad:
        raise CliError(
            f"{flag} {bad[0]} is outside the {n} slices (0-{n - 1}) of the labels; slices count from 0."
            if n > 1
            else f"{flag} {bad[0]} is outside the labels' single slice (0); slices count from 0."
        )


def _class_map(classes: list[str] | None) -> tuple[list[str] | None, list[int]]:
    """``--classes`` as names, and the label values they come from when given as NAME=VALUE (e.g. liver=5
    spleen=1): then class k is the k-th pair and every other label value is background."""
    if not classes:
        return None, []
    pairs = [c.split("=", 1) for c in classes]
    if all(len(p) == 1 for p in pairs):
        return classes, []
    if not all(len(p) == 2 for p in pairs):
        raise CliError("--classes takes names (liver) or NAME=VALUE pairs (liver=5 spleen=1), not a mix.")
    try:
        values = [int(v) for _, v in pairs]
    except ValueError:
        raise CliError("--classes NAME=VALUE needs whole-number label values, e.g. liver=5.") from None
    if len(set(values)) != len(values) or min(values) < 1:
        raise CliError("--classes NAME=VALUE needs distinct label values of 1 or more.")
    return [n.strip() for n, _ in pairs], values


def _remap(labels: Any, values: list[int], ignore_label: int | None) -> Any:
    """Label value ``values[k]`` -> class k + 1, every other value -> 0 (background); the ignore label is kept."""
    import numpy as np

    lab = np.asarray(labels)
    out = np.zeros(lab.shape, np.int32 if ignore_label is not None and ignore_label > 255 else np.uint8)
    for k, v in enumerate(values, start=1):
        out[lab == v] = k
    if ignore_label is not None:
        out[lab == ignore_label] = ignore_label
    missing = [v for v in values if not (lab == v).any()]
    if missing:
        raise CliError(f"the labels hold no voxel of value {missing}; check --classes NAME=VALUE.")
    return out


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


def _labelled_slices_except(labels: Any, held: list[int], ignore_label: int | None) -> list[int]:
    """The default ground truth (slices over the first axis holding any label), without the held-out ones."""
    import numpy as np

    from napari_unetpp.training.data import annotated_slices

    lab = np.asarray(labels)
    if lab.ndim < 3:
        raise CliError("--val-slices needs a stack of slices; this image is a single plane.")
    annotated = annotated_slices(lab, ignore_label).reshape(lab.shape[0], -1).any(axis=1)
    keep = [int(i) for i in np.flatnonzero(annotated) if int(i) not in set(held)]
    if not keep:
        raise CliError("every labelled slice is held out; label another slice or list the training --slices.")
    return keep


def _report_held_out(res, base, img, lab, axes: str, slices: list[int], device: str) -> None:
    """Dice on whole held-out slices (never trained or validated on), before and after."""
    import numpy as np

    from napari_unetpp.inference.predict import predict
    from napari_unetpp.training.metrics import dice_score

    sel = np.asarray(slices)
    gt = np.asarray(lab.data)[sel]
    sub = np.asarray(img.data)[sel]
    k = res.model.module.max_depth
    print(f"held-out slices {slices}: Dice per level (before -> after)")
    before = predict(sub, base, axes=axes, depth=k, levels="all", device=device)
    after = predict(sub, res.model, axes=axes, depth=k, levels="all", device=device)
    nc = res.model.module.config.num_classes
    for lv in range(1, k + 1):
        b, a = before.probabilities[lv], after.probabilities[lv]
        pb, pa = mask_from(b, nc), mask_from(a, nc)
        print(f"L{lv:<5} {dice_score(pb, gt, num_classes=nc):11.3f} {dice_score(pa, gt, num_classes=nc):10.3f}")


def _cmd_models(args: argparse.Namespace) -> int:
    from napari_unetpp.model.registry import list_models
    from napari_unetpp.paths import shipped_weights_dir, user_models_dir

    rows = list_models()
    if not rows:
        print(f"no models found in {shipped_weights_dir()} or {user_models_dir()}")
        return 0
    print(f"{'model':28} {'kind':8} {'dims':4} {'depth':5} {'rec':3}  {'classes':18} scores")
    for r in rows:
        a = r.card.architecture
        scores = " ".join(f"{lv}:{_score(s)}" for lv, s in r.card.scores.items())
        print(
            f"{r.id:28} {'shipped' if r.shipped else 'user':8} {a.get('spatial_dims', 2)}D   "
            f"{len(a.get('features', [])) - 1:<5} {r.card.recommended_depth or '-':<3}  "
            f"{','.join(r.card.classes)[:18]:18} {scores}"
        )
        if args.verbose:
            print(
                f"    {r.card.description}\n    {r.path}" + (f"\n    parent: {r.card.parent}" if r.card.parent else "")
            )
    return 0


def _score(s: object) -> str:
    from napari_unetpp.training.metrics import headline_score

    head = headline_score(s)
    return f"{head[1]:.3f}" if head else "?"


def _cmd_export(args: argparse.Namespace) -> int:
    from napari_unetpp.errors import UserError
    from napari_unetpp.export.bioimageio import export_bioimageio
    from napari_unetpp.io.images import read_image
    from napari_unetpp.model.registry import load_model

    out = Path(args.output)
    if not out.parent.is_dir():
        raise CliError(f"the output folder {out.parent} does not exist.")
    try:
        model = load_model(args.model)
        sample = None
        if args.sample:
            import numpy as np

            sample = np.asarray(read_image(args.sample).data)
        res = export_bioimageio(
            model,
            out,
            depth=args.depth,
            sample=sample,
            authors=args.author,
            progress=None if args.quiet else (lambda line: print(line, file=sys.stderr)),
        )
    except (UserError, ValueError, OSError) as exc:
        raise CliError(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None
    diffs = ", ".join(f"{w} {d:.1e}" for w, d in res.max_abs_difference.items())
    print(
        f"{res.path}: bioimage.io package of {model.card.id} at L{res.depth} ({res.parameters:,} parameters; "
        f"weights reproduce predict to {diffs})"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from napari_unetpp.napari.demo import run_demo

    return run_demo(sample=args.sample, screenshot=args.screenshot, minutes=args.minutes)


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], rule: str, kind: str) -> Callable[[str], Any]:
    """An argparse type: ``convert`` the text, and refuse it unless ``ok`` (``rule`` says what is allowed)."""

    def parse(text: str) -> Any:
        try:
            x = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not ok(x):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"{rule}, got {x:g}")
        return x

    return parse


_positive_int = _checked(int, lambda n: n >= 1, "must be 1 or more", "a whole number")
_index = _checked(int, lambda n: n >= 0, "counts from 0", "a whole number")
_probability = _checked(float, lambda x: 0.0 <= x <= 1.0, "must lie between 0 and 1", "a number")
_positive_float = _checked(float, lambda x: x > 0, "must be above 0", "a number")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    from napari_unetpp import __version__

    ap = argparse.ArgumentParser(
        prog="napari-unetpp", description="Prunable UNet++ segmentation of microscopy stacks and CT volumes."
    )
    ap.add_argument("--version", action="version", version=f"napari-unetpp {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="segment an image, stack or CT volume")
    p.add_argument(
        "input",
        nargs="+",
        help="input TIFF (2D, stack, time series; grey or multi-channel), OME-Zarr (.zarr, read lazily), or a CT "
        "volume (a DICOM series folder, a DICOM file, .nii/.nii.gz); several inputs, a folder of images or a quoted "
        "glob ('data/*.tif') predict each file",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="mask to write (uint8: 0/1 or class labels; with --objects the instance labels, uint16/uint32): "
        ".tif/.tiff, .nii/.nii.gz (over the input's geometry when it is a CT volume) or .zarr (OME-Zarr, written "
        "chunk by chunk); with several inputs, a folder that gets INPUT_mask.EXT (INPUT_objects.EXT) per input",
    )
    p.add_argument(
        "--format",
        choices=["tif", "nii.gz", "zarr"],
        default=None,
        help="several inputs: the outputs' format (default: the input's; DICOM gives nii.gz)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, name@vN or file (default {DEFAULT_MODEL})")
    p.add_argument(
        "--depth", type=_positive_int, default=None, help="pruned depth L1..Lmax (default: the card's recommended)"
    )
    p.add_argument("--ensemble", action="store_true", help="mask from the mean of heads 1..k (accurate mode)")
    p.add_argument(
        "--all-levels",
        action="store_true",
        help="also write the probabilities of levels L1..Lk, k the depth that runs (--depth, default the card's "
        "recommended; not every level of the model), as OUT_L1.EXT .. OUT_Lk.EXT (float16), and with --ensemble "
        "their mean as OUT_ensemble.EXT",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16", "int8"],
        help="auto (default): fp16 on a GPU, bf16 on a CPU that has it, else fp32; int8: the model's quantised copy "
        "on the CPU (faster, not exact; see the README)",
    )
    p.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "torch", "onnx", "openvino"],
        help="what runs the network in fp32 on the CPU: auto (default) measures PyTorch, ONNX Runtime and OpenVINO "
        "(those installed) once "
        "per level and batch shape on this machine and keeps the fastest; the summary line says which ran and why",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log the runtime choice, exports and timings")
    p.add_argument(
        "--tile",
        type=_positive_int,
        default=None,
        help="largest tile in pixels (default: the model's, else 1024 in 2D, 96 in 3D)",
    )
    p.add_argument("--overlap", type=float, default=0.125, help="tile overlap fraction (default 0.125)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="tiles per forward pass (default: automatic)")
    p.add_argument("--threshold", type=_probability, default=0.5, help="foreground threshold, 0..1 (default 0.5)")
    p.add_argument(
        "--objects",
        default="none",
        choices=["none", "components", "watershed", "learned"],
        help="write instance labels instead of the mask, IDs unique across the stack: connected components, the "
        "distance-transform watershed, or the split the model learned (touching nuclei; models without a learned "
        "cue fall back to the watershed and say so) (default none)",
    )
    p.add_argument("--axes", default=None, help="axes of the input, e.g. ZYX, TZYX, ZCYX (default: from the file)")
    p.add_argument(
        "--channel",
        type=_index,
        default=None,
        help="segment channel N (from 0) of a multi-channel image with a 1-channel model (an RGB image is read as "
        "grey without it)",
    )
    p.add_argument("--window", default=None, help=WINDOW_HELP)
    p.add_argument(
        "--pixel-size",
        type=float,
        nargs="+",
        default=None,
        metavar="SIZE",
        help="the input's pixel size in the model's unit (um for microscopy models, mm for CT), one value or one "
        "per axis (Z Y X): the image is resampled to the model's pixel size and the result back (default: the "
        "file's, when it names its unit)",
    )
    p.add_argument(
        "--diameter",
        type=float,
        default=None,
        help="typical object diameter in the input's pixels, as in cellpose: the image is resampled so objects "
        "have the model's object diameter (nuclei models: 20 px)",
    )
    p.add_argument(
        "--no-rescale", action="store_true", help="never resample to the model's pixel size from the file's metadata"
    )
    p.add_argument(
        "--scheduler",
        default=None,
        help="run on dask.distributed: local:N (a local cluster of N worker processes) or tcp://HOST:PORT (a running "
        "scheduler, e.g. from dask-jobqueue on SLURM); several inputs become one task per file, one stack is split "
        "into blocks of planes, one volume or large plane into blocks of rows (output .zarr)",
    )
    p.add_argument(
        "--block", type=_positive_int, default=None, help="with --scheduler and one image: planes (or rows) per task"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)

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
        "--slices",
        nargs="+",
        default=None,
        help="corrected slices, e.g. 3 7 10-12, or 'all' (default: every slice holding a label)",
    )
    budget = t.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=_positive_float, default=None, help="wall-clock budget (default 2)")
    budget.add_argument("--epochs", type=_positive_int, default=None, help="epoch budget instead of minutes")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
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
        type=_index,
        default=None,
        help="train a 1-channel model on channel N (from 0) of a multi-channel image (an RGB image is read as grey "
        "without it); predict with the same --channel",
    )
    t.add_argument("--ignore-label", type=int, default=None, help="label value meaning 'not annotated'")
    t.add_argument(
        "--train-depth",
        type=_positive_int,
        default=None,
        help="train only the sub-network of this depth (fast update, e.g. 2; default all levels)",
    )
    t.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate (default: the recipe's)")
    t.add_argument("--batch-size", type=_positive_int, default=None, help="patches per step (default: automatic)")
    t.add_argument("--patch-size", type=_positive_int, default=None, help="patch edge in pixels (default 256 in 2D)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument(
        "--val-slices",
        nargs="+",
        default=None,
        help="also report Dice on these whole held-out slices (labels needed there), before and after",
    )
    t.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=_cmd_train)

    m = sub.add_parser("models", help="list shipped and user models")
    m.add_argument("-v", "--verbose", action="store_true")
    m.set_defaults(func=_cmd_models)

    e = sub.add_parser(
        "export",
        help="write a bioimage.io model package (spec 0.5) of one pruned level",
        description="Export the depth-K sub-network of MODEL (only its parameters) as a bioimage.io package: "
        "TorchScript and ONNX weights, the card's normalisation as preprocessing, test tensors from predict, a "
        "cover and a README. Validate it with `bioimageio test OUT.zip`.",
    )
    e.add_argument("model", help="model name, name@vN or file")
    e.add_argument("-o", "--output", required=True, help="OUT.zip, or a new folder (unzipped package)")
    e.add_argument(
        "--depth", type=_positive_int, default=None, help="the level to export (default: the card's recommended)"
    )
    e.add_argument(
        "--sample", default=None, help="test image (default: a shipped sample of the model's domain; a crop is used)"
    )
    e.add_argument("--author", action="append", default=None, help="author name (repeat for several)")
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=_cmd_export)

    d = sub.add_parser("demo", help="open napari with the plugin and a real sample loaded")
    d.add_argument("--sample", default="em", choices=["em", "nuclei", "ct"], help="sample to open (default: em)")
    d.add_argument("--screenshot", default=None, help="save a screenshot of the window to this PNG and exit")
    d.add_argument(
        "--minutes", type=float, default=2.0, help="ct: the fine-tuning budget set in the widget (default 2)"
    )
    d.set_defaults(func=_cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 success, 2 a reported error, 3 an unexpected one, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if getattr(args, "verbose", False) and args.func is _cmd_predict:
        logging.getLogger("napari_unetpp").setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"napari-unetpp: error: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:  # written for the user already: as it is
        print(f"napari-unetpp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("napari-unetpp: interrupted; no output was written.", file=sys.stderr)
        return 130
    except MemoryError as exc:
        print(f"napari-unetpp: error: out of memory ({exc}); use a smaller --tile or --batch-size.", file=sys.stderr)
        return 2
    except Exception as exc:  # a defect, not the user's input: one sentence, the traceback in a file to report
        return _report_defect(exc)


def _report_defect(exc: BaseException) -> int:
    """Say in one sentence that something unexpected failed, and keep the traceback in a file for a bug report
    instead of printing it (the CLI never shows a traceback). Returns the exit status, 3."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        fd, path = tempfile.mkstemp(prefix="napari-unetpp-error-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        where = f"the details are in {path}"
    except OSError:
        where = "run it again from Python to see the details"
    print(
        f"napari-unetpp: error: an unexpected {type(exc).__name__} ({str(exc)[:200]}). "
        f"This is a bug: please report it with the command line; {where}.",
        file=sys.stderr,
    )
    return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
