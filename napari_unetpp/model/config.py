"""The architecture of a UNet++ as model cards store it: :class:`UNetPlusPlusConfig` and its checks, the pooling
rule for anisotropic voxels (:func:`anisotropic_pool`) and the names of the nodes a depth evaluates
(:func:`node_names`). No torch here: a card is read without building a network."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["UNetPlusPlusConfig", "anisotropic_pool", "node_names", "NORMS", "UPSAMPLES", "ACTIVATIONS", "CUES"]

NORMS = ("none", "batch", "instance", "group")
UPSAMPLES = ("transpose", "nearest", "linear")
ACTIVATIONS = ("relu", "leaky_relu")
CUES = ("none", "distance")


@dataclass
class UNetPlusPlusConfig:
    """Architecture of a UNet++; stored verbatim in every model card.

    Attributes:
        in_channels: Input channels (default 1).
        num_classes: Output classes; 1 means a sigmoid foreground head, > 1 a softmax over classes (default 1).
        features: Filters per resolution level; ``len(features) - 1`` is the maximum depth
            (default ``(32, 64, 128, 256, 512)``, the paper's, depth 4).
        spatial_dims: 2 for images, 3 for volumes (default 2).
        norm: ``"none"`` (paper), ``"batch"``, ``"instance"`` or ``"group"`` (default ``"none"``).
        dropout: Dropout after each convolution; the paper uses 0.5 (default 0.0).
        upsample: ``"transpose"`` (paper: 2x2 stride-2 transposed convolution), ``"nearest"`` or ``"linear"``
            (interpolation followed by a 1x1 convolution) (default ``"transpose"``).
        activation: ``"relu"`` (paper) or ``"leaky_relu"`` (default ``"relu"``).
        groups: Groups for ``norm="group"`` (default 8).
        pool: Pooling factor per level and axis, e.g. ``((1, 2, 2), (2, 2, 2), ...)`` for a 3D model on voxels
            twice as long in Z as in-plane (see :func:`anisotropic_pool`); each level's upsampling undoes the same
            factor. None (default): 2 on every axis at every level.
        cue: ``"none"`` (default) or ``"distance"``: a second 1x1 head ``cues["cue_{j}"]`` on every top node
            X(0, j) that regresses each object's distance to its own border, divided by the object's largest such
            distance (1 at an object's centre, falling to 0 at its border and where it touches another object).
            The learned instance split floods it, times the mask's distance transform, from one seed per core (see
            :func:`napari_unetpp.inference.postprocess.split_instances`); deep supervision applies to it as to the
            classes,
            so every pruned level has its own cue.
    """

    in_channels: int = 1
    num_classes: int = 1
    features: tuple[int, ...] = (32, 64, 128, 256, 512)
    spatial_dims: int = 2
    norm: str = "none"
    dropout: float = 0.0
    upsample: str = "transpose"
    activation: str = "relu"
    groups: int = 8
    pool: tuple[tuple[int, ...], ...] | None = None
    cue: str = "none"

    def __post_init__(self) -> None:
        self.features = tuple(int(f) for f in self.features)
        if self.pool is not None:
            self.pool = tuple(tuple(int(f) for f in level) for level in self.pool)
            if len(self.pool) != len(self.features) - 1 or any(
                len(level) != self.spatial_dims or any(f not in (1, 2) for f in level) for level in self.pool
            ):
                raise ValueError(
                    f"pool needs {len(self.features) - 1} levels of {self.spatial_dims} factors, each 1 or 2; "
                    f"got {self.pool}."
                )
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}.")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}.")
        if len(self.features) < 2 or any(f < 1 for f in self.features):
            raise ValueError(f"features needs at least two positive entries (depth >= 1), got {self.features}.")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}.")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}.")
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"upsample must be one of {UPSAMPLES}, got {self.upsample!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.cue not in CUES:
            raise ValueError(f"cue must be one of {CUES}, got {self.cue!r}.")
        if self.cue != "none" and self.num_classes != 1:
            raise ValueError("an instance cue needs a 1-class (foreground) model.")

    @property
    def has_cue(self) -> bool:
        """Whether the heads come with an instance cue (``cue != "none"``)."""
        return self.cue != "none"

    @property
    def max_depth(self) -> int:
        """The deepest sub-network: ``len(features) - 1``."""
        return len(self.features) - 1

    @property
    def pool_factors(self) -> tuple[tuple[int, ...], ...]:
        """Pooling factor per level (1..max_depth) and spatial axis."""
        return self.pool if self.pool is not None else ((2,) * self.spatial_dims,) * self.max_depth

    @property
    def multiple(self) -> tuple[int, ...]:
        """What each spatial size must be a multiple of: the product of the pooling factors per axis
        (``2 ** max_depth`` everywhere for isotropic pooling)."""
        return tuple(int(math.prod(level[ax] for level in self.pool_factors)) for ax in range(self.spatial_dims))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``pool`` and ``cue`` only when they are not the defaults)."""
        d = asdict(self)
        d["features"] = list(self.features)
        if self.cue == "none":
            del d["cue"]
        if self.pool is None:
            del d["pool"]
        else:
            d["pool"] = [list(level) for level in self.pool]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetPlusPlusConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        return cls(**d)


def node_names(depth: int) -> list[str]:
    """Names of the nodes of the depth-``depth`` sub-network (``i + j <= depth``), in evaluation order."""
    names = []
    for d in range(depth + 1):
        # after encoder node X(d, 0), the anti-diagonal X(d-1, 1), ..., X(0, d) can be computed
        names += [f"x_{d - j}_{j}" for j in range(d + 1)]
    return names


def anisotropic_pool(spacing: tuple[float, ...] | list[float], depth: int = 4) -> tuple[tuple[int, ...], ...]:
    """Pooling factors per level for voxels of ``spacing`` (nnU-Net's rule): an axis is pooled only while its
    voxels are less than twice as long as the finest axis's, and the spacing is tracked level by level, so a
    2 mm x 0.98 mm x 0.98 mm CT pools in-plane first and then everywhere.

    Args:
        spacing: Voxel size per spatial axis, in the array's order (e.g. Z, Y, X).
        depth: Levels below full resolution.
    """
    current = [float(s) for s in spacing]
    out = []
    for _ in range(depth):
        finest = min(current)
        level = tuple(2 if s < 2 * finest else 1 for s in current)
        current = [s * f for s, f in zip(current, level)]
        out.append(level)
    return tuple(out)
