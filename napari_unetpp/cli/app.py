"""``napari-unetpp`` command line: the parser over the commands (``predict``, ``train``, ``review``, ``models``,
``export`` and ``demo``, one module each), and :func:`main`, which runs one and turns every failure into one
sentence and an exit status. Importing it (and ``--help``) imports no torch: each command imports what it needs
when it runs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from napari_unetpp.cli import demo, export, models, predict, review, train
from napari_unetpp.cli.args import CliError
from napari_unetpp.errors import UserError

__all__ = ["EXIT_DEFECT", "EXIT_ERROR", "EXIT_INTERRUPTED", "build_parser", "main"]

EXIT_ERROR = 2  # a failure reported in one sentence (the arguments, the input, the disk)
EXIT_DEFECT = 3  # an unexpected error: a bug, its traceback in a file
EXIT_INTERRUPTED = 130  # Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    from napari_unetpp import __version__

    ap = argparse.ArgumentParser(
        prog="napari-unetpp", description="Prunable UNet++ segmentation of microscopy stacks and CT volumes."
    )
    ap.add_argument("--version", action="version", version=f"napari-unetpp {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    for command in (predict, train, review, models, export, demo):
        command.add_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 success, 1 some of several inputs failed, 2 a reported error, 3 an
    unexpected one, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if getattr(args, "verbose", False) and args.command == "predict":
        logging.getLogger("napari_unetpp").setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"napari-unetpp: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except UserError as exc:  # written for the user already: as it is
        print(f"napari-unetpp: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("napari-unetpp: interrupted; no output was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError as exc:
        print(f"napari-unetpp: error: out of memory ({exc}); use a smaller --tile or --batch-size.", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a defect, not the user's input: one sentence, the traceback in a file to report
        return report_defect(exc)


def report_defect(exc: BaseException) -> int:
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
    return EXIT_DEFECT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
