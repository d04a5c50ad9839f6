"""``napari-unetpp export``: one pruned level of a model as a bioimage.io package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from napari_unetpp.cli.args import CliError, positive_int

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """Write the package and say how closely its weights reproduce predict; the exit status, 0.

    Raises:
        CliError: no such output folder, model or level, or an export that failed.
    """
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


def add_parser(sub: Any) -> None:
    """Add ``export`` and its options to the subcommands ``sub``."""
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
        "--depth", type=positive_int, default=None, help="the level to export (default: the card's recommended)"
    )
    e.add_argument(
        "--sample", default=None, help="test image (default: a shipped sample of the model's domain; a crop is used)"
    )
    e.add_argument("--author", action="append", default=None, help="author name (repeat for several)")
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=run)
