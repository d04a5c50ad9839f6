"""The model registry: versions, names, listing, loading, and crash-safe saving of new versions.

A model version is two files side by side (:mod:`~napari_unetpp.model.files`): ``<stem>.safetensors`` (weights, no
pickle) and ``<stem>.json`` (its card, :mod:`~napari_unetpp.model.card`). Shipped models live in the package's
``weights/`` folder; user models in ``<user data dir>/models/<name>/<name>-v<N>.*``. Saving never overwrites an
existing version.

Names: ``"em-membranes"`` is a shipped model or the newest version of a user model; ``"my-model@v2"`` one version;
any path to a ``.safetensors`` or ``.json`` file works too.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_unetpp.errors import ModelFileError
from napari_unetpp.model.card import NAME_RE, ModelCard, check_model_name, read_card
from napari_unetpp.model.files import (
    SUFFIXES,
    calibration_path,
    fsync,
    pair,
    publish,
    save_calibration,
    sha256,
    suffixed,
)
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.paths import shipped_weights_dir, user_models_dir

__all__ = [
    "ModelInfo",
    "list_models",
    "load_model",
    "model_file",
    "resolve_model",
    "save_model",
]

log = logging.getLogger(__name__)
MAX_SAVE_TRIES = 1000


@dataclass(frozen=True)
class ModelInfo:
    """One row of :func:`list_models`."""

    id: str
    name: str
    version: int
    shipped: bool
    path: Path
    card: ModelCard


def model_file(name_or_path: str | os.PathLike[str]) -> Path:
    """The absolute path of the card a model name (``name``, ``name@vN``) or path stands for: what to hand to
    processes that load the model themselves (dask workers).

    Raises:
        ModelFileError: as :func:`load_model`.
    """
    return _locate(str(name_or_path))[0].resolve()


def load_model(name_or_path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model version by name (``name`` or ``name@vN``) or by path, without pickle.

    Args:
        name_or_path: Shipped or user model name, ``name@vN``, or a path to the ``.safetensors``/``.json`` file.
        device: Where to put the fp32 network (default CPU; prediction moves a folded copy where it runs).

    Raises:
        ModelFileError: unknown name, missing, corrupt, truncated or mismatched files (the message names them).
    """
    path, shipped = _locate(str(name_or_path))
    weights, card_path = pair(path)
    card = read_card(card_path)
    if not weights.is_file():
        raise ModelFileError(f"{weights}: the weights file is missing.")
    if card.weights_sha256 and sha256(weights) != card.weights_sha256:
        raise ModelFileError(
            f"{weights}: the weights file is corrupt or truncated (its checksum does not match "
            f"{card_path.name}); restore or re-save it."
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{weights}: the weights file is corrupt or truncated ({exc}).") from None
    module = UNetPlusPlus.from_config(card.architecture)
    ref = module.state_dict()
    missing = sorted(set(ref) - set(state))
    extra = sorted(set(state) - set(ref))
    wrong = [k for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    if missing or extra or wrong:
        detail = "; ".join(
            s
            for s in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {extra[:3]}" if extra else "",
                f"wrong shape {wrong[:3]}" if wrong else "",
            )
            if s
        )
        raise ModelFileError(f"{weights}: the weights do not match the architecture in {card_path.name} ({detail}).")
    module.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()})
    module.to(device).eval()
    return LoadedModel(module, card, weights, shipped)


def _is_path(name: str) -> bool:
    """A model is named by path when it has a model file's suffix or a folder part; anything else is a registry
    name, so a folder called ``nuclei/`` in the working directory never shadows the model ``nuclei``."""
    return name.endswith(SUFFIXES) or "/" in name or os.sep in name or name.startswith(("~", "."))


