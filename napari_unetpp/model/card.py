"""A model's card: what it is, how it was made and how well each level does; its JSON form, and the rule for names.

The card is the ``<stem>.json`` beside a version's weights: architecture, normalisation, classes, training data,
per-level validation scores, recommended depth, parent, date, and the weights' SHA-256. Keys a card of a newer
version holds that this one does not know are ignored, so newer cards stay readable.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from napari_unetpp.data.normalization import Normalization
from napari_unetpp.errors import ModelFileError
from napari_unetpp.model.config import UNetPlusPlusConfig

__all__ = ["CARD_FORMAT", "NAME_RE", "ModelCard", "check_model_name", "read_card"]

CARD_FORMAT = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a model name: letters, digits, "._-"


@dataclass
class ModelCard:
    """What a model is, how it was made and how well each level does.

    Attributes:
        name: Model name (letters, digits, ``._-``).
        architecture: :class:`~napari_unetpp.model.config.UNetPlusPlusConfig` as a dict.
        normalization: :class:`~napari_unetpp.data.normalization.Normalization` as a dict.
        classes: Class names; for 1-class models the foreground name (default ``["foreground"]``).
        description: One line for humans.
        version: Version number (1 for shipped models; assigned by
            :func:`~napari_unetpp.model.registry.save_model`).
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


def read_card(card_path: Path) -> ModelCard:
    """The card at ``card_path``, checked: a JSON object whose architecture and normalisation can be built.

    Raises:
        ModelFileError: the card is missing, unreadable or invalid (the message names the file).
    """
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


def check_model_name(name: str) -> None:
    """Refuse, in one sentence, a name a model could not be saved and loaded back under.

    Letters, digits, ``.``, ``_`` and ``-`` (dots are fine: ``em.v2``), starting with a letter or digit, and not
    ending in ``.json``/``.safetensors`` (such a name reads as a file path).

    Raises:
        ValueError: the name is not usable (the message says why).
    """
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(
            f"model name {name!r} may use only letters, digits, '.', '_' and '-', starting with a letter or digit."
        )
    if name.lower().endswith((".safetensors", ".json")):
        raise ValueError(f"model name {name!r} must not end in .json or .safetensors (that reads as a file path).")
    if name.endswith("."):
        raise ValueError(f"model name {name!r} must not end in '.' (Windows drops it from folder names).")
