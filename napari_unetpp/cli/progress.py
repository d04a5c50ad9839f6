"""The commands' progress on stderr: tqdm bars, live on a terminal and plain lines in a log or a pipe.

:func:`bar` makes one; :class:`TileProgress` counts a run's tiles (or a cluster's blocks), :class:`FileBar` the
files of a batch (and prints their summaries above it), :class:`TrainDisplay` shows ``train``'s budget, step and
loss with each phase's message on a line.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["FileBar", "TileProgress", "TrainDisplay", "bar"]


def bar(total: int, unit: str, **kw: Any) -> Any:
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


class TrainDisplay:
    """``train``'s progress on stderr: a bar of the budget used with the step and loss (the same policy as
    :func:`bar`: live on a terminal, a line at most every 10 s in a log), and each phase's message on a line."""

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
                self.bar = bar(self.SCALE, "step", desc="training", bar_format=fmt)
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


class TileProgress:
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
            self.bar = bar(total, self.unit)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class FileBar:
    """A tqdm bar over files (several inputs), on stderr; without one (quiet, or one file) lines are printed."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.bar = None if quiet else bar(total, "file")

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
