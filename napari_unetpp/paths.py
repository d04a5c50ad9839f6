"""Where napari-unetpp keeps things on disk (shipped weights, the user's models, caches), and how it writes them.

Two environment variables move them, each on its own so that tests (or a shared machine) can keep one models folder
per user or test while the caches are shared:

- ``NAPARI_UNETPP_HOME``: the user's models go to ``$NAPARI_UNETPP_HOME/models`` (default: the per-user data
  folder, e.g. ``~/.local/share/napari-unetpp/models``).
- ``NAPARI_UNETPP_CACHE``: exported graphs, int8 copies and the measured runtime choices (default:
  ``$NAPARI_UNETPP_HOME/cache`` when the home is set, else the per-user cache folder, e.g.
  ``~/.cache/napari-unetpp``). Everything in it can be deleted; it is rebuilt when needed.

And the one atomic write, so a reader (another process, a later run) sees the old file or the whole new one, and a
failure or Ctrl-C leaves nothing behind: :func:`write_atomically` for one file; for a group of outputs that appear
together, :func:`partial_beside` for each, then :func:`move_all_into_place` (:func:`remove_partial` on failure).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from napari_unetpp.interrupts import ctrl_c_held

__all__ = [
    "cache_dir",
    "move_all_into_place",
    "move_into_place",
    "partial_beside",
    "remove_partial",
    "samples_dir",
    "shipped_weights_dir",
    "usual_mode",
    "user_models_dir",
    "write_atomically",
]

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


def usual_mode(target: Path, folder: bool = False) -> int:
    """The permissions a plain ``open()`` (``mkdir`` for a folder) would give ``target``: the mode of what is there
    (replacing a file keeps its mode), else ``0o666`` (``0o777``) less the umask. :func:`partial_beside` makes
    private ones (``0o600``, ``0o700``): give it this before it is moved into place, so colleagues see the results."""
    try:
        return os.stat(target).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return (0o777 if folder else 0o666) & ~umask


def remove_partial(path: Path) -> None:
    """Remove a partial file or folder (a failed or cancelled write); what is not there is no error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def move_into_place(partial: Path, target: Path) -> None:
    """Rename a complete partial file or folder onto ``target``. A file replaces what is there atomically; a folder
    (which cannot be renamed over a full one) moves what is there aside first and removes it only once the new one is
    in place."""
    if partial.is_dir() and (target.exists() or target.is_symlink()):
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(partial, target)
        remove_partial(old)
    else:
        os.replace(partial, target)


def move_all_into_place(moves: Iterable[tuple[Path, Path]]) -> None:
    """:func:`move_into_place` each ``(partial, target)`` with Ctrl-C held off, so a group of outputs (a mask and its
    per-level probabilities) is all in place or none is."""
    with ctrl_c_held():
        for partial, target in moves:
            move_into_place(partial, target)
