"""``napari-unetpp predict``: segment one image, several files, or one stack on a dask cluster."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_unetpp.cli.args import DEFAULT_MODEL, DEVICES, WINDOW_HELP, CliError, index, positive_int, probability
from napari_unetpp.cli.progress import FileBar, TileProgress

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """Run ``predict``; the exit status (0, or 1 when some of several inputs failed).

    Raises:
        CliError: a problem with the arguments, or the one input failed.
    """
    from napari_unetpp.batch.distributed import parse_scheduler
    from napari_unetpp.batch.files import expand_inputs, output_for, predict_file
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
    files = FileBar(len(jobs), quiet=args.quiet or len(jobs) == 1)  # one file: its tiles get the bar
    model = None
    for src, dst in jobs:
        progress = None if args.quiet or len(jobs) > 1 else TileProgress()
        try:
            if model is None:  # loaded once, for every file
                model = _load(args.model)
            res = predict_file(src, dst, model, opts, progress)
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
    return _exit_status(failed, len(jobs))


def _exit_status(failed: int, total: int) -> int:
    """0, or 1 after saying how many of several inputs failed (each said why already)."""
    if not failed:
        return 0
    print(f"napari-unetpp: {failed} of {total} inputs failed (see above); the others were written.")
    return 1


def _names_many(spec: str) -> bool:
    """Whether an input argument is a glob or a folder of images (not one DICOM series or OME-Zarr)."""
    from napari_unetpp.io.ct import is_ct_path
    from napari_unetpp.io.zarr import is_zarr_path

    p = Path(spec)
    if any(c in spec for c in "*?[") and not p.exists():
        return True
    return p.is_dir() and not is_zarr_path(p) and not is_ct_path(p)


def _load(ref: str) -> Any:
    """The model ``--model`` names, any failure as one sentence (it ends the command, whatever the inputs)."""
    from napari_unetpp.model.registry import load_model

    try:
        return load_model(ref)
    except Exception as exc:
        raise CliError(str(exc)) from None


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


def _report(res: Any, files: FileBar) -> None:
    for note in res.notes:
        files.write(f"napari-unetpp: note: {note}", err=True)
    for line in [res.summary] + [f"wrote {p}" for p in res.written]:
        files.write(line)
    files.update()


def _predict_distributed(jobs: list[tuple[Path, Path]], args: argparse.Namespace, opts: Any) -> int:
    """``--scheduler``: the files as tasks on a dask cluster, or one stack split into blocks of planes."""
    from napari_unetpp.batch.distributed import SchedulerError, predict_stack_distributed, run_distributed
    from napari_unetpp.errors import UserError
    from napari_unetpp.model.registry import model_file

    try:
        ref = str(model_file(args.model))
    except Exception as exc:
        raise CliError(str(exc)) from None
    if len(jobs) == 1:
        src, dst = jobs[0]
        blocks = TileProgress("block")
        try:
            on_block = None if args.quiet else blocks.step
            res = predict_stack_distributed(src, dst, ref, opts, args.scheduler, args.block, on_block)
        except (UserError, ValueError, OSError) as exc:
            raise CliError(str(exc)) from None
        finally:
            blocks.close()
        _report(res, FileBar(1, quiet=True))
        return 0
    files = FileBar(len(jobs), args.quiet)
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
    return _exit_status(len(failed), len(jobs))


def add_parser(sub: Any) -> None:
    """Add ``predict`` and its options to the subcommands ``sub``."""

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
        "--depth", type=positive_int, default=None, help="pruned depth L1..Lmax (default: the card's recommended)"
    )
    p.add_argument("--ensemble", action="store_true", help="mask from the mean of heads 1..k (accurate mode)")
    p.add_argument(
        "--all-levels",
        action="store_true",
        help="also write the probabilities of levels L1..Lk, k the depth that runs (--depth, default the card's "
        "recommended; not every level of the model), as OUT_L1.EXT .. OUT_Lk.EXT (float16), and with --ensemble "
        "their mean as OUT_ensemble.EXT",
    )
    p.add_argument("--device", default="auto", choices=DEVICES)
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
        type=positive_int,
        default=None,
        help="largest tile in pixels (default: the model's, else 1024 in 2D, 96 in 3D)",
    )
    p.add_argument("--overlap", type=float, default=0.125, help="tile overlap fraction (default 0.125)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="tiles per forward pass (default: automatic)")
    p.add_argument("--threshold", type=probability, default=0.5, help="foreground threshold, 0..1 (default 0.5)")
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
        type=index,
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
        "--block", type=positive_int, default=None, help="with --scheduler and one image: planes (or rows) per task"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
