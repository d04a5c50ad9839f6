"""The model registry: model files (weights + card), versions, names, and crash-safe saving.

A model version is two files side by side: ``<stem>.safetensors`` (weights, no pickle) and ``<stem>.json`` (its
card: architecture, normalisation, classes, training data, per-level validation scores, recommended depth,
parent, date, and the weights' SHA-256). Shipped models live in the package's ``weights/`` folder; user models in
``<user data dir>/models/<name>/<name>-v<N>.*``. Saving never overwrites an existing version.

Names: ``"em-membranes"`` is a shipped model or the newest version of a user model; ``"my-model@v2"`` one version;
any path to a ``.safetensors`` or ``.json`` file works too.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_unetpp.data.normalization import Normalization
from napari_unetpp.errors import ModelFileError
from napari_unetpp.model.network import UNetPlusPlus, UNetPlusPlusConfig
from napari_unetpp.paths import shipped_weights_dir, user_models_dir
from napari_unetpp.runtimes.device import optimize_for_inference

__all__ = [
    "ModelCard",
    "LoadedModel",
    "ModelFileError",
    "load_model",
    "model_file",
    "save_model",
    "list_models",
    "resolve_model",
    "ModelInfo",
    "check_model_name",
]

log = logging.getLogger(__name__)
CARD_FORMAT = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ModelCard:
    """What a model is, how it was made and how well each level does.

    Attributes:
        name: Model name (letters, digits, ``._-``).
        architecture: :class:`~napari_unetpp.model.network.UNetPlusPlusConfig` as a dict.
        normalization: :class:`~napari_unetpp.data.normalization.Normalization` as a dict.
        classes: Class names; for 1-class models the foreground name (default ``["foreground"]``).
        description: One line for humans.
        version: Version number (1 for shipped models; assigned by :func:`save_model`).
        training: Data (with citations and licences), recipe, hyperparameters, device, duration.
        scores: Per-level validation scores, e.g. ``{"L1": {"dice": 0.9}, ...}``.
        recommended_depth: Shallowest level within a small margin of the best (None: use the maximum).
        parent: ``name@vN`` of the model this one was fine-tuned from.
        created: ISO date-time.
        tile: Default tile size for prediction.
        weights_sha256: SHA-256 of the weights file.
        weights_dtype: Storage dtype of the weights (``float32`` or ``float16``).
        format: Card format version.
    """

    name: str
    architecture: dict[str, Any]
    normalization: dict[str, Any] = field(default_factory=lambda: Normalization().to_dict())
    classes: list[str] = field(default_factory=lambda: ["foreground"])
    description: str = ""
    version: int = 1
    training: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    recommended_depth: int | None = None
    parent: str | None = None
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    tile: int | None = None
    weights_sha256: str = ""
    weights_dtype: str = "float32"
    format: int = CARD_FORMAT

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        """Build from a dict, ignoring keys this version does not know (newer cards stay readable)."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def id(self) -> str:
        """``name@vN``."""
        return f"{self.name}@v{self.version}"


