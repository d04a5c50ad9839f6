"""``napari-unetpp models``: the shipped and user models, one line each (``-v``: description, file and parent)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """Print the table of models; the exit status, 0."""
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


def add_parser(sub: Any) -> None:
    """Add ``models`` to the subcommands ``sub``."""
    m = sub.add_parser("models", help="list shipped and user models")
    m.add_argument("-v", "--verbose", action="store_true")
    m.set_defaults(func=run)