def _locate(name: str) -> tuple[Path, bool]:
    if _is_path(name):
        p = Path(name).expanduser()
        if p.suffix not in (".safetensors", ".json"):
            raise ModelFileError(f"{p}: a model file ends in .safetensors or .json.")
        if not (p.exists() or pair(p)[1].exists()):
            raise ModelFileError(f"{p}: no such model file.")
        return p, False
    base, _, ver = name.partition("@")
    if not NAME_RE.match(base) or (ver and not re.fullmatch(r"v?\d+", ver)):
        raise ModelFileError(
            f"{name!r} is neither a model name (like 'em-membranes' or 'name@v2') nor a model file "
            f"(.safetensors or .json)."
        )
    versions = _user_versions(base)
    if ver:
        n = int(ver.lstrip("v"))
        if n in versions:
            return versions[n], False
        if n == 1 and (shipped_weights_dir() / f"{base}.json").is_file():
            return shipped_weights_dir() / f"{base}.json", True
        raise ModelFileError(f"model {base!r} has no version {n}; `napari-unetpp models` lists what exists.")
    if versions:
        return versions[max(versions)], False
    shipped = shipped_weights_dir() / f"{base}.json"
    if shipped.is_file():
        return shipped, True
    hint = (
        f" (to load the file {name!r}, give its path with the .safetensors or .json suffix)"
        if Path(name).exists()
        else ""
    )
    raise ModelFileError(f"no model named {base!r}; `napari-unetpp models` lists the available ones{hint}.")


def _user_versions(name: str) -> dict[int, Path]:
    """Card paths of the complete versions of a user model (see :func:`_user_cards`)."""
    return {n: path for n, (path, _) in _user_cards(name).items()}


def _user_cards(name: str) -> dict[int, tuple[Path, ModelCard]]:
    """Complete versions of a user model, with their cards: a card that parses and the weights beside it. A version
    whose save was interrupted (weights without a card, or a card still being written on a file system without hard
    links) is not listed, so the newest *complete* version is what ``load_model(name)`` gets."""
    folder = user_models_dir() / name
    out: dict[int, tuple[Path, ModelCard]] = {}
    if folder.is_dir():
        for f in folder.glob(f"{name}-v*.json"):
            m = re.fullmatch(rf"{re.escape(name)}-v(\d+)\.json", f.name)
            if not m:
                continue
            try:
                card = read_card(f)
            except ModelFileError as exc:
                log.warning("skipping an incomplete model version: %s", exc)
                continue
            if pair(f)[0].is_file():
                out[int(m.group(1))] = (f, card)
    return out


def resolve_model(model: Any) -> LoadedModel:
    """Accept a :class:`LoadedModel`, a model name or path, or a bare ``UNetPlusPlus``; return a LoadedModel.

    Raises:
        ModelFileError: an unknown name or a bad file.
        TypeError: anything else.
    """
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return load_model(os.fsdecode(model))
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, UNetPlusPlus):
        return LoadedModel.from_module(model)
    raise TypeError(f"expected a model name, path, LoadedModel or UNetPlusPlus, got {type(model).__name__}.")


def list_models() -> list[ModelInfo]:
    """Every shipped model and every user model version; unreadable cards are skipped with a warning."""
    rows: list[ModelInfo] = []
    wdir = shipped_weights_dir()
    for path in sorted(wdir.glob("*.json")) if wdir.is_dir() else []:
        try:
            card = read_card(path)
        except ModelFileError as exc:
            log.warning("%s", exc)
            continue
        rows.append(ModelInfo(card.id, card.name, card.version, True, path, card))
    udir = user_models_dir()
    if udir.is_dir():
        for folder in sorted(p for p in udir.iterdir() if p.is_dir()):
            for _, (path, card) in sorted(_user_cards(folder.name).items()):  # read once, already checked
                rows.append(ModelInfo(card.id, card.name, card.version, False, path, card))
    return rows


