"""``napari-unetpp`` command line: ``predict``, ``models`` and ``demo``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["main"]

DEFAULT_MODEL = "em-membranes"


class CliError(Exception):
    """A failure reported to the user as one sentence, exit status 2."""


def _progress_bar(done: int, total: int, t0: float, stream=sys.stderr) -> None:
    width = 30
    frac = done / max(total, 1)
    fill = int(round(width * frac))
    el = time.perf_counter() - t0
    eta = el / frac - el if frac > 0 else 0.0
    stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} tiles  {el:5.1f}s  eta {eta:5.1f}s")
    if done >= total:
        stream.write("\n")
    stream.flush()


def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from .inference import InputError, predict_iter
    from .io import ReadError, read_image, write_image
    from .models import ModelFileError, load_model

    out = Path(args.output)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise CliError(f"the output {out} must end in .tif or .tiff.")
    if not out.parent.is_dir():
        raise CliError(f"the output folder {out.parent} does not exist.")
    try:
        img = read_image(args.input)
        model = load_model(args.model)
        gen = predict_iter(img.data, model, axes=args.axes or img.axes, depth=args.depth,
                           mode="ensemble" if args.ensemble else "pruned",
                           levels="all" if args.all_levels else (), threshold=args.threshold, tile=args.tile,
                           overlap=args.overlap, batch_size=args.batch_size, device=args.device,
                           precision=args.precision)
        t0 = time.perf_counter()
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                res = stop.value
                break
            if not args.quiet:
                _progress_bar(p.done, p.total, t0)
    except (ReadError, ModelFileError, InputError, ValueError) as exc:
        raise CliError(str(exc)) from None
    except MemoryError as exc:
        raise CliError(f"out of memory: {exc}" if str(exc) else "out of memory; try a smaller --tile.") from None
    except RuntimeError as exc:  # device problems (CUDA requested but absent, driver errors)
        raise CliError(str(exc).splitlines()[0]) from None

    scale = {k: v for k, v in img.scale.items() if k in res.axes}
    outputs: list[tuple[Path, np.ndarray]] = [(out, res.mask)]
    if args.all_levels:
        outputs += [(out.with_name(f"{out.stem}_L{lv}{out.suffix}"), p) for lv, p in res.probabilities.items()]
        if res.ensemble is not None:
            outputs.append((out.with_name(f"{out.stem}_ensemble{out.suffix}"), res.ensemble))
    written: list[Path] = []
    try:
        for path, arr in outputs:
            axes = res.axes if arr.ndim == len(res.axes) else "C" + res.axes
            written.append(write_image(path, arr, axes, scale))
    except OSError as exc:
        for w in written:
            w.unlink(missing_ok=True)
        raise CliError(f"could not write {path}: {exc.strerror or exc}.") from None
    fg = float(res.mask.mean()) if model.card.architecture.get("num_classes", 1) == 1 else None
    print(f"{args.input}: {res.axes} {tuple(res.mask.shape)} with {model.card.id} at L{res.depth} ({res.mode}) on "
          f"{res.device} in {res.seconds:.1f}s" + (f", foreground {fg:.1%}" if fg is not None else ""))
    for path, _ in outputs:
        print(f"wrote {path}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models, shipped_weights_dir, user_models_dir

    rows = list_models()
    if not rows:
        print(f"no models found in {shipped_weights_dir()} or {user_models_dir()}")
        return 0
    print(f"{'model':28} {'kind':8} {'dims':4} {'depth':5} {'rec':3}  {'classes':18} scores")
    for r in rows:
        a = r.card.architecture
        scores = " ".join(f"{lv}:{_score(s)}" for lv, s in r.card.scores.items())
        print(f"{r.id:28} {'shipped' if r.shipped else 'user':8} {a.get('spatial_dims', 2)}D   "
              f"{len(a.get('features', [])) - 1:<5} {r.card.recommended_depth or '-':<3}  "
              f"{','.join(r.card.classes)[:18]:18} {scores}")
        if args.verbose:
            print(f"    {r.card.description}\n    {r.path}" + (f"\n    parent: {r.card.parent}" if r.card.parent
                                                               else ""))
    return 0


def _score(s: object) -> str:
    if isinstance(s, dict):
        key = next((k for k in ("dice", "mean_iou", "iou") if k in s), None)
        return f"{s[key]:.3f}" if key else "?"
    return f"{s:.3f}" if isinstance(s, float) else str(s)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(sample=args.sample, screenshot=args.screenshot)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    from . import __version__

    ap = argparse.ArgumentParser(prog="napari-unetpp", description="Prunable UNet++ segmentation of TIFF stacks.")
    ap.add_argument("--version", action="version", version=f"napari-unetpp {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="segment a TIFF image or stack")
    p.add_argument("input", help="input TIFF (2D, stack, time series; grey or multi-channel)")
    p.add_argument("-o", "--output", required=True, help="mask TIFF to write (uint8: 0/1 or class labels)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, name@vN or file (default {DEFAULT_MODEL})")
    p.add_argument("--depth", type=int, default=None, help="pruned depth L1..Lmax (default: the card's recommended)")
    p.add_argument("--ensemble", action="store_true", help="mask from the mean of heads 1..k (accurate mode)")
    p.add_argument("--all-levels", action="store_true",
                   help="also write every level's probabilities as OUT_L<k>.tif (float16)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--tile", type=int, default=None,
                   help="largest tile in pixels (default: the model's, else 1024 in 2D, 96 in 3D)")
    p.add_argument("--overlap", type=float, default=0.125, help="tile overlap fraction (default 0.125)")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass (default: automatic)")
    p.add_argument("--threshold", type=float, default=0.5, help="foreground threshold (default 0.5)")
    p.add_argument("--axes", default=None, help="axes of the input, e.g. ZYX, TZYX, ZCYX (default: from the file)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)

    m = sub.add_parser("models", help="list shipped and user models")
    m.add_argument("-v", "--verbose", action="store_true")
    m.set_defaults(func=_cmd_models)

    d = sub.add_parser("demo", help="open napari with the plugin and a real sample loaded")
    d.add_argument("--sample", default="em", help="sample to open (default: em)")
    d.add_argument("--screenshot", default=None, help="save a screenshot of the window to this PNG and exit")
    d.set_defaults(func=_cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 success, 2 a reported error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"napari-unetpp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("napari-unetpp: interrupted; no output was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
