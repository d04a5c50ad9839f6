"""Where napari-unetpp keeps things on disk: the shipped weights, the user's models and the caches.

Two environment variables move them, each on its own so that tests (or a shared machine) can keep one models folder
per user or test while the caches are shared:

- ``NAPARI_UNETPP_HOME``: the user's models go to ``$NAPARI_UNETPP_HOME/models`` (default: the per-user data
  folder, e.g. ``~/.local/share/napari-unetpp/models``).
- ``NAPARI_UNETPP_CACHE``: exported graphs, int8 copies and the measured runtime choices (default:
  ``$NAPARI_UNETPP_HOME/cache`` when the home is set, else the per-user cache folder, e.g.
  ``~/.cache/napari-unetpp``). Everything in it can be deleted; it is rebuilt when needed.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "samples_dir", "shipped_weights_dir", "user_models_dir"]

_APP = "napari-unetpp"


def shipped_weights_dir() -> Path:
    """The shipped ``weights/`` folder: inside the installed package (wheel) or beside it (source checkout)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "weights", here.parent / "weights"):
        if cand.is_dir():
            return cand
    return here / "weights"


def samples_dir() -> Path:
    """The shipped sample images (``napari_unetpp/_samples``): the napari samples, the demo, export's test input."""
    return Path(__file__).resolve().parent / "_samples"


def user_models_dir() -> Path:
    """Where fine-tuned versions are saved: ``$NAPARI_UNETPP_HOME/models``, else the per-user data folder."""
    env = os.environ.get("NAPARI_UNETPP_HOME")
    if env:
        return Path(env) / "models"
    from platformdirs import user_data_dir

    return Path(user_data_dir(_APP, appauthor=False)) / "models"


def cache_dir() -> Path:
    """Where exported graphs, int8 copies and runtime choices are kept: ``$NAPARI_UNETPP_CACHE``, else
    ``$NAPARI_UNETPP_HOME/cache``, else the per-user cache folder."""
    env = os.environ.get("NAPARI_UNETPP_CACHE")
    if env:
        return Path(env)
    env = os.environ.get("NAPARI_UNETPP_HOME")
    if env:
        return Path(env) / "cache"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir(_APP, appauthor=False))
