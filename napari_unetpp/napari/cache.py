"""A bounded cache of per-plane results for the Segment widget (no Qt: tested on its own).

Entries are keyed by what makes a result valid (:class:`ResultKey`, fields by name): the image layer's unique id
and shape, the model's weights fingerprint (not its ``name@vN``: two files may share one), the plane, and the
channel, normalisation and zoom the model read it with. The cache holds at most ``max_bytes`` of arrays, dropping
the least recently used plane first, and forgets a layer or a model as soon as it goes away. Entries own copies of
their arrays, so a cached plane never pins a whole-stack result.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DEFAULT_CACHE_MB", "PlaneResult", "ResultCache", "ResultKey"]

DEFAULT_CACHE_MB = 512


@dataclass(frozen=True)
class ResultKey:
    """What a cached plane result is valid for. Frozen and read by field name only (a positional tuple once had its
    fields read at the wrong index, and forgot every result on every layer insert).

    Attributes:
        layer: The image layer's unique id.
        shape: The shape of the layer's full-resolution data.
        fingerprint: The model's weights fingerprint.
        plane: Index of the plane over the non-spatial axes (``()`` for a 2D image or a 3D model's volume).
        channel: The channel of the layer's first axis that is segmented (None: the layer as it is).
        normalization: The model's normalisation as a hashable (one HU window's results are not another's).
        zoom: The resampling to the model's pixel size (None: none).
        version: How many times the layer's data was replaced before this result (a result of the old data is
            never served for the new).
    """

    layer: Hashable
    shape: tuple[int, ...]
    fingerprint: str
    plane: tuple[int, ...]
    channel: int | None = None
    normalization: tuple = ()
    zoom: tuple[float, ...] | None = None
    version: int = 0


@dataclass
class PlaneResult:
    """Probabilities of one plane (or one volume for 3D models), per level, with the time each depth took, and the
    instance cue per level for models that have one."""

    probs: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    cues: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes held by the probability and cue arrays."""
        return int(sum(p.nbytes for p in self.probs.values()) + sum(c.nbytes for c in self.cues.values()))


class ResultCache:
    """Least-recently-used plane results, at most ``max_mb`` megabytes of arrays.

    Args:
        max_mb: Size bound in MB (default :data:`DEFAULT_CACHE_MB`).
    """

    def __init__(self, max_mb: float = DEFAULT_CACHE_MB) -> None:
        self.max_bytes = int(max_mb * 2**20)
        self._entries: OrderedDict[ResultKey, PlaneResult] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[ResultKey]:
        """The keys held, least recently used first."""
        return list(self._entries)

    def items(self) -> list[tuple[ResultKey, PlaneResult]]:
        """The entries held, least recently used first (reading them does not count as a use)."""
        return list(self._entries.items())

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(e.nbytes for e in self._entries.values())

    def get(self, key: ResultKey) -> PlaneResult | None:
        """The entry for ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(
        self,
        key: ResultKey,
        probs: dict[int, np.ndarray],
        seconds: dict[int, float] | None = None,
        cues: dict[int, np.ndarray] | None = None,
    ) -> PlaneResult:
        """Add levels to the entry for ``key`` (copies of the arrays), then evict down to the bound. The entry just
        written is kept even when it alone exceeds the bound, so what the user looks at is always there."""
        entry = self._entries.get(key) or PlaneResult()
        for lv, p in probs.items():
            entry.probs[lv] = np.array(p, copy=True)
        for lv, c in (cues or {}).items():
            entry.cues[lv] = np.array(c, copy=True)
        entry.seconds.update(seconds or {})
        self._entries[key] = entry
        self._entries.move_to_end(key)
        self._evict(keep=key)
        return entry

    def drop(self, layer: Hashable | None = None, fingerprint: str | None = None) -> int:
        """Forget the entries of an image layer's unique id and/or a model fingerprint; returns how many went."""
        gone = [
            k
            for k in self._entries
            if (layer is not None and k.layer == layer) or (fingerprint is not None and k.fingerprint == fingerprint)
        ]
        for k in gone:
            del self._entries[k]
        return len(gone)

    def keep_only(self, layers: set[Hashable], fingerprints: set[str]) -> int:
        """Forget entries whose layer or model is no longer present; returns how many went."""
        gone = [k for k in self._entries if k.layer not in layers or k.fingerprint not in fingerprints]
        for k in gone:
            del self._entries[k]
        return len(gone)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()

    def _evict(self, keep: ResultKey) -> None:
        total = self.nbytes
        for k in list(self._entries):
            if total <= self.max_bytes:
                break
            if k == keep:
                continue
            total -= self._entries.pop(k).nbytes