class _BuildOnce:
    """Builds each key's value once however many threads ask at the same time (the others wait for it and get the
    same object); different keys build in parallel (an OpenVINO compilation for L4 does not hold up a slider's L2).
    Pickles and copies as a fresh one: locks do not travel, and a copy builds its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def __reduce__(self) -> tuple[type[_BuildOnce], tuple[()]]:
        return (_BuildOnce, ())

    def get(self, store: dict[str, Any], key: str, build: Callable[[], Any]) -> Any:
        """``store[key]``, made by ``build()`` (once) if it is not there."""
        if key in store:
            return store[key]
        with self._lock:
            lock = self._building.setdefault(key, threading.Lock())
        with lock:
            if key not in store:  # another thread may have built it while this one waited
                store[key] = build()
            return store[key]


@dataclass
class LoadedModel:
    """A model ready to use: the network (fp32, eval mode on CPU), its card and where it came from.

    What it builds for inference (the inference copy per device, ONNX Runtime sessions, OpenVINO compiled models)
    is built once however many threads ask at the same time (a slider preview beside a whole-stack run).
    """

    module: UNetPlusPlus
    card: ModelCard
    path: Path | None = None
    shipped: bool = False
    _cache: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)
    _once: _BuildOnce = field(default_factory=_BuildOnce, init=False, repr=False, compare=False)

    @classmethod
    def from_module(cls, module: UNetPlusPlus, name: str = "unsaved", **card: Any) -> LoadedModel:
        """Wrap an in-memory network with a minimal card (e.g. right after training)."""
        return cls(module, ModelCard(name=name, architecture=module.config.to_dict(), **card))

    @property
    def normalization(self) -> Normalization:
        """The card's normalisation recipe."""
        return Normalization.from_dict(self.card.normalization)

    @property
    def max_depth(self) -> int:
        """Deepest level."""
        return self.module.max_depth

    @property
    def fingerprint(self) -> str:
        """What identifies these weights: the card's SHA-256 of the weights file, else (a model only in memory) a
        hash of its parameters, computed once. Two different files with the same ``name@vN`` differ here."""
        if self.card.weights_sha256:
            return self.card.weights_sha256

        def digest() -> str:
            h = hashlib.sha256()
            for k, v in self.module.state_dict().items():
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()

        return str(self.kept("fingerprint", digest))

    def inference_module(self, device: torch.device | str = "cpu") -> UNetPlusPlus:
        """Eval-mode copy on ``device`` with batch norms folded in; cached per device, built once."""
        dev = torch.device(device)
        return self._once.get(self._cache, str(device), lambda: optimize_for_inference(self.module, dev))

    def kept(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()``, kept on this model under ``key``: built once, however many threads ask at the same time.

        Args:
            key: What the value is kept under (e.g. ``"ort:<graph file>:t4"``).
            build: Makes the value (an ONNX Runtime session, an OpenVINO compiled model, a hash).
        """
        return self._once.get(self._memo, key, build)


@dataclass(frozen=True)
class ModelInfo:
    """One row of :func:`list_models`."""

    id: str
    name: str
    version: int
    shipped: bool
    path: Path
    card: ModelCard


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_SUFFIXES = (".safetensors", ".json")
MAX_SAVE_TRIES = 1000


def _pair(path: Path) -> tuple[Path, Path]:
    """The weights and card paths of one model file (either of them, or their common stem). Names are built by
    string: a model name may hold dots (``em.v2``), so ``with_suffix`` on a stem would cut it at its last dot."""
    stem = _stem_of(path)
    return _with(stem, ".safetensors"), _with(stem, ".json")


def _stem_of(path: Path) -> Path:
    """``path`` without its ``.safetensors``/``.json`` suffix (a path without one is already a stem)."""
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def _with(stem: Path, suffix: str) -> Path:
    """``<stem><suffix>``, keeping every dot already in the stem's name."""
    return stem.with_name(stem.name + suffix)


def _read_card(card_path: Path) -> ModelCard:
    try:
        d = json.loads(card_path.read_text(encoding="utf-8"))
        if not isinstance(d, dict):
            raise ValueError(f"it holds a JSON {type(d).__name__}, not an object")
        card = ModelCard.from_dict(d)
        UNetPlusPlusConfig.from_dict(card.architecture)
        Normalization.from_dict(card.normalization)
    except FileNotFoundError:
        raise ModelFileError(
            f"{card_path}: the model card is missing; every weights file needs its .json card beside it."
        ) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelFileError(f"{card_path}: the model card is unreadable or invalid ({exc}).") from None
    return card


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
    weights, card_path = _pair(path)
    card = _read_card(card_path)
    if not weights.is_file():
        raise ModelFileError(f"{weights}: the weights file is missing.")
    if card.weights_sha256 and _sha256(weights) != card.weights_sha256:
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
    return name.endswith((".safetensors", ".json")) or "/" in name or os.sep in name or name.startswith(("~", "."))


def _locate(name: str) -> tuple[Path, bool]:
    if _is_path(name):
        p = Path(name).expanduser()
        if p.suffix not in (".safetensors", ".json"):
            raise ModelFileError(f"{p}: a model file ends in .safetensors or .json.")
        if not (p.exists() or _pair(p)[1].exists()):
            raise ModelFileError(f"{p}: no such model file.")
        return p, False
    base, _, ver = name.partition("@")
    if not _NAME_RE.match(base) or (ver and not re.fullmatch(r"v?\d+", ver)):
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
                card = _read_card(f)
            except ModelFileError as exc:
                log.warning("skipping an incomplete model version: %s", exc)
                continue
            if _pair(f)[0].is_file():
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
            card = _read_card(path)
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
        _fsync(tw)
        card.weights_sha256 = _sha256(tw)
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
                    _publish(tw, _with(stem, ".safetensors"))
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
            if _with(stem, ".json").exists():
                raise FileExistsError(f"{_with(stem, '.json')} exists; models are never overwritten.")
            try:
                _publish(tw, _with(stem, ".safetensors"))
            except FileExistsError:
                raise FileExistsError(f"{_with(stem, '.safetensors')} exists; models are never overwritten.") from None
        if calibration is not None:  # before the card: a listed model has its calibration complete
            from napari_unetpp.runtimes.int8 import calibration_path, save_calibration

            tq = Path(tmp) / "q.safetensors"
            save_calibration(calibration, tq)
            os.chmod(tq, 0o644)
            _fsync(tq)
            os.replace(tq, calibration_path(_with(stem, ".safetensors")))
        tc = Path(tmp) / "c.json"
        tc.write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
        _fsync(tc)
        _publish(tc, _with(stem, ".json"))
    log.info("saved model %s to %s", card.id, stem)
    return _with(stem, ".json")


def check_model_name(name: str) -> None:
    """Refuse, in one sentence, a name a model could not be saved and loaded back under.

    Letters, digits, ``.``, ``_`` and ``-`` (dots are fine: ``em.v2``), starting with a letter or digit, and not
    ending in ``.json``/``.safetensors`` (such a name reads as a file path).

    Raises:
        ValueError: the name is not usable (the message says why).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"model name {name!r} may use only letters, digits, '.', '_' and '-', starting with a letter or digit."
        )
    if name.lower().endswith(_SUFFIXES):
        raise ValueError(f"model name {name!r} must not end in .json or .safetensors (that reads as a file path).")
    if name.endswith("."):
        raise ValueError(f"model name {name!r} must not end in '.' (Windows drops it from folder names).")


_SAVING = ".saving-"
STALE_SAVE_SECONDS = 3600.0


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _publish(src: Path, dst: Path) -> None:
    """Make the complete file ``src`` appear at ``dst`` in one step, never over an existing file.

    A hard link does both at once. Where hard links are not supported (FAT/exFAT, some network shares), ``dst`` is
    first claimed by an exclusive create and then replaced by ``src`` (a rename within the folder).

    Raises:
        FileExistsError: ``dst`` exists.
    """
    try:
        os.link(src, dst)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        log.debug("no hard link for %s (%s): exclusive create and rename instead", dst, exc)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    os.replace(src, dst)


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
