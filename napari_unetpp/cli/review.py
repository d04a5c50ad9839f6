"""``napari-unetpp review``: where to correct next. Predicts every level of an image and prints the regions where the
heads disagree most, most uncertain first (the ranking of the Live widget's *Where to correct next?*)."""

from __future__ import annotations

import argparse
from typing import Any

from napari_unetpp.cli.args import DEFAULT_MODEL, DEVICES, CliError, index, positive_int

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """Run ``review``: one line per region (``slice 12, top left: 0.310``); the exit status, 0.

    Raises:
        CliError: a problem with the arguments, the image or the model (one sentence).
    """
    from napari_unetpp.batch.files import PredictOptions, zoom_for_input
    from napari_unetpp.errors import UserError
    from napari_unetpp.inference.predict import predict
    from napari_unetpp.inference.review import correction_order
    from napari_unetpp.io.images import read_image
    from napari_unetpp.model.registry import resolve_model

    try:
        img = read_image(args.image)
        model = resolve_model(args.model)
        depth = args.depth or model.max_depth
        if min(depth, model.max_depth) < 2:
            raise CliError("where to correct compares heads 1..depth: it needs --depth 2 or more (and such a model).")
        axes = args.axes or img.axes
        spatial = "ZYX" if model.module.config.spatial_dims == 3 else "YX"
        zoom = zoom_for_input(model.card, spatial, img, PredictOptions())[0]  # predict's rule for the file
        pred = predict(
            img.data, model, axes=axes, depth=depth, levels="all", device=args.device, channel=args.channel, zoom=zoom
        )  # at the model's pixel size, as predict resamples the file
        ranked = correction_order(pred, top=args.top)
    except (UserError, ValueError) as exc:
        raise CliError(str(exc)) from None
    except RuntimeError as exc:  # e.g. --device cuda without a GPU
        raise CliError(str(exc).splitlines()[0]) from None
    print(f"where {model.card.id} is least sure (spread of heads 1..{depth}, mean per region; most uncertain first):")
    lead = "".join(a for a in pred.axes if a not in "YXC")
    for s in ranked:
        where = ", ".join(f"{_name(a)} {v}" for a, v in zip(lead[-len(s.plane) :], s.plane)) if s.plane else "image"
        print(f"{where}, {s.region}: {s.score:.3f}")
    return 0


def _name(axis: str) -> str:
    return {"Z": "slice", "T": "frame"}.get(axis, axis)


def add_parser(sub: Any) -> None:
    """Add ``review`` and its options to the subcommands ``sub``."""
    r = sub.add_parser("review", help="where to correct next: the regions where the model is least sure")
    r.add_argument("image", help="the image (TIFF, OME-Zarr or a CT volume, as for predict)")
    r.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, name@vN or file (default {DEFAULT_MODEL})")
    r.add_argument("--depth", type=positive_int, default=None, help="levels 1..depth whose heads are compared")
    r.add_argument("--top", type=positive_int, default=8, help="how many regions to list (default 8)")
    r.add_argument("--axes", default=None, help="the image's axes, e.g. ZYX (default: from the file, else guessed)")
    r.add_argument("--channel", type=index, default=None, help="the channel a 1-channel model reads")
    r.add_argument("--device", default="auto", choices=DEVICES)
    r.set_defaults(func=run)
