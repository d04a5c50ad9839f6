"""``napari-unetpp demo``: napari with the plugin and a real sample loaded (napari is imported only here)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """Open the viewer (or save a screenshot and exit); the exit status."""
    from napari_unetpp.napari.demo import run_demo

    return run_demo(sample=args.sample, screenshot=args.screenshot, minutes=args.minutes)


def add_parser(sub: Any) -> None:
    """Add ``demo`` and its options to the subcommands ``sub``."""
    d = sub.add_parser("demo", help="open napari with the plugin and a real sample loaded")
    d.add_argument("--sample", default="em", choices=["em", "nuclei", "ct"], help="sample to open (default: em)")
    d.add_argument("--screenshot", default=None, help="save a screenshot of the window to this PNG and exit")
    d.add_argument(
        "--minutes", type=float, default=2.0, help="ct: the fine-tuning budget set in the widget (default 2)"
    )
    d.set_defaults(func=run)