def save_model(
    model: UNetPlusPlus | LoadedModel,
    card: ModelCard,
    directory: str | os.PathLike[str] | None = None,
    storage_dtype: str = "float32",
    calibration: np.ndarray | None = None,
) -> Path:
    """Save a new version of ``card.name`` and return the card's path; never overwrites anything.

    With ``directory=None`` the version number is the next free one in the user models folder and is written into
    the card. With an explicit ``directory`` the files are ``<directory>/<name>.safetensors/.json`` (how shipped
    models are made); an existing file there is an error.

    Args:
        model: The network (its current weights are saved).
        card: The card to save; ``architecture``, ``weights_sha256``, ``weights_dtype`` and ``version`` are filled in.
        directory: Target folder (default: the user models folder, versioned).
        storage_dtype: ``"float32"`` (default) or ``"float16"`` (half the size; loading restores fp32).
        calibration: Normalised tiles of the model's own data for int8 inference
            (:func:`napari_unetpp.runtimes.int8.calibration_tiles`), saved beside the weights before the card.
    """
    from safetensors.torch import save_file

    module = model.module if isinstance(model, LoadedModel) else model
    check_model_name(card.name)
    if storage_dtype not in ("float32", "float16"):
        raise ValueError(f"storage_dtype must be float32 or float16, got {storage_dtype!r}.")
    dt = torch.float16 if storage_dtype == "float16" else torch.float32
    state = {
        k: (v.detach().to("cpu", dt) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in module.state_dict().items()
    }
    card.architecture = module.config.to_dict()
    card.weights_dtype = storage_dtype
    if directory is None:
        folder = user_models_dir() / card.name
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_saves(folder)
    with tempfile.TemporaryDirectory(dir=folder, prefix=_SAVING) as tmp:
        tw = Path(tmp) / "w.safetensors"
        save_file(state, str(tw))
        os.chmod(tw, 0o644)
        fsync(tw)
        card.weights_sha256 = sha256(tw)
        # The weights land first under a free name; the card, published last, is the commit point: a reader never
        # sees a card whose weights are not complete, and a crash in between leaves weights without a card, which
        # no reader lists (that version number is skipped by the next save).
        if directory is None:
            versions = set(_user_versions(card.name))
            if (shipped_weights_dir() / f"{card.name}.json").is_file():
                versions.add(1)  # a shipped model is version 1 of its name: never shadow it
            n = max(versions, default=0) + 1
            for _ in range(MAX_SAVE_TRIES):
                stem = folder / f"{card.name}-v{n}"
                try:
                    publish(tw, suffixed(stem, ".safetensors"))
                    break
                except FileExistsError:  # another save holds this number (or a crashed one left its weights)
                    n += 1
            else:  # an OSError like every other failed save: callers keep the trained model and say where
                raise FileExistsError(
                    errno.EEXIST,
                    f"could not claim a version number for {card.name!r} after {MAX_SAVE_TRIES} tries (every "
                    f"{card.name}-vN.safetensors seems taken); remove stray files there or save under another name",
                    str(folder),
                )
            card.version = n
        else:
            stem = folder / card.name
            if suffixed(stem, ".json").exists():
                raise FileExistsError(f"{suffixed(stem, '.json')} exists; models are never overwritten.")
            weights = suffixed(stem, ".safetensors")
            try:
                publish(tw, weights)
            except FileExistsError:
                raise FileExistsError(f"{weights} exists; models are never overwritten.") from None
        if calibration is not None:  # before the card: a listed model has its calibration complete
            tq = Path(tmp) / "q.safetensors"
            save_calibration(calibration, tq)
            fsync(tq)
            os.replace(tq, calibration_path(suffixed(stem, ".safetensors")))
        tc = Path(tmp) / "c.json"
        tc.write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
        fsync(tc)
        publish(tc, suffixed(stem, ".json"))
    log.info("saved model %s to %s", card.id, stem)
    return suffixed(stem, ".json")


_SAVING = ".saving-"
STALE_SAVE_SECONDS = 3600.0


def _remove_stale_saves(folder: Path) -> None:
    """Remove ``.saving-*`` folders that a killed save left behind (older than an hour: no save takes that long)."""
    import shutil
    import time

    for d in folder.glob(f"{_SAVING}*"):
        try:
            if d.is_dir() and time.time() - d.stat().st_mtime > STALE_SAVE_SECONDS:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass
