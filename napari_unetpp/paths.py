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
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["cache_dir", "partial_beside", "samples_dir", "shipped_weights_dir", "user_models_dir", "write_atomically"]

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


def partial_beside(target: Path, suffix: str = "", folder: bool = False) -> Path:
    """A new hidden temporary file (or folder) beside ``target``, ``.<name>.<random>.partial<suffix>``: on the same
    file system, so renaming it onto ``target`` is atomic, and named so a crash leaves something recognisable."""
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix, end = f".{target.name}.", ".partial" + suffix
    if folder:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=end, dir=target.parent))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=end, dir=target.parent)
    os.close(fd)
    return Path(tmp)


def write_atomically(path: Path, write: Callable[[Path], object], mode: int | None = 0o644) -> None:
    """``write(tmp)`` into :func:`partial_beside` ``path``, then rename it into place: a reader (another process, a
    later run) sees the old file or the whole new one, never half of one, and a failure (or Ctrl-C) leaves nothing
    behind. ``mode`` (default ``0o644``, as a plain file gets; None keeps the temporary file's ``0o600``) is set
    before the rename. Whatever ``write`` raises is raised again."""
    tmp = partial_beside(path, path.suffix)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
